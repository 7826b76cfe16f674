from io import BytesIO

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

import bouquet.strategies.validation as validation
from bouquet.strategies.aggregation import array_view
from bouquet.strategies.validation import (
    ClientReply,
    Contract,
    RoutineMissingError,
    Sent,
    accept,
    accept_all,
    array_spec,
)

GOOD = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
SPEC = array_spec(ArrayRecord({k: Array(v) for k, v in GOOD.items()}))
CONTRACT = Contract(arrays=SPEC)


def test_good_reply_passes(reply):
    got = accept(reply(GOOD, {"num-examples": 10, "partition-id": 3}, 7), CONTRACT)
    assert isinstance(got, ClientReply)
    assert (got.node, got.partition, got.num_examples) == (7, 3, 10.0)
    assert got.metrics == {"num-examples": 10, "partition-id": 3}
    assert list(got.arrays) == ["w", "b"] and got.records == {}
    for key, value in GOOD.items():
        np.testing.assert_array_equal(got.arrays[key], value)
        assert got.arrays[key].dtype == value.dtype
        # a read-only view of the reply's bytes, not a copy
        assert not got.arrays[key].flags.owndata
        assert not got.arrays[key].flags.writeable
    assert got.message is not None


def test_array_spec_of_numpy_equals_of_record():
    assert (
        array_spec(GOOD) == SPEC == {"w": ((2, 3), "float32"), "b": ((3,), "float32")}
    )


def test_each_array_is_decoded_once(reply, monkeypatch):
    calls = []

    decode = validation.decode_array

    def counting_decode(array, shape, dtype):
        calls.append(array)
        return decode(array, shape, dtype)

    monkeypatch.setattr(validation, "decode_array", counting_decode)
    extra = {"h": ArrayRecord({k: Array(v) for k, v in GOOD.items()})}
    contract = Contract(arrays=SPEC, records={"h": SPEC})
    got = accept(reply(GOOD, extra=extra), contract)
    assert isinstance(got, ClientReply)
    assert len(calls) == 4  # two arrays in each of two records
    assert list(got.records) == ["h"] and list(got.records["h"]) == ["w", "b"]


@pytest.mark.parametrize(
    ("arrays", "metrics", "fragment"),
    [
        ({**GOOD, "w": np.full((2, 3), np.nan, np.float32)}, None, "non-finite"),
        ({**GOOD, "b": np.full(3, 3e10, np.float32)}, None, "magnitude 3e+10"),
        ({**GOOD, "w": np.ones((3, 2), np.float32)}, None, "expected float32[2, 3]"),
        ({**GOOD, "w": np.ones((2, 3), np.float64)}, None, "float64"),
        ({"w": GOOD["w"]}, None, "missing ['b']"),
        ({**GOOD, "x": np.ones(1, np.float32)}, None, "extra ['x']"),
        (GOOD, {"train-loss": 1.0}, "'num-examples' is missing"),
        (GOOD, {"num-examples": 0}, "positive"),
        (GOOD, {"num-examples": 2.5}, "positive integer"),
        (GOOD, {"num-examples": 10**10}, "at most 1e+09"),
        (GOOD, {"num-examples": 5, "partition-id": -1}, "'partition-id'"),
        (None, None, "array records"),
    ],
)
def test_bad_replies_are_named(reply, arrays, metrics, fragment):
    reason = accept(reply(arrays, metrics), CONTRACT)
    assert isinstance(reason, str) and fragment in reason


def _npy(values: np.ndarray) -> bytes:
    buffer = BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (np.ones((2, 3), np.float64), "holds float64[2, 3], declared float32"),
        (np.ones((3, 2), np.float32), "holds float32[3, 2]"),
        (np.ones(6, np.float32), "holds float32[6]"),
        (b"not an npy payload", "cannot be decoded"),
    ],
)
def test_payload_must_match_its_declared_dtype_and_shape(reply, payload, fragment):
    # The declared dtype and shape agree with the contract; the bytes do not.
    data = payload if isinstance(payload, bytes) else _npy(payload)
    liar = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data)
    msg = reply(GOOD)
    msg.content["arrays"] = ArrayRecord({"w": liar, "b": Array(GOOD["b"])})
    reason = accept(msg, CONTRACT)
    assert isinstance(reason, str)
    assert "array 'arrays/w'" in reason and fragment in reason


def test_error_reply_and_unexpected_record(reply, error_reply):
    assert "boom" in accept(error_reply("boom"), CONTRACT)
    extra = reply(GOOD, extra={"junk": ConfigRecord({"a": 1})})
    assert "unexpected config records ['junk']" in accept(extra, CONTRACT)
    # The only config record a reply may carry is its client-info.
    assert isinstance(accept(reply(GOOD, routine="plain"), CONTRACT), ClientReply)


