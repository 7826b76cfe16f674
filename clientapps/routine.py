"""Client routines: what a ClientApp does with a train, evaluate or query message.

These are the entry points for mixing Bouquet into your own Flower app: your
ClientApp builds its model and data and hands them over::

    from bouquet.clientapps import describe_client, evaluate_client, train_client

    @app.train()
    def train(msg, context):
        return train_client(msg, context, MyNet(), trainloader)

    @app.evaluate()
    def evaluate(msg, context):
        return evaluate_client(msg, context, MyNet(), valloader)

    @app.query()  # asynchronous strategies size each node's tasks by it
    def query(msg, context):
        return describe_client(msg, context, trainloader, num_classes=10)

Data may be ``(x, y)`` tensors, a ``Dataset``, a ``DataLoader`` or any
iterable of batches (:mod:`clientapps.inputs`). Local-training settings
(``local-epochs``, ``batch-size``, ``lr``, ``momentum``, ...) come from the
server's message, else the run config, else your ``defaults``, else
:class:`~clientapps.loop.TrainSettings`' documented ones.

The server's strategy names the routine its algorithm needs in the message
(``config["client-routine"]``): ``train_client`` runs that recipe of hooks on
the one training loop and packs the reply (the local arrays, metrics with
``num-examples``, the recipe's extra records, and a ``client-info`` record
naming the routine it ran, so the server can refuse replies from clients
that did not). A recipe's record named ``"arrays"`` replaces the local
arrays (e.g. a gradient). Nothing here imports the server side.

Personal parameters (``config["personal-parameters"]``) never leave the
node: they are kept in ``Context.state``, put back into the model before
training and evaluation, and left out of the reply.

The server's config may be wrong or hostile: every value a routine reads is
checked against :mod:`clientapps.bounds` first, and a refused one raises
:class:`~clientapps.bounds.ConfigError`, which Flower turns into the call's
error reply (its reason names the key, the value and the allowed range).
"""

from __future__ import annotations

import copy as _copy
import dataclasses
import warnings
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from torch import nn

from bouquet.clientapps import bounds, downlink, partial, uplink
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.inputs import DataSource, as_tensors, labels_of
from bouquet.clientapps.loop import OptimizerFactory, TrainSettings, train_local
from bouquet.clientapps.privacy import private_hooks
from bouquet.clientapps.recipes import (
    get_evaluation,
    get_recipe,
    get_split,
    partial_arrays,
)
from bouquet.clientapps.state import load_arrays, save_arrays
from bouquet.tasks import flower_engine, wire
from bouquet.tasks.arrays import array_record, array_view
from bouquet.tasks.evaluation import evaluate_model
from bouquet.tasks.finetune import FROZEN_DIGEST, frozen_digest, frozen_names
from bouquet.tasks.models import seeded_rng

# A user's ClientApp imports the routines when Flower loads it, before the
# simulation engine starts: the engine's one-pass poll for mixed-in apps too.
flower_engine.install()

Data = DataSource
Poison = Callable[
    [dict[str, np.ndarray], dict[str, np.ndarray]], Mapping[str, np.ndarray]
]
"""An attack's ``(local, sent) -> arrays`` (``train_client``'s ``poison``)."""

PERSONAL_STATE = ("bouquet", "personal")
"""Where a node keeps its personal parameters in ``Context.state``."""


def client_seed(msg: Message, context: Context) -> int:
    """This node's seed for this round: derived from (seed, round, partition-id)."""
    config = msg.content[wire.CONFIG]
    partition = int(context.node_config.get(wire.PARTITION_ID, 0))
    seed, server_round = bounds.SEED.read(config), bounds.SERVER_ROUND.read(config)
    return wire.derive_seed(seed, server_round, partition)


def routine_of(msg: Message, routine: str | None = None) -> str:
    """The routine to run: ``routine`` if given, else the one the message names."""
    if routine:
        return routine
    config = wire.config_of(msg.content)
    return bounds.ROUTINE.read(config)


