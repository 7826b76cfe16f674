"""KnFu's server: divergences and fusion by hand, the knowledge checks, state."""

import math

import numpy as np
import pytest

from bouquet.strategies.context import RoundContext
from bouquet.strategies.knfu import (
    KNOWLEDGE,
    KnFu,
    distribution_problem,
    divergences,
    fuse,
    keyed,
)
from bouquet.strategies.validation import ClientReply


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_divergences_are_the_mean_kl_over_samples():
    p = np.array(
        [
            [[0.5, 0.5], [0.2, 0.8]],
            [[0.9, 0.1], [0.5, 0.5]],
        ]
    )
    d = divergences(p)
    expected = 0.5 * (_kl([0.5, 0.5], [0.9, 0.1]) + _kl([0.2, 0.8], [0.5, 0.5]))
    assert d[0, 1] == pytest.approx(expected, rel=1e-6)
    expected = 0.5 * (_kl([0.9, 0.1], [0.5, 0.5]) + _kl([0.5, 0.5], [0.2, 0.8]))
    assert d[1, 0] == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-7)


def test_fusion_keeps_the_close_neighbours_and_weights_them_by_exp_minus_beta_d():
    # One sample, three classes; nodes 0 and 1 agree, node 2 and 3 disagree.
    p = np.array(
        [
            [[0.7, 0.2, 0.1]],
            [[0.6, 0.3, 0.1]],
            [[0.1, 0.2, 0.7]],
            [[0.1, 0.7, 0.2]],
        ]
    )
    targets, weights = fuse(p, beta=2.0)
    # Node 0: D to 1, 2, 3; the mean splits them: 1 only is at or below it.
    d = [_kl(p[0, 0], p[j, 0]) for j in (1, 2, 3)]
    assert d[0] <= np.mean(d) < min(d[1], d[2])
    np.testing.assert_allclose(weights[0], [0, 1, 0, 0])
    np.testing.assert_allclose(targets[0], p[1])
    # Node 2: neighbours by hand, weights exp(-2 D) normalised.
    d2 = {j: _kl(p[2, 0], p[j, 0]) for j in (0, 1, 3)}
    chosen = [j for j in d2 if d2[j] <= np.mean(list(d2.values()))]
    raw = {j: math.exp(-2.0 * d2[j]) for j in chosen}
    expected = np.zeros(4)
    for j in chosen:
        expected[j] = raw[j] / sum(raw.values())
    np.testing.assert_allclose(weights[2], expected, rtol=1e-6)
    np.testing.assert_allclose(targets[2], np.einsum("j,jnc->nc", expected, p))
    assert np.all(np.diag(weights) == 0)  # a node never fuses its own knowledge
    np.testing.assert_allclose(targets.sum(axis=2), 1.0)


def test_all_neighbours_with_beta_zero_is_the_uniform_average_of_the_others():
    p = np.random.default_rng(0).dirichlet([1, 1, 1], size=(4, 5))
    targets, weights = fuse(p, beta=0.0, rule="all")
    np.testing.assert_allclose(weights, (1 - np.eye(4)) / 3)
    np.testing.assert_allclose(targets[0], p[1:].mean(axis=0))


def test_a_lone_node_gets_no_target():
    targets, weights = fuse(np.array([[[0.5, 0.5]]]), beta=10.0)
    assert weights.sum() == 0 and np.isnan(targets).all()


def test_knowledge_must_be_distributions():
    assert distribution_problem(keyed(np.array([[0.25, 0.75]]))) is None
    assert "negative" in distribution_problem(keyed(np.array([[-0.5, 1.5]])))
    assert "sum to 1" in distribution_problem(keyed(np.array([[0.5, 0.6]])))


def test_aggregate_stores_knowledge_and_fuses_targets_without_moving_arrays():
    strategy = KnFu(beta=10.0)
    strategy.transfer, strategy.num_classes = np.zeros((1, 2), np.float32), 2
    arrays = {"w": np.ones(3, np.float32)}
    ctx = RoundContext(1, None, "train", (5, 6), (5, 6), arrays, {})
    replies = [
        ClientReply(
            node=node,
            partition=i,
            num_examples=1,
            metrics={},
            records={KNOWLEDGE: keyed(np.array([probs], np.float32))},
        )
        for i, (node, probs) in enumerate([(5, [0.9, 0.1]), (6, [0.3, 0.7])])
    ]
    new = strategy.aggregate(replies, ctx)
    np.testing.assert_array_equal(new["w"], arrays["w"])
    state = strategy.state["knfu"]
    assert sorted(state["knowledge"]) == ["5", "6"]
    # Two nodes: each one's only neighbour is the other.
    np.testing.assert_allclose(state["targets"]["5"], [[0.3, 0.7]])
    np.testing.assert_allclose(state["targets"]["6"], [[0.9, 0.1]])
    assert state["neighbours"] == 1.0
    assert strategy.record_specs(ctx, {}) == {KNOWLEDGE: {"0": ((2,), "float32")}}