def test_missing_or_unexpected_extra_records(reply):
    contract = Contract(arrays=SPEC, records={"h": SPEC})
    assert "array records ['arrays'] != expected ['arrays', 'h']" in accept(
        reply(GOOD), contract
    )
    extra = {"h": ArrayRecord({"w": Array(GOOD["w"])})}
    assert "record 'h' keys differ (missing ['b']" in accept(
        reply(GOOD, extra=extra), contract
    )
    stray = {"h": ArrayRecord({k: Array(v) for k, v in GOOD.items()})}
    assert "array records" in accept(reply(GOOD, extra=stray), CONTRACT)


def test_required_metrics_and_weight_key(reply):
    contract = Contract(arrays=SPEC, metrics=("train-loss",), weight_key="steps")
    assert "metric 'steps' is missing" in accept(reply(GOOD), contract)
    got = accept(reply(GOOD, {"steps": 4, "num-examples": 10}), contract)
    assert isinstance(got, str) and "metric 'train-loss' is missing" in got
    good = accept(reply(GOOD, {"steps": 4, "train-loss": 0.5}), contract)
    assert isinstance(good, ClientReply) and good.num_examples == 4.0


def test_metrics_the_server_does_not_read_are_ignored_when_bad(reply):
    metrics = {
        "num-examples": 5,
        "train-loss": float("inf"),
        "per-class": [1.0, float("nan")],
        "client-time": -3.0,
        "eval-accuracy": 0.5,
    }
    got = accept(reply(GOOD, metrics), CONTRACT)
    assert isinstance(got, ClientReply)
    assert got.metrics == {"num-examples": 5, "eval-accuracy": 0.5}


def test_replies_must_answer_what_was_sent(reply):
    msg = reply(GOOD, node_id=4)
    mid = msg.metadata.reply_to_message_id
    assert "not sent" in accept(msg, CONTRACT, {})
    assert "went to node 5" in accept(msg, CONTRACT, {mid: Sent(5, "train")})
    assert "'train' reply to a 'evaluate'" in accept(
        msg, CONTRACT, {mid: Sent(4, "evaluate")}
    )
    answered: set[str] = set()
    sent = {mid: Sent(4, "train")}
    assert isinstance(accept(msg, CONTRACT, sent, answered), ClientReply)
    assert "second reply" in accept(msg, CONTRACT, sent, answered)


def test_routine_is_checked(reply):
    contract = Contract(arrays=SPEC, routine="fedprox")
    assert "did not run the routine 'fedprox'" in accept(reply(GOOD), contract)
    wrong = accept(reply(GOOD, routine="plain"), contract)
    assert "did not run the routine 'fedprox'" in wrong and "'plain'" in wrong
    assert isinstance(accept(reply(GOOD, routine="fedprox"), contract), ClientReply)
    assert issubclass(RoutineMissingError, ValueError)


def test_evaluation_contract_takes_metrics_only(reply):
    got = accept(reply(None, {"num-examples": 5, "eval-acc": 0.5}), Contract())
    assert isinstance(got, ClientReply) and got.arrays == {} and got.records == {}
    assert "array records" in accept(reply(GOOD), Contract())


def test_accept_all_orders_by_partition_then_node(reply, error_reply):
    msgs = [
        reply(GOOD, {"num-examples": 1, "partition-id": 2}, node_id=5),
        reply(GOOD, {"num-examples": 1}, node_id=1),
        error_reply("gone", node_id=9),
        reply(GOOD, {"num-examples": 1, "partition-id": 0}, node_id=8),
        reply({"w": GOOD["w"]}, {"num-examples": 1}, node_id=4),
        reply(GOOD, {"num-examples": 1, "partition-id": 2}, node_id=3),
    ]
    good, reasons, errors = accept_all(msgs, CONTRACT)
    assert [(r.partition, r.node) for r in good] == [(0, 8), (2, 3), (2, 5), (None, 1)]
    assert errors == 1
    assert len(reasons) == 2
    assert reasons[0].startswith("node 9: error reply") and "gone" in reasons[0]
    assert reasons[1].startswith("node 4: record 'arrays' keys differ")


def test_accept_all_names_the_recipient(reply):
    msg = reply({"w": GOOD["w"]}, node_id=4)
    sent = {msg.metadata.reply_to_message_id: Sent(42, "train")}
    _, reasons, _ = accept_all([msg], CONTRACT, sent)
    assert reasons[0].startswith("node 42: ")


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        np.array(7, dtype=np.int64),
        np.arange(4, dtype=">f4"),
        np.zeros((0, 3), dtype=np.float32),
    ],
)
def test_values_are_read_in_place_and_equal_to_numpy(values):
    array = Array(values)
    view = array_view(array)
    np.testing.assert_array_equal(view, array.numpy())
    assert view.shape == values.shape
    assert view.dtype == values.dtype
    assert not view.flags.owndata  # a view of the message's bytes, not a copy
