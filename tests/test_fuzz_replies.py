"""Fuzzed replies against every registered strategy (issue #4, failure handling 5).

For each algorithm, one real round of replies is produced by the real ClientApp
(in-process, round 2, after a real round 1 so that strategy state exists).
Hypothesis then corrupts some of them (NaN/Inf, huge values, wrong shapes and
dtypes, empty arrays, missing or extra records and keys, wrong metric types,
error replies) and the test checks, against a fresh strategy in the same
state:

- no exception escapes ``aggregate_train``;
- the result equals the result over the uncorrupted replies alone, so rejected
  replies leave the global arrays unchanged (and with none left, there is no
  update at all);
- the result is finite.

Parametrised over the registry: a new algorithm gets this test the day it lands.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serverapps.run import build_strategy
from serverapps.settings import TRAIN_CONFIG_KEYS, setting
from simulations.inprocess import InProcessGrid, app_defaults, run_inprocess
from strategies.aggregation import to_record
from strategies.registry import list_algorithms
from strategies.state import load_state

NODES = 3
CONFIG = {
    "num-server-rounds": 1,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "min-train-nodes": 1,
    "model": "cnn",  # float arrays and a 0-d integer buffer
    "local-steps": 2,
    "seed": 11,
}


class Scenario:
    """Round 2 of a real run: the strategy state after round 1 and real replies."""

    def __init__(self, name: str, output_dir: str) -> None:
        from clientapps.app import app

        self.run_config = {**app_defaults(), **CONFIG, "algorithm": name}
        self.run_config["output-dir"] = output_dir
        _, path, _ = run_inprocess(self.run_config, num_nodes=NODES)
        self.state = load_state(path / "checkpoint")
        self.grid = InProcessGrid(app, NODES, self.run_config)
        _, messages = self.fresh()
        self.replies = list(self.grid.send_and_receive(messages))

    def fresh(self) -> tuple[object, list[Message]]:
        """A strategy in the state after round 1, with its round-2 messages sent."""
        strategy = build_strategy(self.run_config)
        strategy.load_state(copy.deepcopy(self.state.strategy))
        config = ConfigRecord(
            {k: setting(self.run_config, k) for k in TRAIN_CONFIG_KEYS}
        )
        config["num-server-rounds"] = 2
        messages = list(
            strategy.configure_train(2, to_record(self.state.arrays), config, self.grid)
        )
        return strategy, messages


@functools.cache
def _scenario(name: str, output_dir: str) -> Scenario:
    return Scenario(name, output_dir)


# ------------------------------------------------------------- corruptions --
def _float_keys(record: ArrayRecord) -> list[str]:
    return [k for k, a in record.items() if np.dtype(a.dtype).kind == "f"]


def _replace_array(
    content: RecordDict, pick: int, change: Callable[[np.ndarray], np.ndarray]
) -> None:
    record = content["arrays"]
    names = _float_keys(record)
    name = names[pick % len(names)]
    arrays = {k: a.numpy() for k, a in record.items()}
    arrays[name] = change(arrays[name].copy())
    content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _mislabel(content: RecordDict, pick: int) -> None:
    """Declare an array as it was sent, but ship other bytes (int64, or fewer)."""
    import io

    record = content["arrays"]
    names = _float_keys(record)
    name = names[pick % len(names)]
    original = record[name]
    payload = original.numpy().astype(np.int64)
    if pick % 2:
        payload = payload.reshape(-1)[:-1]
    buffer = io.BytesIO()
    np.save(buffer, payload, allow_pickle=False)
    record[name] = Array(
        dtype=original.dtype,
        shape=tuple(original.shape),
        stype=original.stype,
        data=buffer.getvalue(),
    )


def _poke(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(a: np.ndarray) -> np.ndarray:
        a.reshape(-1)[0] = value
        return a

    return change


def _set_metrics(content: RecordDict, **metrics: object) -> None:
    values = dict(content["metrics"])
    values.update(metrics)
    content["metrics"] = MetricRecord(
        {k: v for k, v in values.items() if v is not None}
    )


CORRUPTIONS: dict[str, Callable[[RecordDict, int], RecordDict | None]] = {
    "nan": lambda c, i: _replace_array(c, i, _poke(np.nan)),
    "inf": lambda c, i: _replace_array(c, i, _poke(-np.inf)),
    "huge": lambda c, i: _replace_array(c, i, _poke(3e30)),
    "shape": lambda c, i: _replace_array(c, i, lambda a: a.reshape(-1)[:-1]),
    "flat": lambda c, i: _replace_array(c, i, lambda a: a.reshape(-1, 1)),
    "dtype": lambda c, i: _replace_array(c, i, lambda a: a.astype(np.float64)),
    "int-dtype": lambda c, i: _replace_array(c, i, lambda a: a.astype(np.int32)),
    "empty": lambda c, i: _replace_array(c, i, lambda a: np.empty(0, a.dtype)),
    "declared-not-sent": _mislabel,
    "missing-key": lambda c, i: c["arrays"].pop(
        list(c["arrays"].keys())[i % len(c["arrays"])]
    ),
    "extra-key": lambda c, i: c["arrays"].__setitem__(
        "junk", Array(np.zeros(3, np.float32))
    ),
    "missing-record": lambda c, i: c.pop("arrays"),
    "extra-record": lambda c, i: c.__setitem__(
        "junk", ArrayRecord({"x": Array(np.zeros(2, np.float32))})
    ),
    "metrics-as-config": lambda c, i: c.__setitem__(
        "metrics", ConfigRecord({"num-examples": "many"})
    ),
    "no-weight": lambda c, i: _set_metrics(c, **{"num-examples": None}),
    "zero-weight": lambda c, i: _set_metrics(c, **{"num-examples": 0}),
    "negative-weight": lambda c, i: _set_metrics(c, **{"num-examples": -5}),
    "list-weight": lambda c, i: _set_metrics(c, **{"num-examples": [1, 2]}),
    "nan-metric": lambda c, i: _set_metrics(c, **{"train-loss": float("nan")}),
    "empty-content": lambda c, i: None,
    "error": lambda c, i: None,
}


def _corrupt(reply: Message, sent: Message, kind: str, pick: int) -> Message:
    if kind == "error":
        return Message(Error(3, "ClientApp raised"), reply_to=sent)
    content = RecordDict() if kind == "empty-content" else copy.deepcopy(reply.content)
    if kind != "empty-content":
        CORRUPTIONS[kind](content, pick)
    return Message(content, reply_to=sent)


def _arrays(record: ArrayRecord | None) -> dict[str, np.ndarray] | None:
    return None if record is None else {k: a.numpy() for k, a in record.items()}


@pytest.mark.parametrize("name", list_algorithms())
def test_corrupted_replies_are_dropped_and_change_nothing(name, tmp_path_factory):
    scenario = _scenario(name, str(tmp_path_factory.mktemp(f"fuzz-{name}")))
    replies = scenario.replies
    assert len(replies) == NODES and not any(r.has_error() for r in replies)

    @settings(
        max_examples=12,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        bad=st.lists(
            st.tuples(
                st.integers(0, NODES - 1),
                st.sampled_from(sorted(CORRUPTIONS)),
                st.integers(0, 1000),
            ),
            min_size=1,
            max_size=NODES,
            unique_by=lambda t: t[0],
        )
    )
    def check(bad: list[tuple[int, str, int]]) -> None:
        strategy, messages = scenario.fresh()
        sent = {m.metadata.dst_node_id: m for m in messages}
        corrupted = {i: (kind, pick) for i, kind, pick in bad}
        mixed, clean = [], []
        for i, reply in enumerate(replies):
            target = sent[reply.metadata.src_node_id]
            if i in corrupted:
                mixed.append(_corrupt(reply, target, *corrupted[i]))
            else:
                good = Message(copy.deepcopy(reply.content), reply_to=target)
                mixed.append(good)
                clean.append(Message(copy.deepcopy(reply.content), reply_to=target))

        got, _ = strategy.aggregate_train(2, mixed)

        reference, ref_messages = scenario.fresh()
        ref_sent = {m.metadata.dst_node_id: m for m in ref_messages}
        clean = [
            Message(r.content, reply_to=ref_sent[r.metadata.src_node_id]) for r in clean
        ]
        expected, _ = reference.aggregate_train(2, clean)
        got_arrays, expected_arrays = _arrays(got), _arrays(expected)
        if expected_arrays is None:
            assert got_arrays is None
            return
        assert got_arrays is not None and got_arrays.keys() == expected_arrays.keys()
        for key, value in expected_arrays.items():
            assert np.isfinite(got_arrays[key]).all(), key
            np.testing.assert_array_equal(got_arrays[key], value, err_msg=key)

    check()
