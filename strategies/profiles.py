"""Which node is which client: the data-profile query, shared by the server side.

Node ids differ between the in-process runner, Ray and deployment; the
``partition-id`` a node holds does not. Before the first train message, the
server asks every node once (a ``query`` message with ``config["query"] =
"data-profile"``, answered by the ClientApp's query handler) for its
``partition-id``, ``num-examples`` and ``label-counts``. The client index of a
node is its ``partition-id`` when every node reports a distinct one, else the
rank of its sorted node id.

Used by the participation environment (``serverapps/participation.py``) and
the asynchronous driver (simulated device speeds and client importance).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from strategies.driver import Exchange
from tasks import wire
from tasks.wire import DATA_PROFILE
from tasks.wire import QUERY as QUERY_KEY


class ProfileError(RuntimeError):
    """A node did not describe its data (no query handler, or it failed)."""


def query_profiles(
    grid: Grid, node_ids: Iterable[int], timeout: float, group_id: str = "profile"
) -> dict[int, dict[str, Any]]:
    """Ask ``node_ids`` for their data profile; ``node id -> metrics``.

    Raises
    ------
    ProfileError
        If a node answers with an error or does not answer within ``timeout``.

    """
    node_ids = sorted(set(node_ids))
    if not node_ids:
        return {}
    content = RecordDict({wire.CONFIG: ConfigRecord({QUERY_KEY: DATA_PROFILE})})
    queries = [
        Message(
            content, dst_node_id=node, message_type=MessageType.QUERY, group_id=group_id
        )
        for node in node_ids
    ]
    profiles: dict[int, dict[str, Any]] = {}
    for reply in Exchange(grid).round_trip(queries, timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise ProfileError(
                f"Node {node} did not describe its data: {reply.error.reason}"
            )
        profiles[node] = dict(reply.content[wire.METRICS])
    if missing := sorted(set(node_ids) - set(profiles)):
        raise ProfileError(f"No data profile from nodes {missing}.")
    return profiles


def client_indices(profiles: Mapping[int, Mapping[str, Any]]) -> dict[int, int]:
    """``node id -> client index``: the partition id if distinct, else the rank."""
    nodes = sorted(profiles)
    pids = [profiles[n].get(wire.PARTITION_ID) for n in nodes]
    if None not in pids and len(set(pids)) == len(pids):
        return {n: int(p) for n, p in zip(nodes, pids, strict=True)}
    return {n: i for i, n in enumerate(nodes)}
