"""Whole runs with hostile or failing nodes: asynchronous updates and data profiles.

The per-round property (invalid replies change nothing) is in
``tests/test_hostile_replies.py``. Here whole runs go through the driver's
event schedule and the data-profile query with a node that lies, repeats
itself, answers messages nobody sent or fails its first task: the run ends,
the model stays finite, and what was dropped is counted.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from bouquet.clientapps.app import app as bouquet_app
from bouquet.serverapps.run import run_server
from bouquet.simulations.inprocess import (
    InProcessGrid,
    app_defaults,
    ensure_task_identity,
    give_id,
)
from bouquet.strategies.profiles import (
    MAX_CLASSES,
    check_profile,
    client_indices,
    query_profiles,
)

HOSTILE = 1000  # the first in-process node


class HostileGrid(InProcessGrid):
    """In-process nodes; node ``HOSTILE``'s replies are forged, and extra
    replies (second answers, answers to messages never sent) are slipped into
    every pull."""

    def __init__(self, *args, forge=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.forge = forge
        self.forged = 0

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        out = []
        for reply in replies:
            if reply.metadata.src_node_id == HOSTILE and self.forge is not None:
                forged = self.forge(reply)
                if forged is not None:
                    self.forged += 1
                    reply = forged
            out.append(reply)
        if replies and not replies[0].has_error():
            twin = Message(
                copy.deepcopy(replies[0].content), reply_to=_sent_to(replies[0])
            )
            stray_to = _sent_to(replies[0])
            give_id(stray_to)
            stray = Message(copy.deepcopy(replies[0].content), reply_to=stray_to)
            out.extend([twin, stray])
        return out


def _sent_to(reply: Message) -> Message:
    """A stand-in for the message ``reply`` answered (same id, node, type)."""
    sent = Message(
        RecordDict(),
        dst_node_id=reply.metadata.src_node_id,
        message_type=reply.metadata.message_type,
    )
    sent.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    return sent


def _forge_train(reply: Message) -> Message | None:
    """NaN arrays, a weight of 1e308, or a huge partition id, in turn."""
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return None
    content = copy.deepcopy(reply.content)
    arrays = {k: a.numpy() for k, a in content["arrays"].items()}
    turn = _forge_train.turn = getattr(_forge_train, "turn", -1) + 1
    if turn % 3 == 0:
        key = next(k for k, v in arrays.items() if v.dtype.kind == "f")
        arrays[key] = np.full_like(arrays[key], np.nan)
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    else:
        metrics = dict(content["metrics"])
        metrics["num-examples" if turn % 3 == 1 else "partition-id"] = (
            1e308 if turn % 3 == 1 else 10**9
        )
        content["metrics"] = MetricRecord(metrics)
    return Message(content, reply_to=_sent_to(reply))


def _forge_profile(reply: Message) -> Message | None:
    """A data profile that lies: partition id 1e9 and inf examples."""
    if reply.metadata.message_type != "query" or reply.has_error():
        return None
    content = copy.deepcopy(reply.content)
    metrics = dict(content["metrics"])
    metrics.update({"partition-id": 10**9, "num-examples": float("inf")})
    content["metrics"] = MetricRecord(metrics)
    return Message(content, reply_to=_sent_to(reply))


def _run(overrides, tmp_path, forge=None, client_app=None, num_nodes=4):
    run_config = {
        **app_defaults(),
        "output-dir": str(tmp_path),
        "local-steps": 2,
        "fraction-evaluate": 0.0,
        **overrides,
    }
    grid = HostileGrid(client_app or bouquet_app, num_nodes, run_config, forge=forge)
    result, path = run_server(grid, run_config, settle=0.0)
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    for key, array in result.arrays.items():
        assert np.isfinite(array.numpy()).all(), key
    return rows, grid


def _both(reply: Message) -> Message | None:
    return _forge_profile(reply) or _forge_train(reply)


@pytest.mark.parametrize("name", ["fedasync", "fedbuff", "fedfix", "fedcompass"])
def test_async_run_survives_a_hostile_node(name, tmp_path):
    rows, grid = _run(
        {
            "algorithm": name,
            "num-server-rounds": 6,
            "device-speeds": "linear",
            f"{name}.importance": "examples",
        },
        tmp_path,
        forge=_both,
    )
    assert grid.forged >= 2  # its profile and at least one update
    assert rows[-1]["round"] == 6
    dropped = sum(r.get("train-dropped", 0) for r in rows)
    assert dropped >= 2  # forged updates, second answers, strays


def test_sync_participation_survives_a_lying_profile(tmp_path):
    rows, grid = _run(
        {
            "algorithm": "fedavg",
            "num-server-rounds": 2,
            "participation": "bernoulli",
            "participation-mean": 0.9,
            "min-train-nodes": 1,
        },
        tmp_path,
        forge=_forge_profile,
    )
    assert grid.forged == 1 and rows[-1]["round"] == 2


def test_fedcompass_node_whose_first_task_fails_gets_work_again(tmp_path):
    failed = set()
    fastest = 1003  # linear speeds: the highest partition id is the fastest

    def flaky(msg, ctx):
        if msg.metadata.message_type == "train" and ctx.node_id not in failed:
            if ctx.node_id == fastest:
                failed.add(ctx.node_id)
                raise RuntimeError("transient failure")
        return bouquet_app(msg, ctx)

    rows, grid = _run(
        {"algorithm": "fedcompass", "num-server-rounds": 4, "device-speeds": "linear"},
        tmp_path,
        client_app=flaky,
    )
    trained = [n for n, kind in grid.calls if kind == "train"]
    assert trained.count(fastest) >= 2 and rows[-1]["round"] == 4


# ---------------------------------------------------------------- profiles --
@pytest.mark.parametrize(
    "metrics",
    [
        None,
        {},
        {"num-examples": float("nan")},
        {"num-examples": float("inf")},
        {"num-examples": 1e30},
        {"num-examples": -1},
        {"num-examples": 2.5},
        {"num-examples": 5, "partition-id": 10**9},
        {"num-examples": 5, "partition-id": [1, 2]},
        {"num-examples": 5, "label-counts": [1, -2]},
        {"num-examples": 5, "label-counts": [1] * (MAX_CLASSES + 1)},
    ],
)
def test_bad_profiles_are_refused(metrics):
    assert isinstance(check_profile(metrics), str)


def test_good_profile_keeps_what_is_read():
    profile = {"num-examples": 5.0, "partition-id": 3, "label-counts": [2, 3], "x": 1}
    assert check_profile(profile) == {
        "num-examples": 5,
        "partition-id": 3,
        "label-counts": [2, 3],
    }


def test_client_indices_fall_back_to_ranks():
    by_pid = {10: {"partition-id": 1}, 11: {"partition-id": 0}}
    assert client_indices(by_pid) == {10: 1, 11: 0}
    # a node without a profile, or an id far beyond the population: ranks
    assert client_indices(by_pid, [10, 11, 12]) == {10: 0, 11: 1, 12: 2}
    far = {10: {"partition-id": 1}, 11: {"partition-id": 10**6}}
    assert client_indices(far) == {10: 0, 11: 1}


# ------------------------------------------- the property, for the query --
class ProfileGrid:
    """Answers data-profile queries: honest nodes truthfully, others as told."""

    def __init__(self, honest: dict[int, dict], hostile: dict[int, str]) -> None:
        self.honest, self.hostile = honest, hostile
        self.replies: dict[str, list[Message]] = {}

    def get_node_ids(self):
        return sorted({*self.honest, *self.hostile})

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            give_id(msg)
            node = msg.metadata.dst_node_id
            truth = MetricRecord(self.honest.get(node, {"num-examples": 7}))
            reply = Message(RecordDict({"metrics": truth}), reply_to=msg)
            kind = self.hostile.get(node)
            out = [reply]
            if kind == "nan":
                reply.content["metrics"] = MetricRecord({"num-examples": float("nan")})
            elif kind == "huge-id":
                reply.content["metrics"] = MetricRecord(
                    {"num-examples": 5, "partition-id": 10**9}
                )
            elif kind == "no-metrics":
                reply.content.pop("metrics")
            elif kind == "error":
                out = [Message(Error(1, "no query handler"), reply_to=msg)]
            elif kind == "other-sender":
                reply.metadata.__dict__["_src_node_id"] = 4242
            elif kind == "stray":  # an answer to a query never sent
                other = Message(
                    RecordDict(), dst_node_id=node, message_type=MessageType.QUERY
                )
                give_id(other)
                out = [Message(RecordDict({"metrics": truth}), reply_to=other)]
            self.replies[msg.metadata.message_id] = out
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [r for i in message_ids for r in self.replies.pop(i, [])]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    hostile=st.dictionaries(
        st.integers(1, 6),
        st.sampled_from(
            ["nan", "huge-id", "no-metrics", "error", "other-sender", "stray"]
        ),
        max_size=6,
    )
)
def test_profile_query_with_hostile_answers_keeps_exactly_the_valid_ones(hostile):
    honest = {
        n: {"num-examples": 10 * n, "partition-id": n - 1, "label-counts": [n, 1]}
        for n in range(1, 7)
        if n not in hostile
    }
    ensure_task_identity()
    grid = ProfileGrid(honest, hostile)
    got = query_profiles(grid, grid.get_node_ids(), timeout=0.2)
    assert got == honest