def personal_names(msg: Message, model: nn.Module) -> list[str]:
    """The model's entries the message's config makes personal."""
    config = wire.config_of(msg.content)
    patterns = bounds.patterns(config)
    if not patterns:  # (the state dict costs more than the rest of this call)
        return []
    return wire.resolve_personal(patterns, list(model.state_dict()))


def load_model(
    model: nn.Module,
    arrays: ArrayRecord,
    personal: Sequence[str] = (),
    state: Mapping | None = None,
) -> None:
    """Load the global ``arrays`` into ``model``, then the node's personal entries.

    The values are read as views of the message's bytes (no copy before the
    one ``load_state_dict`` makes into the model's own tensors). ``arrays``
    may leave out personal entries, which the node holds in ``state`` (a
    decentralized node keeps its whole model, ``strategies/gossip.py``); a
    node that lost its state keeps the model's own values for them, and its
    recipe decides what to do. They may leave out the frozen entries of a
    fine-tuned model (:func:`tasks.finetune.frozen_names`: every entry but
    its trainable parameters), which keep the node's own backbone values.
    Every other entry must be there.
    """
    with warnings.catch_warnings():
        # The views are read-only; load_state_dict only copies from them.
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        values = {k: torch.from_numpy(array_view(a)) for k, a in arrays.items()}
    saved = load_arrays(state, *PERSONAL_STATE) if personal and state else None
    own = model.state_dict()
    missing = [k for k in own if k not in values]
    if missing and set(missing) <= set(personal).union(frozen_names(model)):
        loaded = model.load_state_dict(values, strict=False)
        if loaded.unexpected_keys:
            raise bounds.ConfigError(
                wire.ARRAYS, sorted(loaded.unexpected_keys), "model entries", "record"
            )
    elif not missing and _plain_copy(model, own, values):
        pass
    else:
        model.load_state_dict(values, strict=True)
    if saved:
        own = {k: torch.as_tensor(saved[k]) for k in personal if k in saved}
        model.load_state_dict(own, strict=False)


def _plain_copy(
    model: nn.Module,
    own: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor],
) -> bool:
    """``load_state_dict(values, strict=True)`` as plain copies, if that is all.

    That is: the same keys and shapes, and no module that loads its own way
    (an override of ``_load_from_state_dict``, like BatchNorm's, or a load
    hook). Else False, and nothing is copied. Half the time of the call.
    """
    if own.keys() != values.keys() or any(own[k].shape != values[k].shape for k in own):
        return False
    for module in model.modules():
        if (
            type(module)._load_from_state_dict is not nn.Module._load_from_state_dict
            or module._load_state_dict_pre_hooks
            or module._load_state_dict_post_hooks
        ):
            return False
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(values[key])
    return True


def unsent_frozen(msg: Message, model: nn.Module) -> list[str]:
    """The model's frozen entries the message leaves out (they never travel).

    Before anything is loaded, the node's frozen entries are checked against
    the digest the server sends (``frozen-digest``, :mod:`tasks.finetune`):
    averaging adapters trained on different backbones would be silently
    wrong, so a node whose backbone differs refuses the message.
    """
    frozen = frozen_names(model)
    if not frozen:
        return []
    config = wire.config_of(msg.content)
    if (expected := config.get(FROZEN_DIGEST)) is not None:
        own = getattr(model, "frozen_digest", None) or frozen_digest(model, frozen)
        if own != expected:
            raise bounds.ConfigError(
                FROZEN_DIGEST,
                f"{str(expected)[:12]}...",
                f"this node's frozen backbone ({own[:12]}...): a different "
                "pretrained model or PEFT setting",
            )
    if wire.ARRAYS not in msg.content:  # a split exchange: no arrays at all
        return frozen
    sent = msg.content[wire.ARRAYS]
    return [k for k in frozen if k not in sent]


def _keep_personal(
    model: nn.Module, personal: Sequence[str], state: MutableMapping
) -> None:
    if personal:
        entries = model.state_dict()
        save_arrays(state, *PERSONAL_STATE, {k: entries[k] for k in personal})


def copy_module(model: nn.Module) -> nn.Module:
    """An independent copy of ``model`` (the lent model is never changed)."""
    return _copy.deepcopy(model)


