"""Hostile replies against every registered strategy (issue #16).

The property: for every registered algorithm and each phase (train,
evaluate), a round with any mix of invalid replies gives exactly the result
of the same round with only its valid replies (global arrays and exported
strategy state; for evaluation, the aggregated metrics), and nothing raises
out of the strategy.

For each algorithm, one real round of replies is produced by the real
ClientApp (in-process, round 2, after a real round 1 so that strategy state
exists). Hypothesis then turns some of them hostile, drawn from the input
classes below, and compares against a fresh strategy in the same state fed
only the valid ones:

- arrays: NaN/inf, huge values, wrong shapes and dtypes, empty arrays, a
  payload that is not what its metadata declares (other dtype, short,
  garbage, pickled objects, a scalar, another serialisation), missing or
  extra records and keys;
- metrics: missing, zero, negative, fractional, huge (1e30, 1e308) or list
  weights (Flower's MetricRecord refuses booleans itself); partition ids that are lists, negative or huge; declared
  metrics that are NaN, negative or denormal (momentum's ``eta K``); the
  wrong client routine;
- matching: error replies, empty replies, a second reply to one message, a
  reply to a message never sent, from a node that was not asked, or of the
  wrong message type.

Some changes are harmless by design: a metric key the server does not read
(an extra key, a NaN loss, a list ``client-time``) is ignored, not fatal. Such
replies stay in both runs.

Parametrised over the registry: a new algorithm gets this test the day it lands.
Hypothesis is derandomized and bounded (``max_examples``) so CI time is fixed.
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bouquet.serverapps.run import build_strategy, effective_run_config
from bouquet.serverapps.settings import TRAIN_CONFIG_KEYS, setting
from bouquet.simulations.inprocess import (
    InProcessGrid,
    app_defaults,
    give_id,
    run_inprocess,
)
from bouquet.strategies.aggregation import to_record
from bouquet.strategies.registry import get_algorithm, list_algorithms
from bouquet.strategies.state import load_state

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
        from bouquet.clientapps.app import app

        self.run_config = {**app_defaults(), **CONFIG, "algorithm": name}
        self.run_config["output-dir"] = output_dir
        # What the ServerApp applies and sends to the ClientApps (FedPEFT's peft).
        self.run_config = effective_run_config(
            build_strategy(self.run_config), self.run_config
        )
        _, path, _ = run_inprocess(self.run_config, num_nodes=NODES)
        self.state = load_state(path / "checkpoint")
        self.grid = InProcessGrid(app, NODES, self.run_config)
        self.replies = {
            phase: list(self.grid.send_and_receive(self.fresh(phase)[1]))
            for phase in ("train", "evaluate")
        }

    def fresh(self, phase: str) -> tuple[object, list[Message]]:
        """A strategy in the state after round 1, with its round-2 messages sent."""
        strategy = build_strategy(self.run_config)
        strategy.load_state(copy.deepcopy(self.state.strategy))
        config = ConfigRecord(
            {k: setting(self.run_config, k) for k in TRAIN_CONFIG_KEYS}
        )
        config["num-server-rounds"] = 2
        arrays = to_record(self.state.arrays)
        if phase == "train":
            messages = strategy.configure_train(2, arrays, config, self.grid)
        else:
            strategy.fraction_evaluate, strategy.min_evaluate_nodes = 1.0, 1
            messages = strategy.configure_evaluate(2, arrays, ConfigRecord(), self.grid)
        messages = list(messages)
        for msg in messages:
            give_id(msg)
        return strategy, messages


@functools.cache
def _scenario(name: str, output_dir: str) -> Scenario:
    return Scenario(name, output_dir)


# ------------------------------------------------------------- corruptions --
# Each corruption changes a copy of a reply's content in place (or builds a
# message) and returns INVALID (the reply must be dropped), HARMLESS (it must
# be used as if unchanged) or SKIP (it does not apply to this algorithm or
# phase: the reply stays valid and unchanged).
INVALID, HARMLESS, SKIP = "invalid", "harmless", "skip"


def _float_keys(record: ArrayRecord) -> list[str]:
    return [k for k, a in record.items() if np.dtype(a.dtype).kind == "f"]


def _pick_array(content: RecordDict, pick: int) -> tuple[ArrayRecord, str] | None:
    if "arrays" not in content.array_records:
        return None
    record = content["arrays"]
    names = _float_keys(record)
    return (record, names[pick % len(names)]) if names else None


def _replace_array(change: Callable[[np.ndarray], np.ndarray]):
    def corrupt(content: RecordDict, pick: int) -> str:
        found = _pick_array(content, pick)
        if found is None:
            return SKIP
        record, name = found
        arrays = {k: a.numpy() for k, a in record.items()}
        arrays[name] = change(arrays[name].copy())
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return INVALID

    return corrupt


def _npy(values: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _forge(payload: Callable[[Array, int], tuple[bytes, str]]):
    """Declare an array as it was sent, but ship other bytes."""

    def corrupt(content: RecordDict, pick: int) -> str:
        found = _pick_array(content, pick)
        if found is None:
            return SKIP
        record, name = found
        original = record[name]
        data, stype = payload(original, pick)
        record[name] = Array(
            dtype=original.dtype,
            shape=tuple(original.shape),
            stype=stype,
            data=data,
        )
        return INVALID

    return corrupt


def _as_int64(original: Array, pick: int) -> tuple[bytes, str]:
    payload = original.numpy().astype(np.int64)
    if pick % 2:
        payload = payload.reshape(-1)[:-1]
    return _npy(payload), original.stype


def _objects(original: Array, pick: int) -> tuple[bytes, str]:
    values = np.empty(original.numpy().shape, dtype=object)
    values.fill(1.0)
    return _npy(values, allow_pickle=True), original.stype


def _poke(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(a: np.ndarray) -> np.ndarray:
        a.reshape(-1)[0] = value
        return a

    return change


def _metrics(**changes: object):
    def corrupt(content: RecordDict, pick: int) -> str:
        values = dict(content["metrics"])
        values.update(changes)
        content["metrics"] = MetricRecord(
            {k: v for k, v in values.items() if v is not None}
        )
        return INVALID

    return corrupt


def _harmless_metrics(**changes: object):
    def corrupt(content: RecordDict, pick: int) -> str:
        _metrics(**changes)(content, pick)
        return HARMLESS

    return corrupt


def _declared_metric(value: float):
    """Every metric the algorithm declares, set to ``value`` (train only)."""

    def corrupt(content: RecordDict, pick: int, declared: tuple[str, ...]) -> str:
        if not declared or "arrays" not in content.array_records:
            return SKIP
        return _metrics(**dict.fromkeys(declared, value))(content, pick)

    corrupt.needs_declared = True  # type: ignore[attr-defined]
    return corrupt


def _routine(content: RecordDict, pick: int, declared=None) -> str:
    info = content.config_records.get("client-info")
    if info is None or info.get("client-routine") == "plain":
        return SKIP
    content["client-info"] = ConfigRecord({"client-routine": "plain"})
    return INVALID


def _pop_record(content: RecordDict, pick: int) -> str:
    if "arrays" not in content.array_records:
        return SKIP
    content.pop("arrays")
    return INVALID


def _pop_key(content: RecordDict, pick: int) -> str:
    if "arrays" not in content.array_records:
        return SKIP
    record = content["arrays"]
    record.pop(list(record.keys())[pick % len(record)])
    return INVALID


def _extra_key(content: RecordDict, pick: int) -> str:
    if "arrays" not in content.array_records:
        return SKIP
    content["arrays"]["junk"] = Array(np.zeros(3, np.float32))
    return INVALID


def _extra_record(content: RecordDict, pick: int) -> str:
    content["junk"] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
    return INVALID


def _metrics_as_config(content: RecordDict, pick: int) -> str:
    content["metrics"] = ConfigRecord({"num-examples": "many"})
    return INVALID


CONTENT_CORRUPTIONS: dict[str, Callable[..., str]] = {
    "nan": _replace_array(_poke(np.nan)),
    "inf": _replace_array(_poke(-np.inf)),
    "huge": _replace_array(_poke(3e30)),
    "shape": _replace_array(lambda a: a.reshape(-1)[:-1]),
    "flat": _replace_array(lambda a: a.reshape(-1, 1)),
    "dtype": _replace_array(lambda a: a.astype(np.float64)),
    "int-dtype": _replace_array(lambda a: a.astype(np.int32)),
    "empty": _replace_array(lambda a: np.empty(0, a.dtype)),
    "declared-int64-or-short": _forge(_as_int64),
    "garbage-payload": _forge(lambda a, i: (b"\x93NUMPY garbage" * (i % 3), a.stype)),
    "object-payload": _forge(_objects),
    "scalar-payload": _forge(lambda a, i: (_npy(np.float32(1e9)), a.stype)),
    "other-stype": _forge(lambda a, i: (a.data, "torch")),
    "missing-key": _pop_key,
    "extra-key": _extra_key,
    "missing-record": _pop_record,
    "extra-record": _extra_record,
    "metrics-as-config": _metrics_as_config,
    "no-weight": _metrics(**{"num-examples": None}),
    "zero-weight": _metrics(**{"num-examples": 0}),
    "negative-weight": _metrics(**{"num-examples": -5}),
    "fractional-weight": _metrics(**{"num-examples": 2.5}),
    "huge-weight": _metrics(**{"num-examples": 1e30}),
    "max-weight": _metrics(**{"num-examples": 1e308}),
    "list-weight": _metrics(**{"num-examples": [1, 2]}),
    "list-partition": _metrics(**{"partition-id": [1, 2]}),
    "huge-partition": _metrics(**{"partition-id": 10**9}),
    "negative-partition": _metrics(**{"partition-id": -1}),
    "declared-nan": _declared_metric(float("nan")),
    "declared-negative": _declared_metric(-1.0),
    "declared-denormal": _declared_metric(1e-300),
    "wrong-routine": _routine,
    "extra-metric": _harmless_metrics(junk=1.0),
    "nan-loss": _harmless_metrics(**{"train-loss": float("nan")}),
    "list-client-time": _harmless_metrics(**{"client-time": [1.0, 2.0]}),
    "nan-client-time": _harmless_metrics(**{"client-time": float("nan")}),
}

MATCHING = (
    "error",
    "empty-content",
    "duplicate",
    "unknown-message",
    "wrong-sender",
    "wrong-type",
)
KINDS = sorted([*CONTENT_CORRUPTIONS, *MATCHING])


def _hostile(
    reply: Message, sent: Message, kind: str, pick: int, declared: tuple[str, ...]
) -> tuple[list[Message], str]:
    """The messages a hostile node sends instead of ``reply``, and their class."""
    if kind == "error":
        return [Message(Error(3, "ClientApp raised"), reply_to=sent)], INVALID
    if kind == "empty-content":
        return [Message(RecordDict(), reply_to=sent)], INVALID
    honest = Message(copy.deepcopy(reply.content), reply_to=sent)
    if kind == "duplicate":  # the first is used, the second dropped
        return [honest, Message(copy.deepcopy(reply.content), reply_to=sent)], INVALID
    if kind == "unknown-message":  # a fresh message: never sent to anyone
        other = Message(
            RecordDict(),
            dst_node_id=sent.metadata.dst_node_id,
            message_type=sent.metadata.message_type,
        )
        give_id(other)
        return [Message(copy.deepcopy(reply.content), reply_to=other)], INVALID
    if kind == "wrong-sender":
        honest.metadata.__dict__["_src_node_id"] = 987654
        return [honest], INVALID
    if kind == "wrong-type":
        wrong = (
            MessageType.EVALUATE
            if sent.metadata.message_type == MessageType.TRAIN
            else MessageType.TRAIN
        )
        honest.metadata.__dict__["_message_type"] = wrong
        return [honest], INVALID
    corrupt = CONTENT_CORRUPTIONS[kind]
    if getattr(corrupt, "needs_declared", False) or corrupt is _routine:
        verdict = corrupt(honest.content, pick, declared)
    else:
        verdict = corrupt(honest.content, pick)
    if verdict == SKIP:
        return [Message(copy.deepcopy(reply.content), reply_to=sent)], SKIP
    return [honest], verdict


def _plain(value: object) -> object:
    """State as comparable plain data (arrays as (dtype, shape, bytes))."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return (str(value.dtype), value.shape, value.tobytes())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _arrays(record: ArrayRecord | None) -> dict[str, np.ndarray] | None:
    return None if record is None else {k: a.numpy() for k, a in record.items()}


