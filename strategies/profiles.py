"""Which node is which client: the data-profile query, shared by the server side.

Node ids differ between the in-process runner, Ray and deployment; the
``partition-id`` a node holds does not. Before the first train message, the
server asks every node once (a ``query`` message with ``config["query"] =
"data-profile"``, answered by the ClientApp's query handler) for its
``partition-id``, ``num-examples`` and ``label-counts``. The client index of a
node is its ``partition-id`` when every node reports a distinct one, else the
rank of its sorted node id.

Profiles are what clients claim, so each is checked (:func:`check_profile`)
and a node whose profile is missing or invalid is named in a warning and left
without one; the run goes on.

Used by the participation environment (``serverapps/participation.py``) and
the asynchronous driver (simulated device speeds and client importance).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from bouquet.strategies.driver import Exchange
from bouquet.strategies.validation import (
    MAX_NUM_EXAMPLES,
    MAX_PARTITION_ID,
    Sent,
    count,
)
from bouquet.tasks import wire
from bouquet.tasks.wire import DATA_PROFILE
from bouquet.tasks.wire import QUERY as QUERY_KEY

MAX_CLASSES = 10_000
"""Longest ``label-counts`` list a data profile may hold."""

INDEX_SPREAD = 16
"""Partition ids are used as client indices only while the largest is below
``INDEX_SPREAD * nodes + 64``: per-client arrays are sized by the largest
index, and a forged id must not size them."""


def check_profile(metrics: Any) -> dict[str, Any] | str:
    """The usable part of a data profile, or why it cannot be used.

    ``partition-id`` (optional) is an integer in ``[0, MAX_PARTITION_ID]``;
    ``num-examples`` an integer in ``[0, MAX_NUM_EXAMPLES]``; ``label-counts``
    (optional) a list of at most :data:`MAX_CLASSES` such integers. Other keys
    are left out.
    """
    if not isinstance(metrics, Mapping):
        return "no metric record"
    profile: dict[str, Any] = {}
    pid = metrics.get(wire.PARTITION_ID)
    if pid is not None:
        if count(pid, 0, MAX_PARTITION_ID) is None:
            return f"'{wire.PARTITION_ID}' is not an integer in [0, {MAX_PARTITION_ID}]"
        profile[wire.PARTITION_ID] = int(pid)
    examples = count(metrics.get(wire.NUM_EXAMPLES), 0, MAX_NUM_EXAMPLES)
    if examples is None:
        return f"'{wire.NUM_EXAMPLES}' is not an integer in [0, {MAX_NUM_EXAMPLES}]"
    profile[wire.NUM_EXAMPLES] = examples
    labels = metrics.get(wire.LABEL_COUNTS)
    if labels is not None:
        values = labels if isinstance(labels, list) else [labels]
        counts = [count(v, 0, MAX_NUM_EXAMPLES) for v in values]
        if len(values) > MAX_CLASSES or None in counts:
            return f"'{wire.LABEL_COUNTS}' is not a list of counts"
        profile[wire.LABEL_COUNTS] = counts
    return profile


def query_profiles(
    grid: Grid, node_ids: Iterable[int], timeout: float, group_id: str = "profile"
) -> dict[int, dict[str, Any]]:
    """Ask ``node_ids`` for their data profile; ``node id -> profile``.

    Only valid answers (:func:`check_profile`) from the node asked, one per
    node, are kept; a node that fails, does not answer within ``timeout`` or
    answers nonsense is left out, and a warning names it and why.
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
    exchange = Exchange(grid)
    replies = exchange.round_trip(queries, timeout)
    sent = Sent.of(queries)
    profiles: dict[int, dict[str, Any]] = {}
    refused: dict[int, str] = {}
    for reply in replies:
        expected = sent.get(reply.metadata.reply_to_message_id)
        if expected is None or expected.node in profiles:
            continue  # not a query of ours, or a second answer
        node = expected.node
        if reply.has_error():
            refused[node] = f"error ({reply.error.reason})"
        elif int(reply.metadata.src_node_id) != node:
            refused[node] = f"answered by node {reply.metadata.src_node_id}"
        else:
            metrics = reply.content.metric_records.get(wire.METRICS)
            checked = check_profile(metrics)
            if isinstance(checked, str):
                refused[node] = checked
            else:
                profiles[node] = checked
                refused.pop(node, None)
    for node in node_ids:
        if node not in profiles and node not in refused:
            refused[node] = f"no answer within {timeout:g}s"
    for node, why in sorted(refused.items()):
        log(WARNING, "Node %s did not describe its data: %s.", node, why)
    return profiles


def client_indices(
    profiles: Mapping[int, Mapping[str, Any]], nodes: Iterable[int] | None = None
) -> dict[int, int]:
    """``node id -> client index``: the partition id if usable, else the rank.

    Partition ids are used when every node of ``nodes`` (default: those with
    a profile) reports one, all distinct and below ``INDEX_SPREAD * n + 64``.
    """
    nodes = sorted(profiles if nodes is None else nodes)
    pids = [profiles.get(n, {}).get(wire.PARTITION_ID) for n in nodes]
    if (
        None not in pids
        and len(set(pids)) == len(pids)
        and max(pids, default=0) < INDEX_SPREAD * len(nodes) + 64
    ):
        return {n: int(p) for n, p in zip(nodes, pids, strict=True)}
    return {n: i for i, n in enumerate(nodes)}