def _fallback(
    run_config: Mapping[str, Any], defaults: Mapping[str, Any] | None
) -> Mapping[str, Any]:
    """Where a setting the message lacks is read: the run config, then ``defaults``."""
    if not defaults:
        return run_config
    if unknown := sorted(set(defaults) - set(wire.TRAIN_SETTINGS)):
        raise ValueError(
            f"defaults: {unknown} are not local-training settings; "
            f"they are {', '.join(wire.TRAIN_SETTINGS)}."
        )
    return {**defaults, **run_config}


def _base_metrics(context: Context, num_examples: int) -> dict[str, float]:
    metrics: dict[str, float] = {wire.NUM_EXAMPLES: num_examples}
    if wire.PARTITION_ID in context.node_config:
        metrics[wire.PARTITION_ID] = int(context.node_config[wire.PARTITION_ID])
    return metrics


def train_client(
    msg: Message,
    context: Context,
    model: nn.Module,
    data: Data,
    *,
    routine: str | None = None,
    hooks: Sequence[Hook] | None = None,
    extra_hooks: Sequence[Hook] = (),
    defaults: Mapping[str, Any] | None = None,
    optimizer: OptimizerFactory | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_keys: Sequence[str] | None = None,
    poison: Poison | None = None,
) -> Message:
    """Train ``model`` on ``data`` as the server's algorithm asks; build the reply.

    Parameters
    ----------
    msg, context : Message, Context
        What Flower passed to the ClientApp's train handler.
    model : nn.Module
        Your model; its state dict must match the arrays the server sends.
    data : (x, y), Dataset, DataLoader or iterable of batches
        The node's training data (:func:`clientapps.inputs.as_tensors`: read
        once per call; the loop draws seeded batches of ``batch-size``).
    routine : str, optional
        Run this recipe instead of the one the message names.
    hooks : sequence of Hook, optional
        Use these hooks instead of a recipe's (the reply still names the
        routine, so it is your promise that they implement it).
    extra_hooks : sequence of Hook
        Hooks run after the recipe's (e.g. an attack's label flipping).
    defaults : mapping, optional
        Your values of local-training keys (``local-epochs``, ``local-steps``,
        ``batch-size``, ``lr``, ``momentum``, ``weight-decay``, ``optimizer``,
        ``loss``) for where neither the message config nor the run config
        sets them; Bouquet's documented defaults come last.
    optimizer : callable, optional
        ``params -> torch.optim.Optimizer``: your optimizer, in place of the
        one the settings name. Refused (``ValueError``) by routines whose
        math assumes the configured one (SCAFFOLD and the momentum family,
        FedAMD, FedHyper, FedSpeed).
    loss : callable, optional
        ``(logits, y) -> scalar``: your loss, in place of ``loss``'s; the
        algorithm's own terms (FedProx's proximal term, FedLD's margin, ...)
        are added to it.
    batch_keys : (input_key, label_key), optional
        Which entries of a mapping batch are inputs and labels.
    poison : callable, optional
        ``(local, sent) -> arrays``: an attack simulation's model in place of
        the honest one (:meth:`clientapps.attacks.Attack.poison_model`), both
        as ``name -> ndarray``. Applied to what the reply carries, after
        client-side DP clipping and before a compressed uplink encodes the
        update, so attacks compose with compression.

    Raises
    ------
    ConfigError
        A config value or a record the server sent is out of bounds
        (:mod:`clientapps.bounds`); raised before anything is trained or
        stored in ``context.state``.
    ValueError
        ``defaults`` names a key that is not a local-training setting, or
        ``data`` cannot be read as inputs and labels.

    """
    # Validate first: every config value, then (in train_local) the records.
    config = dict(msg.content[wire.CONFIG])
    name = routine_of(msg, routine)
    compressed = uplink.codec(config) is not None
    replies_update = bounds.UPLINK_REPLY.read(config) == "update"
    if hooks is None:
        hooks = get_recipe(name)(config)
    hooks = [*hooks, *extra_hooks]
    settings = TrainSettings.from_config(
        config, _fallback(context.run_config, defaults)
    )
    seed = client_seed(msg, context)
    sent_model = downlink.received_model(msg.content, config, context.state)
    if sent_model is not None:  # a compressed downlink: train from x_hat_t
        msg.content[wire.ARRAYS] = downlink.as_record(sent_model)
    personal = personal_names(msg, model)
    part_sent = None
    if partial_arrays(name):  # part of the model: full shapes, zero elsewhere
        if compressed:
            raise bounds.ConfigError(
                wire.UPLINK_COMPRESSOR,
                config[wire.UPLINK_COMPRESSOR],
                f"'none' for the routine '{name}' (its nodes get part of the model)",
            )
        part_sent = msg.content[wire.ARRAYS]
        skip = {*personal, *frozen_names(model)}
        msg.content[wire.ARRAYS] = partial.expand(part_sent, model, skip)
    frozen = unsent_frozen(msg, model)
    load_model(model, msg.content[wire.ARRAYS], personal, context.state)

    def start_values() -> dict:
        values = {k: array_view(a) for k, a in msg.content[wire.ARRAYS].items()}
        values.update(load_arrays(context.state, *PERSONAL_STATE) or {})
        return values

    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    with seeded_rng(seed, device):
        # Dropout and other global-RNG users (a loader's shuffle and random
        # transforms) draw from the same derived seed.
        x, y = as_tensors(data, batch_keys)
        # DP-SGD (clientapps/privacy.py) when the message asks for it.
        private = private_hooks(config, context.state, len(x), hooks, settings)
        hooks = [*private, *hooks]  # first: its setup seals run.data
        result = train_local(
            model,
            (x, y),
            settings,
            hooks,
            generator=generator,
            config=config,
            state=context.state,
            incoming=msg.content,
            personal=personal,
            frozen=frozen,
            start_values=start_values,
            optimizer=optimizer,
            loss=loss,
        )
    _keep_personal(model, personal, context.state)
    if sent_model is not None:
        downlink.keep(sent_model, config, context.state)
    metrics = _base_metrics(context, result.num_examples)
    if result.steps and not private:  # under DP-SGD a loss is an unprotected release
        metrics[wire.TRAIN_LOSS] = result.loss_mean
        metrics[wire.TRAIN_LOSS_FIRST] = result.loss_first
    metrics.update(result.run.metrics)
    entries = model.state_dict()
    for name_ in (*personal, *frozen):
        del entries[name_]
    records = dict(result.run.reply_records)
    if (clip := bounds.DP_CLIPPING_NORM.read(config)) > 0:
        # Client-side DP (strategies/privacy.py): only the update is clipped.
        if wire.ARRAYS in records:  # the reply is an update (a delta, a gradient)
            records[wire.ARRAYS] = _clipped_update(records[wire.ARRAYS], clip)
        else:
            entries = _clipped_model(entries, msg.content[wire.ARRAYS], clip)
    if compressed and (wire.ARRAYS in records) != replies_update:
        raise bounds.ConfigError(
            wire.UPLINK_COMPRESSOR,
            config[wire.UPLINK_COMPRESSOR],
            f"'none' for the routine '{name}' (its reply's arrays are not the "
            f"{'update' if replies_update else 'model'} the server decodes)",
        )
    sent_arrays = msg.content[wire.ARRAYS]
    if poison is not None and compressed:
        if replies_update:
            raise bounds.ConfigError(
                wire.UPLINK_COMPRESSOR,
                config[wire.UPLINK_COMPRESSOR],
                f"'none' with an attack: the routine '{name}' replies with an "
                "update, and attacks rewrite a model",
            )
        entries = poison(
            {k: v.detach().cpu().numpy() for k, v in entries.items()},
            {k: sent_arrays[k].numpy() for k in entries},
        )
    if compressed:  # extra model-shaped records (SCAFFOLD's dc) as C(r)
        uplink.compress_records(records, config, context.state, seed)
    if compressed and replies_update:  # C(Delta) instead of the routine's Delta
        update = {k: a.numpy() for k, a in records.pop(wire.ARRAYS).items()}
        reply = uplink.compress_reply(update, None, config, context.state, seed)
    elif compressed:  # C(y - x) instead of the model
        reply = uplink.compress_reply(
            entries, msg.content[wire.ARRAYS], config, context.state, seed
        )
    else:
        reply = array_record(entries)
    content = RecordDict(
        {
            wire.ARRAYS: reply,
            wire.METRICS: MetricRecord(metrics),
            wire.CLIENT_INFO: ConfigRecord({wire.ROUTINE: name}),
            **records,
        }
    )
    if poison is not None and not compressed:
        # What the reply carries: the model, or the routine's update.
        carried = content[wire.ARRAYS]
        local = {k: carried[k].numpy() for k in carried.keys()}
        content[wire.ARRAYS] = array_record(
            poison(local, {k: sent_arrays[k].numpy() for k in local})
        )
    if part_sent is not None:  # the reply in the shapes sent
        content[wire.ARRAYS] = partial.shrink(content[wire.ARRAYS], part_sent)
    return Message(content, reply_to=msg)