def _run_phase(strategy, phase: str, replies: list[Message]):
    if phase == "train":
        arrays, _ = strategy.aggregate_train(2, replies)
        return _arrays(arrays), _plain(strategy.export_state())
    metrics = strategy.aggregate_evaluate(2, replies)
    return (None if metrics is None else dict(metrics)), None


@pytest.mark.parametrize("phase", ["train", "evaluate"])
@pytest.mark.parametrize("name", list_algorithms())
def test_invalid_replies_change_nothing(name, phase, tmp_path_factory):
    scenario = _scenario(name, str(tmp_path_factory.mktemp(f"hostile-{name}")))
    replies = scenario.replies[phase]
    assert len(replies) == NODES and not any(r.has_error() for r in replies)
    declared = tuple(get_algorithm(name).reply_metrics)

    @settings(
        max_examples=10,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        bad=st.lists(
            st.tuples(
                st.integers(0, NODES - 1),
                st.sampled_from(KINDS),
                st.integers(0, 1000),
            ),
            min_size=1,
            max_size=NODES,
            unique_by=lambda t: t[0],
        )
    )
    def check(bad: list[tuple[int, str, int]]) -> None:
        strategy, messages = scenario.fresh(phase)
        reference, ref_messages = scenario.fresh(phase)
        sent = {m.metadata.dst_node_id: m for m in messages}
        ref_sent = {m.metadata.dst_node_id: m for m in ref_messages}
        hostile = {i: (kind, pick) for i, kind, pick in bad}
        mixed, clean = [], []
        for i, reply in enumerate(replies):
            node = reply.metadata.src_node_id
            if i in hostile:
                sent_now, verdict = _hostile(reply, sent[node], *hostile[i], declared)
                mixed.extend(sent_now)
                if verdict == INVALID:
                    if hostile[i][0] == "duplicate":
                        clean.append(Message(reply.content, reply_to=ref_sent[node]))
                    continue
                clean.append(Message(sent_now[0].content, reply_to=ref_sent[node]))
                continue
            mixed.append(Message(copy.deepcopy(reply.content), reply_to=sent[node]))
            clean.append(Message(copy.deepcopy(reply.content), reply_to=ref_sent[node]))

        got, got_state = _run_phase(strategy, phase, mixed)
        expected, expected_state = _run_phase(reference, phase, clean)
        assert got_state == expected_state
        if expected is None:
            assert got is None
            return
        assert got is not None and got.keys() == expected.keys()
        for key, value in expected.items():
            if phase == "train":
                assert np.isfinite(got[key]).all(), key
            np.testing.assert_array_equal(got[key], value, err_msg=key)

    check()
