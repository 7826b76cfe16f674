"""The Bouquet ClientApp: one app for every algorithm.

The message names the client routine the server's algorithm needs
(``config["client-routine"]``, see :mod:`clientapps.routine`); the model and
the node's data come from ``tasks/`` as the run config and the node config
(``partition-id`` / ``num-partitions``, or a ``data-path``) say; a resumed run's
message carries the saved values of keys that differ from ``context.run_config``
(``wire.RUN_CONFIG``), and those win (:func:`run_config_of`). Heavy imports
happen inside the handlers so that starting a ClientApp process stays cheap,
and nothing here imports the server side.

Train and evaluate replies carry ``client-time``: the handler's seconds (data,
model, the work, the reply), so a round's latency can be split into the
ClientApp's share and the transport's (``simulations/bench_deployment.py``).
"""

import contextlib
import functools
import time
from collections.abc import Iterator, Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

if __package__ == "clientapps":
    # Flower imported this entry from the app's folder (``flwr run .``): every
    # ``bouquet.*`` import below must load this same copy (bouquet.tasks.fab).
    from tasks.fab import name_this_copy_bouquet

    name_this_copy_bouquet()

from bouquet.tasks import flower_engine  # (after the naming above)

flower_engine.install()  # only acts inside Flower's simulation engine

app = ClientApp()


def run_config_of(msg: Message, context: Context) -> Mapping[str, Any]:
    """The run config: Flower's, with the values a resumed run restored."""
    from bouquet.tasks import wire

    restored = wire.config_of(msg.content, wire.RUN_CONFIG)
    return {**context.run_config, **restored} if restored else context.run_config


def _spec_and_data(run_config: Mapping[str, Any], node_config: Mapping[str, Any]):  # noqa: ANN202
    from bouquet.tasks import DataSpec, load_client_data

    spec = DataSpec.from_run_config(
        {**run_config, **{k: v for k, v in node_config.items() if k == "data-path"}},
        num_partitions=int(node_config.get("num-partitions", 1)),
    )
    return spec, load_client_data(spec, int(node_config.get("partition-id", 0)))


def _timed(reply: Message, start: float) -> Message:
    from bouquet.tasks import wire

    if reply.has_content() and (metrics := wire.metrics_of(reply.content)) is not None:
        metrics[wire.CLIENT_TIME] = time.perf_counter() - start
    return reply


@contextlib.contextmanager
def _model_and_data(
    run_config: Mapping[str, Any], context: Context, msg: Message | None = None
) -> Iterator[tuple[Any, Any, int]]:
    """The node's data and a model lent for this call (``tasks.memo``).

    The model is the run config's (:func:`tasks.finetune.build_task_model`),
    in the wrapper the message's algorithm asks for (``config["model-wrapper"]``,
    checked against its bound).
    """
    from bouquet.clientapps.bounds import MODEL_WRAPPER
    from bouquet.tasks import dataset_info, resolve_device, wire
    from bouquet.tasks.finetune import DEFAULTS, build_task_model, frozen_digest
    from bouquet.tasks.memo import MODELS

    wrapper = MODEL_WRAPPER.read(wire.config_of(msg.content) if msg else {})

    spec, data = _spec_and_data(run_config, context.node_config)
    info = dataset_info(spec)
    device = resolve_device(str(run_config.get("device", "cpu")))
    shape = {k: run_config.get(k) for k in ("model", "model-norm", "seed", "dataset")}
    shape.update({k: run_config.get(k, v) for k, v in DEFAULTS.items()})

    def build() -> Any:
        # Both handlers load the global arrays into every parameter and buffer
        # (a fine-tuned model: every trainable one; its backbone is built here).
        model = build_task_model(run_config, info, initialize=False, wrapper=wrapper)
        model.frozen_digest = frozen_digest(model)
        return model.to(device)

    key = (
        context.run_id,
        repr(sorted(shape.items())),
        str(device),
        repr(info),
        wrapper,
    )
    with MODELS.borrow(key, build) as model:
        yield model, data, info.num_classes


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training with the run's algorithm (and the run's attack, if any)."""
    start = time.perf_counter()
    from bouquet.clientapps import capture
    from bouquet.clientapps.attacks import attack_for_node
    from bouquet.clientapps.routine import client_seed, train_client

    run_config = run_config_of(msg, context)
    # audit-capture (tasks/capture.py): records the batches, changes nothing.
    recorder = capture.recorder(msg, context, run_config)
    with _model_and_data(run_config, context, msg) as (model, data, num_classes):
        attack = attack_for_node(
            run_config, context.node_config, context.node_id, num_classes
        )
        poison = None
        if attack is not None and attack.rewrites_model:
            # Applied inside train_client, before a compressed uplink encodes it.
            poison = functools.partial(
                attack.poison_model,
                state=context.state,
                seed=client_seed(msg, context),
            )

        reply = train_client(
            msg,
            context,
            model,
            (data.train_x, data.train_y),
            extra_hooks=(
                *(attack.hooks() if attack else ()),
                *((recorder,) if recorder else ()),
            ),
            poison=poison,
        )
    if attack is not None and not attack.rewrites_model:
        # FRL's rank reversal rewrites its rankings record, not the model.
        attack.poison(reply, msg, context.state, client_seed(msg, context))
    if recorder is not None:
        capture.save(recorder, msg, reply, run_config)
    return _timed(reply, start)


@app.train("split")  # tasks.wire.SPLIT_ACTION (this module imports lazily)
def split(msg: Message, context: Context) -> Message:
    """One exchange of split learning inside a train round (SFPrompt)."""
    start = time.perf_counter()
    from bouquet.clientapps.routine import split_client

    run_config = run_config_of(msg, context)
    with _model_and_data(run_config, context, msg) as (model, data, _):
        reply = split_client(msg, context, model, (data.train_x, data.train_y))
    return _timed(reply, start)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the node's held-out split."""
    from bouquet.clientapps.routine import evaluate_client

    start = time.perf_counter()
    run_config = run_config_of(msg, context)
    with _model_and_data(run_config, context, msg) as (model, data, _):
        reply = evaluate_client(
            msg,
            context,
            model,
            (data.test_x, data.test_y),
            train_data=(data.train_x, data.train_y),
        )
    return _timed(reply, start)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Describe the node's data (partition id, size, label histogram).

    Asked once per run by the participation environment
    (``serverapps/participation.py``) to link availability to data.
    """
    from bouquet.clientapps.routine import describe_client
    from bouquet.tasks import dataset_info

    spec, data = _spec_and_data(run_config_of(msg, context), context.node_config)
    return describe_client(msg, context, data.train_y, dataset_info(spec).num_classes)