def split_client(
    msg: Message,
    context: Context,
    model: nn.Module,
    data: Data,
    *,
    batch_keys: Sequence[str] | None = None,
) -> Message:
    """Answer one exchange of split learning inside a train round (``train.split``).

    The first exchange (``split-phase = begin``) carries the round's arrays
    and config and is the routine's own training up to the cut:
    :func:`train_client` runs it, and the reply keeps what the recipe put
    in it (the activations) without the model. The later ones carry
    activations or gradients only; the recipe's ``split_step`` answers them
    from the node's ``Context.state``. The round's own train message comes
    last and is :func:`train_client`'s as always (``strategies/sfprompt.py``).
    """
    config = dict(msg.content[wire.CONFIG])
    name = routine_of(msg)
    step = get_split(name)
    if step is None:
        raise bounds.ConfigError(wire.ROUTINE, name, "a routine with split learning")
    phase = bounds.SPLIT_PHASE.read(config)
    if phase == "train":
        raise bounds.ConfigError(
            wire.SPLIT_PHASE, phase, "begin, tail or step in a train.split message"
        )
    if phase == "begin":
        reply = train_client(msg, context, model, data, batch_keys=batch_keys)
        content = RecordDict(
            {k: v for k, v in reply.content.items() if k != wire.ARRAYS}
        )
        return Message(content, reply_to=msg)
    settings = TrainSettings.from_config(config, context.run_config)
    unsent_frozen(msg, model)  # the backbone's digest
    seed = client_seed(msg, context)
    device = next(model.parameters()).device
    with seeded_rng(seed, device):
        content = step(
            msg, context, model, as_tensors(data, batch_keys), settings, seed
        )
    content[wire.CLIENT_INFO] = ConfigRecord({wire.ROUTINE: name})
    content[wire.METRICS] = MetricRecord({})  # the ClientApp adds client-time
    return Message(content, reply_to=msg)


