"""Client routines: what a ClientApp does with a train or evaluate message.

These are the entry points for mixing Bouquet into your own Flower app: your
ClientApp builds its model and data and hands them over::

    @app.train()
    def train(msg, context):
        return train_client(msg, context, MyNet(), (x_train, y_train),
                            algorithm="fedprox")

``train_client`` loads the global arrays, runs the algorithm's recipe of hooks
on the one training loop and packs the reply (full local arrays, metrics with
``num-examples``, plus any extra records the recipe declares). A recipe's
record named ``"arrays"`` replaces the local arrays (e.g. a gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from clientapps.hooks import Hook
from clientapps.loop import TrainSettings, train_local
from clientapps.recipes import get_recipe
from strategies import keys
from strategies.base import derive_seed
from tasks.evaluation import evaluate_model

Data = tuple[torch.Tensor, torch.Tensor]


def client_seed(msg: Message, context: Context) -> int:
    """This node's seed for this round: derived from (seed, round, partition-id)."""
    config = msg.content[keys.CONFIG]
    partition = int(context.node_config.get(keys.PARTITION_ID, 0))
    seed = int(config.get(keys.SEED, 0))
    return derive_seed(seed, int(config.get(keys.SERVER_ROUND, 0)), partition)


def hooks_for(algorithm: str, config: dict) -> list[Hook]:
    """The recipe of ``algorithm`` (from the registry), instantiated for ``config``."""
    from strategies.registry import get_algorithm

    return get_recipe(get_algorithm(algorithm).client)(config)


def _load(model: nn.Module, arrays: ArrayRecord) -> None:
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)


def _base_metrics(context: Context, num_examples: int) -> dict[str, float]:
    metrics: dict[str, float] = {keys.NUM_EXAMPLES: num_examples}
    if keys.PARTITION_ID in context.node_config:
        metrics[keys.PARTITION_ID] = int(context.node_config[keys.PARTITION_ID])
    return metrics


def train_client(
    msg: Message,
    context: Context,
    model: nn.Module,
    data: Data,
    *,
    algorithm: str | None = None,
    hooks: Sequence[Hook] | None = None,
    extra_hooks: Sequence[Hook] = (),
) -> Message:
    """Train ``model`` on ``data`` as ``algorithm``'s client and build the reply.

    Parameters
    ----------
    msg, context : Message, Context
        What Flower passed to the ClientApp's train handler.
    model : nn.Module
        Your model; its state dict must match the arrays the server sends.
    data : (x, y)
        Local training tensors.
    algorithm : str, optional
        Registry name; defaults to ``context.run_config["algorithm"]``.
    hooks : sequence of Hook, optional
        Use these hooks instead of the algorithm's recipe.
    extra_hooks : sequence of Hook
        Hooks run after the recipe's (e.g. an attack's label flipping).

    """
    config = dict(msg.content[keys.CONFIG])
    if hooks is None:
        name = algorithm or str(context.run_config.get("algorithm", "fedavg"))
        hooks = hooks_for(name, config)
    hooks = [*hooks, *extra_hooks]
    _load(model, msg.content[keys.ARRAYS])
    generator = torch.Generator().manual_seed(client_seed(msg, context))
    with torch.random.fork_rng(devices=[]):
        # Dropout and other global-RNG users draw from the same derived seed.
        torch.manual_seed(client_seed(msg, context))
        result = train_local(
            model,
            data,
            TrainSettings.from_config(config),
            hooks,
            generator=generator,
            config=config,
            state=context.state,
            incoming=msg.content,
        )
    metrics = _base_metrics(context, result.num_examples)
    if result.steps:
        metrics[keys.TRAIN_LOSS] = result.loss_mean
        metrics[keys.TRAIN_LOSS_FIRST] = result.loss_first
    metrics.update(result.run.metrics)
    content = RecordDict(
        {
            keys.ARRAYS: ArrayRecord(model.state_dict()),
            keys.METRICS: MetricRecord(metrics),
            **result.run.reply_records,
        }
    )
    return Message(content, reply_to=msg)


def evaluate_client(
    msg: Message, context: Context, model: nn.Module, data: Data
) -> Message:
    """Evaluate the global arrays on ``data``; reply with loss and accuracy."""
    _load(model, msg.content[keys.ARRAYS])
    loss, accuracy = evaluate_model(model, *data)
    metrics = _base_metrics(context, len(data[0]))
    metrics.update({keys.EVAL_LOSS: loss, keys.EVAL_ACCURACY: accuracy})
    if not np.isfinite(loss):
        # A diverged model is a result, not an invalid reply: report it bounded.
        metrics[keys.EVAL_LOSS] = float(np.finfo(np.float32).max)
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=msg)


def describe_client(
    msg: Message, context: Context, labels: torch.Tensor, num_classes: int
) -> Message:
    """Answer a ``data-profile`` query: size and label histogram of the node's data."""
    config = msg.content.config_records.get(keys.CONFIG, {})
    query = config.get("query", "")
    if query != "data-profile":
        raise ValueError(f"Unknown query {query!r}; this app answers 'data-profile'.")
    counts = torch.bincount(labels.long(), minlength=num_classes).tolist()
    metrics: dict = _base_metrics(context, len(labels))
    metrics[keys.LABEL_COUNTS] = [int(c) for c in counts]
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=msg)
