"""The in-process runner: a Grid that calls the ClientApp in this process.

For tests and fast debugging. Every node has one persistent ``Context`` (its
``state`` survives rounds, as in Flower's engines), ``node_config`` holds
``partition-id`` / ``num-partitions`` as in simulation, and messages are
copied both ways so neither side can alias the other's records or arrays
(:func:`separate`: new objects, the arrays' immutable bytes shared). A
ClientApp that raises produces an error reply, as in Flower. Node ids are
fixed (``1000 + partition-id``) so sampling replays across runs. ClientApp calls run
on one torch thread by default, like a Ray actor with one CPU.

``run_inprocess({"algorithm": "fedprox"}, num_nodes=10)`` runs the real
ServerApp logic (:func:`serverapps.run.run_server`) against it, with the
run-config defaults read from ``pyproject.toml``.
"""

from __future__ import annotations

import contextlib
import copy
import tomllib
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
CLIENT_APP_EXCEPTION = 2  # Flower's error code for an exception in a ClientApp


def ensure_task_identity() -> None:
    """Give this process the identity Flower's runtime would (messages need it).

    Outside Flower's ServerApp process, ``Message(...)`` cannot be built until
    ``TaskIdentity`` holds a run and node id; values already set are kept.
    """
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("task_id", 1), ("run_id", 1), ("node_id", SUPERLINK_NODE_ID)):
        if getattr(TaskIdentity, f"_{name}") is None:
            setattr(TaskIdentity, name, value)


def flatten_config(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested tables to ``"<table>.<key>"`` keys, as Flower's run config."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def app_defaults(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """The run-config defaults of ``pyproject.toml``, flattened as Flower does."""
    return flatten_config(
        tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    )


@contextlib.contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Run ClientApp calls on ``count`` threads, as a Ray actor with that many CPUs.

    Float reductions depend on the thread count: with one thread the default
    10-round run gives exactly Ray's central accuracy every round
    (``client-resources-num-cpus=1``); with torch's default thread count the
    last-bit differences compound and show from round 9.
    """
    import torch

    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def give_id(msg: Message) -> str:
    """Give ``msg`` a fresh message id, as a grid does when it pushes it.

    Acceptance matches replies to the ids of the messages sent; a message
    built but not pushed (a test, a benchmark) has none yet.
    """
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return msg.metadata.message_id


def separate(content: RecordDict) -> RecordDict:
    """A copy of ``content`` that shares nothing mutable with it.

    Arrays' bytes are immutable and shared; every record and ``Array`` object
    is new, so neither side can change what the other holds (as with Flower's
    engines, which serialise). A deep copy would copy every byte too.
    """
    out = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = out[name] = ArrayRecord()  # (given a dict, it copies twice)
            for k, a in record.items():
                # A new Array over the same immutable fields (bytes, tuple):
                # a third of the cost of Array(dtype, shape, stype, data).
                arrays[k] = copy.copy(a)
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            # Values are scalars, strings, bytes or lists of them.
            out[name] = type(record)(
                {k: list(v) if isinstance(v, list) else v for k, v in record.items()}
            )
        else:
            out[name] = copy.deepcopy(record)
    return out


class InProcessGrid(Grid):
    """A Grid over ``num_nodes`` in-process nodes running ``client_app``."""

    def __init__(
        self,
        client_app: ClientApp | Callable[[Message, Context], Message],
        num_nodes: int,
        run_config: Mapping[str, Any],
        node_configs: list[dict[str, Any]] | None = None,
        client_threads: int | None = 1,
    ) -> None:
        ensure_task_identity()
        self.client_threads = client_threads
        self._client_app = client_app
        configs = node_configs or [
            {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)
        ]
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, cfg in enumerate(configs)
        }
        self._replies: dict[str, Message] = {}
        self.calls: list[tuple[int, str]] = []  # (node id, message type), in order

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError("The in-process grid has no Flower Run object.")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node now; the reply waits for a pull."""
        ids = []
        with _torch_threads(self.client_threads):
            for msg in messages:
                give_id(msg)
                node = msg.metadata.dst_node_id
                self.calls.append((node, msg.metadata.message_type))
                delivered = Message(
                    content=separate(msg.content),
                    metadata=copy.deepcopy(msg.metadata),
                )
                try:
                    reply = self._client_app(delivered, self.contexts[node])
                    reply = Message(separate(reply.content), reply_to=msg)
                except Exception as err:  # Flower turns these into error replies
                    reply = Message(
                        Error(CLIENT_APP_EXCEPTION, f"{type(err).__name__}: {err}"),
                        reply_to=msg,
                    )
                self._replies[msg.metadata.message_id] = reply
                ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies to ``message_ids`` that have not been pulled yet."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull every reply (calls are synchronous)."""
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(
    overrides: Mapping[str, Any] | None = None,
    num_nodes: int = 10,
    client_app: ClientApp | None = None,
) -> tuple[Result, Path, InProcessGrid]:
    """Run the Bouquet ServerApp logic against ``num_nodes`` in-process nodes."""
    from bouquet.clientapps.app import app as bouquet_client_app
    from bouquet.serverapps.run import run_server

    run_config = {**app_defaults(), **(overrides or {})}
    grid = InProcessGrid(client_app or bouquet_client_app, num_nodes, run_config)
    result, path = run_server(
        grid, run_config, settle=0.0, overrides=dict(overrides or {})
    )
    return result, path, grid