def _scale(norm: float, clip: float) -> float:
    return min(1.0, clip / norm) if norm > 0 else 1.0


def _clipped_update(record: ArrayRecord, clip: float) -> ArrayRecord:
    """``record`` (an update) scaled to L2 norm at most ``clip``."""
    values = {k: a.numpy().astype(np.float64) for k, a in record.items()}
    factor = _scale(float(np.sqrt(sum(np.sum(v * v) for v in values.values()))), clip)
    return ArrayRecord(
        {
            k: Array(np.asarray(v * factor, dtype=record[k].numpy().dtype))
            for k, v in values.items()
        }
    )


def _clipped_model(
    entries: Mapping[str, torch.Tensor], sent: ArrayRecord, clip: float
) -> dict[str, torch.Tensor]:
    """``x + f (y - x)``: the model whose update from ``sent`` has norm <= ``clip``."""
    start = {k: sent[k].numpy().astype(np.float64) for k in entries}
    update = {k: entries[k].detach().cpu().double().numpy() - start[k] for k in entries}
    factor = _scale(float(np.sqrt(sum(np.sum(u * u) for u in update.values()))), clip)
    if factor == 1.0:
        return dict(entries)
    return {
        k: torch.as_tensor(start[k] + factor * update[k]).to(entries[k].dtype)
        for k in entries
    }


