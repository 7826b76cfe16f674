import numpy as np
import pytest
from flwr.app import RecordDict

from bouquet.strategies.aggregation import (
    mean64,
    weighted_mean,
    weighted_sum,
)
from bouquet.strategies.validation import (
    ClientReply,
    Contract,
    accept,
    weighted_metrics,
)


def test_weighted_mean_golden():
    a = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}
    b = {"w": np.array([3.0, 6.0], np.float32), "n": np.array(4, np.int64)}
    # Prepare: weights 1 and 3 -> (1*a + 3*b) / 4
    out = weighted_mean([a, b], [1, 3])
    np.testing.assert_array_equal(out["w"], np.array([2.5, 5.0], np.float32))
    assert out["w"].dtype == np.float32
    # integers are rounded back: (3 + 3*4) / 4 = 3.75 -> 4
    assert out["n"] == 4 and out["n"].dtype == np.int64


def test_weighted_mean_uniform_and_bad_weights():
    a, b = {"w": np.array([0.0])}, {"w": np.array([1.0])}
    assert weighted_mean([a, b])["w"][0] == 0.5
    with pytest.raises(ValueError):
        weighted_mean([a, b], [0, 0])
    with pytest.raises(ValueError):
        weighted_mean([a, b], [1, -1])
    with pytest.raises(ValueError):
        weighted_mean([])


def test_mean_update_relative_to_a_reference():
    ref = {"w": np.array([1.0, 1.0], np.float32)}
    client = {"w": np.array([2.0, 0.5], np.float32)}
    d = mean64([client], reference=ref)
    np.testing.assert_allclose(d["w"], [1.0, -0.5])


def test_weighted_metrics_skips_bookkeeping(reply):
    r1 = reply(None, {"num-examples": 10, "train-loss": 1.0, "partition-id": 0})
    r2 = reply(None, {"num-examples": 30, "train-loss": 3.0, "partition-id": 1})
    r3 = reply(None, {"num-examples": 10, "other": 5.0, "client-time": 2.0})
    replies = [accept(r, Contract()) for r in (r1, r2, r3)]
    assert all(isinstance(r, ClientReply) for r in replies)
    out = weighted_metrics(replies)
    assert out["train-loss"] == pytest.approx((10 * 1 + 30 * 3) / 40)
    assert out["other"] == 5.0
    assert out["num-examples"] == 50
    assert "partition-id" not in out and "client-time" not in out
    assert isinstance(RecordDict({"m": out}), RecordDict)


def test_to_record_keeps_zero_dim_arrays():
    from bouquet.strategies.aggregation import to_numpy, to_record

    arrays = {"n": np.array(5, np.int64), "w": np.ones((2, 1), np.float32)}
    back = to_numpy(to_record(arrays))
    assert back["n"].shape == () and back["w"].shape == (2, 1)


def test_mean64_of_updates_equals_the_mean_of_float64_differences():
    rng = np.random.default_rng(0)
    ref = {"w": rng.standard_normal((3, 4)).astype(np.float32), "n": np.array(2)}
    arrays = [
        {"w": rng.standard_normal((3, 4)).astype(np.float32), "n": np.array(i)}
        for i in range(5)
    ]
    weights = [1.0, 2.0, 0.5, 3.0, 1.5]
    got = mean64(arrays, weights, reference=ref)
    w = np.asarray(weights) / sum(weights)
    for key in ref:
        differences = [a[key].astype(np.float64) - ref[key] for a in arrays]
        expected = sum(wi * d for wi, d in zip(w, differences, strict=True))
        assert got[key].dtype == np.float64
        np.testing.assert_allclose(got[key], expected, rtol=1e-12)
    # hand-computed: uniform mean of (1 - 0) and (3 - 0) is 2
    zero = {"w": np.zeros(2, np.float32)}
    two = mean64([{"w": np.ones(2, np.float32)}, {"w": np.full(2, 3.0)}], None, zero)
    np.testing.assert_array_equal(two["w"], [2.0, 2.0])
    with pytest.raises(ValueError):
        mean64(arrays, [1.0, -1.0, 0, 0, 0], ref)


def test_weighted_sum_of_updates_is_unnormalised_and_float64():
    ref = {"w": np.array([1.0, 1.0], np.float32)}
    arrays = [{"w": np.array([2.0, 3.0], np.float32)}, {"w": np.array([0.0, 1.0])}]
    got = weighted_sum(arrays, [2.0, -1.0], reference=ref)
    # 2 * (1, 2) - 1 * (-1, 0) = (3, 4)
    np.testing.assert_array_equal(got["w"], [3.0, 4.0])
    with pytest.raises(ValueError):
        weighted_sum(arrays, [1.0], reference=ref)


def test_weighted_sum_of_float32_accumulates_python_float_weights_in_float64():
    # 0.1 is not a float32: a float32 product would lose the digits below 1e-8
    arrays = [{"w": np.array([1.0], np.float32)}] * 3
    got = weighted_sum(arrays, [0.1, 0.1, 0.1])
    assert got["w"].dtype == np.float64
    assert got["w"][0] == 0.1 + 0.1 + 0.1
