"""FedLD's server math against an independent, step-by-step numpy computation."""

import numpy as np
import pytest

from bouquet.strategies.aggregation import to_numpy
from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedld import FedLD, principal_update
from tests.conftest import answer


def reference_update(d, k_proportion, weights=None):
    """The spec's steps written out literally: SVD of G, v_j, signs, r_i, mean."""
    d = np.asarray(d, np.float64)
    m = d.shape[0]
    g = d @ d.T / m
    u, s, _ = np.linalg.svd(g)
    k = max(1, int(np.floor(m * k_proportion)))
    rebuilt = np.zeros_like(d)
    for j in range(k):
        v = d.T @ u[:, j]
        dots = d @ v
        if np.sum(dots >= 0) < np.sum(dots < 0):
            v = -v
        for i in range(m):
            projection = (d[i] @ v) / (v @ v) * v if v @ v > 1e-24 else 0 * v
            norm = np.linalg.norm(projection)
            unit = projection / norm if norm > 0 else projection
            rebuilt[i] += s[j] / s.sum() * np.linalg.norm(d[i]) * unit
    w = np.ones(m) / m if weights is None else np.asarray(weights) / np.sum(weights)
    return w @ rebuilt


D3 = np.array([[1.0, 0.5, -0.2, 0.0], [0.8, -0.1, 0.3, 0.4], [-0.3, 0.9, 0.2, -0.5]])


@pytest.mark.parametrize("k_proportion", [0.34, 0.67, 0.8, 1.0])
def test_principal_update_matches_step_by_step_reference(k_proportion):
    np.testing.assert_allclose(
        principal_update(D3, k_proportion),
        reference_update(D3, k_proportion),
        atol=1e-12,
    )


def test_golden_numbers_two_orthogonal_clients():
    # d1 = (2, 0), d2 = (0, 1): G = diag(2, 0.5), s = (2, .5), shares (.8, .2).
    # k = floor(2 * .5) = 1: only v_1 = D^T e_1 = (2, 0) is kept.
    # r_1 = .8 * ||d1|| * (1, 0) = (1.6, 0); d2 has zero projection -> r_2 = 0.
    d = np.array([[2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(principal_update(d, 0.5), [0.8, 0.0])
    # k = 2: r_2 = .2 * 1 * (0, 1) -> mean = (0.8, 0.1)
    np.testing.assert_allclose(principal_update(d, 1.0), [0.8, 0.1])


def test_sign_alignment_does_not_change_the_rebuilt_delta():
    flipped = -D3  # every direction flips; majorities flip with them
    np.testing.assert_allclose(
        principal_update(flipped, 0.8), -principal_update(D3, 0.8), atol=1e-12
    )


def test_k_is_clamped_at_one_client():
    d = np.array([[3.0, -4.0]])  # m = 1: floor(0.8) = 0 -> k = 1, r = d
    np.testing.assert_allclose(principal_update(d, 0.8), d[0])


def test_zero_updates_and_zero_projection_are_guarded():
    assert np.all(principal_update(np.zeros((3, 4)), 0.8) == 0)
    d = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
    out = principal_update(d, 1.0)
    assert np.isfinite(out).all()


def test_float32_and_float64_agree():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(5, 50))
    np.testing.assert_allclose(
        principal_update(d.astype(np.float32), 0.8),
        principal_update(d, 0.8),
        rtol=1e-5,
        atol=1e-6,
    )


def test_weighted_option():
    w = np.array([1.0, 2.0, 5.0])
    np.testing.assert_allclose(
        principal_update(D3, 0.67, w), reference_update(D3, 0.67, w), atol=1e-12
    )


def _context(server_round, ref):
    return RoundContext(
        server_round=server_round,
        num_rounds=None,
        phase="train",
        nodes=(),
        sampled=(),
        arrays=dict(ref),
        config={},
    )


def _deltas(strategy, server_round, ref, clients, reply):
    """One round from ``ref``: the update the strategy applied (new arrays - ref)."""
    strategy.train_round = _context(server_round, ref)
    replies = [
        reply(c, {"num-examples": 10, "partition-id": i}, 10 + i, routine="fedld")
        for i, c in enumerate(clients)
    ]
    arrays, _ = strategy.aggregate_train(server_round, answer(strategy, replies))
    out = to_numpy(arrays)
    for key, value in out.items():
        assert value.dtype == ref[key].dtype  # each entry keeps its dtype
    return {k: v.astype(np.float64) - ref[k] for k, v in out.items()}


def test_strategy_first_round_is_mean_then_principal(reply):
    strategy = FedLD(seed=0, k_proportion=0.67)
    ref = {"w": np.zeros(4, np.float32), "n": np.array(2, np.int64)}
    clients = [
        {"w": (row).astype(np.float32), "n": np.array(3 + i, np.int64)}
        for i, row in enumerate(D3)
    ]
    first = _deltas(strategy, 1, ref, clients, reply)
    np.testing.assert_allclose(first["w"], D3.mean(0), rtol=1e-6)
    assert first["n"] == pytest.approx(2.0)  # (3+4+5)/3 - 2; one-element -> mean
    assert set(strategy.state["aggregator"]["combine"]) == {"w", "n"}  # history
    second = _deltas(strategy, 2, ref, clients, reply)
    np.testing.assert_allclose(second["w"], reference_update(D3, 0.67), rtol=1e-5)


def test_loss_only_mode_is_always_the_mean_and_bad_options_fail(reply):
    strategy = FedLD(seed=0, mode="loss-only")
    ref = {"w": np.zeros(4)}
    clients = [{"w": row} for row in D3]
    for server_round in (1, 2):
        np.testing.assert_allclose(
            _deltas(strategy, server_round, ref, clients, reply)["w"], D3.mean(0)
        )
    ablation = FedLD(mode="aggregation-only", lambda_=0.5)
    assert ablation.round_config(_context(1, ref)) == {"fedld.lambda": 0.0}
    with pytest.raises(ValueError, match="mode"):
        FedLD(mode="nope")
    with pytest.raises(ValueError, match="k-proportion"):
        FedLD(k_proportion=0.0)
