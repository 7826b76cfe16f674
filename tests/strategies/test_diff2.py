"""DIFF2's server rule on hand-made arrays, its accounting and its reductions."""

import math

import numpy as np
import pytest

from bouquet.strategies.context import RoundContext
from bouquet.strategies.diff2 import (
    DIFF2,
    RecursiveEstimate,
    calibrate,
    epsilon_spent,
    is_restart,
)
from bouquet.strategies.validation import ClientReply


def _reply(node, value):
    return ClientReply(
        node=node,
        partition=node,
        num_examples=1,
        metrics={},
        arrays={"w": np.array(value, dtype=np.float32)},
    )


def _ctx(server_round, x):
    return RoundContext(server_round, 4, "train", (0, 1), (0, 1), {"w": x}, {})


def test_restart_then_differences_accumulate_into_v():
    piece = RecursiveEstimate(eta=0.5, interval=3)
    x = np.array([1.0, -1.0])
    weights = np.array([0.5, 0.5])
    # Round 1 restarts: v = mean d = [2, 1]; Delta = -eta v.
    d1 = [_reply(0, [1.0, 2.0]), _reply(1, [3.0, 0.0])]
    delta, v = piece.update(d1, weights, None, _ctx(1, x))
    np.testing.assert_allclose(v["w"], [2.0, 1.0])
    np.testing.assert_allclose(delta["w"], [-1.0, -0.5])
    # Round 2 is a difference: v = [2, 1] + mean([1, -1], [-3, 1]) = [1, 1].
    d2 = [_reply(0, [1.0, -1.0]), _reply(1, [-3.0, 1.0])]
    delta, v = piece.update(d2, weights, v, _ctx(2, x))
    np.testing.assert_allclose(v["w"], [1.0, 1.0])
    np.testing.assert_allclose(delta["w"], [-0.5, -0.5])
    # Round 4 restarts again ((4 - 1) mod 3 == 0): v forgets the sum.
    delta, v = piece.update(d1, weights, v, _ctx(4, x))
    np.testing.assert_allclose(v["w"], [2.0, 1.0])
    assert [is_restart(r, 3) for r in range(1, 8)] == [1, 0, 0, 1, 0, 0, 1]


def test_without_state_any_round_restarts():
    piece = RecursiveEstimate(eta=1.0, interval=10)
    _, v = piece.update([_reply(0, [4.0])], np.array([1.0]), None, _ctx(5, np.zeros(1)))
    np.testing.assert_allclose(v["w"], [4.0])


def test_epsilon_is_the_gaussian_rdp_of_half_the_multiplier():
    # Replace-one: sensitivity 2C/n, noise sigma C/n -> multiplier sigma / 2,
    # RDP of order a: a / (2 (sigma/2)^2) per release, composed R times.
    sigma, rounds, delta = 4.0, 10, 1e-5
    got = epsilon_spent([(sigma, rounds)], delta)
    orders = np.linspace(1.01, 200, 20000)
    rdp = rounds * orders * 2.0 / sigma**2
    # dp-accounting's conversion is at least as tight as the classic bound.
    classic = float(np.min(rdp + math.log(1 / delta) / (orders - 1)))
    assert 0 < got <= classic + 1e-6
    assert got > 0.5 * classic
    # Composition by counts: restart and difference events add up.
    both = epsilon_spent([(sigma, 4), (sigma, 6)], delta)
    assert both == pytest.approx(got, rel=1e-9)
    assert epsilon_spent([(0.0, 5)], delta) is None
    assert epsilon_spent([(2 * sigma, rounds)], delta) < got


def test_calibration_spends_the_target_epsilon():
    sigma = calibrate(3.0, 1e-5, 50)
    assert epsilon_spent([(sigma, 50)], 1e-5) == pytest.approx(3.0, rel=1e-6)
    assert epsilon_spent([(sigma, 50)], 1e-5) <= 3.0


def test_partial_participation_is_refused():
    with pytest.raises(ValueError, match="full participation"):
        DIFF2(fraction_train=0.5)
