import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from strategies.aggregation import array_view
from strategies.validation import array_spec, check_reply

GOOD = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
SPEC = {"arrays": array_spec(ArrayRecord({k: Array(v) for k, v in GOOD.items()}))}


def test_good_reply_passes(reply):
    assert check_reply(reply(GOOD), array_records=SPEC) is None


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
        (GOOD, {"num-examples": 5, "train-loss": float("inf")}, "finite"),
        (None, None, "array records"),
    ],
)
def test_bad_replies_are_named(reply, arrays, metrics, fragment):
    reason = check_reply(reply(arrays, metrics), array_records=SPEC)
    assert reason is not None and fragment in reason


def test_error_reply_and_unexpected_record(reply, error_reply):
    assert "boom" in check_reply(error_reply("boom"), array_records=SPEC)
    extra = reply(GOOD, extra={"junk": ConfigRecord({"a": 1})})
    assert "unexpected config records" in check_reply(extra, array_records=SPEC)
    assert check_reply(extra, array_records=SPEC, config_records=("junk",)) is None


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