def evaluate_client(
    msg: Message,
    context: Context,
    model: nn.Module,
    data: Data,
    *,
    train_data: Data | None = None,
    batch_keys: Sequence[str] | None = None,
) -> Message:
    """Evaluate the node's model (global arrays, personal entries) on ``data``.

    ``data`` as :func:`train_client`'s; the reply's metrics are
    ``eval-loss`` (cross-entropy), ``eval-accuracy`` and ``num-examples``.

    Where the message names a routine whose recipe defines
    ``evaluation_model`` (FedLoGe's realigned head), that model is the one
    evaluated. With ``finetune-steps`` > 0 (the message config, else the run config),
    a copy of that model is first trained that many plain steps on
    ``train_data`` (the local-training settings as for training, the seed
    derived from the round and the partition) and the copy is evaluated:
    FedAvg + local fine-tuning, for any algorithm. Nothing of it is kept.
    """
    config = wire.config_of(msg.content)
    steps = bounds.FINETUNE_STEPS.read(config, context.run_config)
    personal = personal_names(msg, model)
    unsent_frozen(msg, model)
    load_model(model, msg.content[wire.ARRAYS], personal, context.state)
    if wire.ROUTINE in config:  # the routine evaluates a model of its own
        realign = get_evaluation(bounds.ROUTINE.read(config))
        if realign is not None:
            model = realign(model, config, context.state)
    if steps > 0:
        if train_data is None:
            raise ValueError(
                f"{wire.FINETUNE_STEPS}={steps}: evaluate_client needs train_data."
            )
        model = finetuned(model, train_data, steps, msg, context, batch_keys)
    x, y = as_tensors(data, batch_keys)
    loss, accuracy = evaluate_model(model, x, y)
    metrics = _base_metrics(context, len(x))
    metrics.update({wire.EVAL_LOSS: loss, wire.EVAL_ACCURACY: accuracy})
    if not np.isfinite(loss):
        # A diverged model is a result, not an invalid reply: report it bounded.
        metrics[wire.EVAL_LOSS] = float(np.finfo(np.float32).max)
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


def finetuned(
    model: nn.Module,
    train_data: Data,
    steps: int,
    msg: Message,
    context: Context,
    batch_keys: Sequence[str] | None = None,
) -> nn.Module:
    """A copy of ``model`` after ``steps`` plain local steps on ``train_data``."""
    config = wire.config_of(msg.content)
    settings = TrainSettings.from_config(config, context.run_config)
    settings = dataclasses.replace(settings, epochs=steps, max_steps=steps)
    seed = wire.derive_seed(client_seed(msg, context), wire.FINETUNE_STEPS)
    copy = copy_module(model)
    device = next(copy.parameters()).device
    with seeded_rng(seed, device):
        train_local(
            copy,
            as_tensors(train_data, batch_keys),
            settings,
            generator=torch.Generator().manual_seed(seed),
            config=config,
        )
    return copy


def describe_client(
    msg: Message,
    context: Context,
    labels: torch.Tensor | Data,
    num_classes: int,
    *,
    batch_keys: Sequence[str] | None = None,
) -> Message:
    """Answer a ``data-profile`` query: size and label histogram of the node's data.

    ``labels``: the training labels, or the training data as
    :func:`train_client` takes them. Asynchronous strategies size each
    node's tasks by the size it reports; the participation environment
    links availability to the histogram.
    """
    config = wire.config_of(msg.content)
    query = config.get(wire.QUERY, "")
    if query != wire.DATA_PROFILE:
        raise bounds.ConfigError(wire.QUERY, query, f"'{wire.DATA_PROFILE}'")
    labels = labels_of(labels, batch_keys)
    counts = torch.bincount(labels.long(), minlength=num_classes).tolist()
    metrics: dict = _base_metrics(context, len(labels))
    metrics[wire.LABEL_COUNTS] = [int(c) for c in counts]
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)
