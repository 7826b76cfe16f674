"""Client routines: what a ClientApp does with a train, evaluate or query message.

These are the entry points for mixing Bouquet into your own Flower app: your
ClientApp builds its model and data and hands them over::

    @app.train()
    def train(msg, context):
        return train_client(msg, context, MyNet(), (x_train, y_train))

    @app.evaluate()
    def evaluate(msg, context):
        return evaluate_client(msg, context, MyNet(), (x_test, y_test))

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

from collections.abc import Mapping, MutableMapping, Sequence

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from torch import nn

from clientapps import bounds
from clientapps.hooks import Hook
from clientapps.loop import TrainSettings, train_local
from clientapps.recipes import get_recipe
from clientapps.state import load_arrays, save_arrays
from tasks import wire
from tasks.evaluation import evaluate_model

Data = tuple[torch.Tensor, torch.Tensor]

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
    config = msg.content.config_records.get(wire.CONFIG, {})
    return bounds.ROUTINE.read(config)


def personal_names(msg: Message, model: nn.Module) -> list[str]:
    """The model's entries the message's config makes personal."""
    config = msg.content.config_records.get(wire.CONFIG, {})
    return wire.resolve_personal(bounds.patterns(config), list(model.state_dict()))


def load_model(
    model: nn.Module,
    arrays: ArrayRecord,
    personal: Sequence[str] = (),
    state: Mapping | None = None,
) -> None:
    """Load the global ``arrays`` into ``model``, then the node's personal entries."""
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
    if not personal or state is None:
        return
    saved = load_arrays(state, *PERSONAL_STATE)
    if saved:
        own = {k: torch.as_tensor(saved[k]) for k in personal if k in saved}
        model.load_state_dict(own, strict=False)


def _keep_personal(
    model: nn.Module, personal: Sequence[str], state: MutableMapping
) -> None:
    if personal:
        entries = model.state_dict()
        save_arrays(state, *PERSONAL_STATE, {k: entries[k] for k in personal})


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
) -> Message:
    """Train ``model`` on ``data`` as the server's algorithm asks; build the reply.

    Parameters
    ----------
    msg, context : Message, Context
        What Flower passed to the ClientApp's train handler.
    model : nn.Module
        Your model; its state dict must match the arrays the server sends.
    data : (x, y)
        Local training tensors.
    routine : str, optional
        Run this recipe instead of the one the message names.
    hooks : sequence of Hook, optional
        Use these hooks instead of a recipe's (the reply still names the
        routine, so it is your promise that they implement it).
    extra_hooks : sequence of Hook
        Hooks run after the recipe's (e.g. an attack's label flipping).

    Local-training settings come from the message config, else the run
    config, else :class:`~clientapps.loop.TrainSettings`' defaults.

    Raises
    ------
    ConfigError
        A config value or a record the server sent is out of bounds
        (:mod:`clientapps.bounds`); raised before anything is trained or
        stored in ``context.state``.

    """
    # Validate first: every config value, then (in train_local) the records.
    config = dict(msg.content[wire.CONFIG])
    name = routine_of(msg, routine)
    if hooks is None:
        hooks = get_recipe(name)(config)
    hooks = [*hooks, *extra_hooks]
    settings = TrainSettings.from_config(config, context.run_config)
    seed = client_seed(msg, context)
    personal = personal_names(msg, model)
    load_model(model, msg.content[wire.ARRAYS], personal, context.state)

    def start_values() -> dict:
        values = {k: a.numpy() for k, a in msg.content[wire.ARRAYS].items()}
        values.update(load_arrays(context.state, *PERSONAL_STATE) or {})
        return values

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        # Dropout and other global-RNG users draw from the same derived seed.
        torch.manual_seed(seed)
        result = train_local(
            model,
            data,
            settings,
            hooks,
            generator=generator,
            config=config,
            state=context.state,
            incoming=msg.content,
            personal=personal,
            start_values=start_values,
        )
    _keep_personal(model, personal, context.state)
    metrics = _base_metrics(context, result.num_examples)
    if result.steps:
        metrics[wire.TRAIN_LOSS] = result.loss_mean
        metrics[wire.TRAIN_LOSS_FIRST] = result.loss_first
    metrics.update(result.run.metrics)
    entries = model.state_dict()
    for name_ in personal:
        del entries[name_]
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(entries),
            wire.METRICS: MetricRecord(metrics),
            wire.CLIENT_INFO: ConfigRecord({wire.ROUTINE: name}),
            **result.run.reply_records,
        }
    )
    return Message(content, reply_to=msg)


def evaluate_client(
    msg: Message, context: Context, model: nn.Module, data: Data
) -> Message:
    """Evaluate the node's model (global arrays, personal entries) on ``data``."""
    personal = personal_names(msg, model)
    load_model(model, msg.content[wire.ARRAYS], personal, context.state)
    loss, accuracy = evaluate_model(model, *data)
    metrics = _base_metrics(context, len(data[0]))
    metrics.update({wire.EVAL_LOSS: loss, wire.EVAL_ACCURACY: accuracy})
    if not np.isfinite(loss):
        # A diverged model is a result, not an invalid reply: report it bounded.
        metrics[wire.EVAL_LOSS] = float(np.finfo(np.float32).max)
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)


def describe_client(
    msg: Message, context: Context, labels: torch.Tensor, num_classes: int
) -> Message:
    """Answer a ``data-profile`` query: size and label histogram of the node's data."""
    config = msg.content.config_records.get(wire.CONFIG, {})
    query = config.get(wire.QUERY, "")
    if query != wire.DATA_PROFILE:
        raise bounds.ConfigError(wire.QUERY, query, f"'{wire.DATA_PROFILE}'")
    counts = torch.bincount(labels.long(), minlength=num_classes).tolist()
    metrics: dict = _base_metrics(context, len(labels))
    metrics[wire.LABEL_COUNTS] = [int(c) for c in counts]
    return Message(RecordDict({wire.METRICS: MetricRecord(metrics)}), reply_to=msg)
