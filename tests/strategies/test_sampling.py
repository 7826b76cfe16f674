"""Participation models: rates, determinism, patterns and probabilities."""

import numpy as np
import pytest

from bouquet.strategies.sampling import (
    Availability,
    ParticipationSpec,
    participation_probabilities,
)

P = np.array([0.05, 0.1, 0.3, 0.6, 0.9])


def _masks(model, p=P, rounds=4000, seed=0, **kw):
    availability = Availability(ParticipationSpec(model=model, **kw), p, seed)
    return np.array([availability(t) for t in range(1, rounds + 1)])


@pytest.mark.parametrize("model", ["bernoulli", "cyclic", "markov"])
def test_empirical_rate_matches_each_probability(model):
    masks = _masks(model, rounds=8000, cycle=20, markov_active=0.2)
    # Cyclic: the rate is round(cycle p) / cycle by construction.
    expected = np.maximum(1, np.round(20 * P)) / 20 if model == "cyclic" else P
    tolerance = 0.0 if model == "cyclic" else 0.02
    np.testing.assert_allclose(masks.mean(0), expected, atol=tolerance)


def test_uniform_is_always_available():
    assert _masks("uniform", rounds=50).all()


@pytest.mark.parametrize("model", ["bernoulli", "cyclic", "markov"])
def test_deterministic_by_seed_and_out_of_order_queries(model):
    a = _masks(model, rounds=300, seed=3)
    np.testing.assert_array_equal(a, _masks(model, rounds=300, seed=3))
    assert not np.array_equal(a, _masks(model, rounds=300, seed=4))
    # Round t's answer does not depend on which rounds were asked before.
    fresh = Availability(ParticipationSpec(model=model), P, 3)
    np.testing.assert_array_equal(fresh(250), a[249])
    np.testing.assert_array_equal(fresh(7), a[6])


def test_a_client_keeps_its_stream_when_more_clients_join():
    small = _masks("bernoulli", p=P[:3], rounds=200)
    np.testing.assert_array_equal(small, _masks("bernoulli", rounds=200)[:, :3])


def test_cyclic_pattern_is_on_for_a_then_off_for_the_rest():
    # cycle 10: p = 0.3 -> 3 rounds on, 7 off; p = 0.05 -> round(0.5) = 0 -> 1 on.
    masks = _masks("cyclic", p=np.array([0.3, 0.05]), rounds=40, cycle=10)
    for column, on in ((0, 3), (1, 1)):
        trace = masks[:, column].astype(int)
        np.testing.assert_array_equal(trace[:10], trace[10:20])  # period 10
        assert trace[:10].sum() == on
        # The on-rounds are consecutive (cyclically): one off->on switch per period.
        assert np.sum(np.diff(np.concatenate([trace, trace[:1]])) == 1) == 4


def test_markov_transitions_and_stationary_rate():
    p = np.array([0.1, 0.5])
    masks = _masks("markov", p=p, rounds=20000, markov_active=0.05)
    np.testing.assert_allclose(masks.mean(0), p, atol=0.02)
    # P(off -> on) = 0.05 for both; P(on -> off) = 0.05 (1/p - 1) = 0.45, 0.05.
    before, after = masks[:-1], masks[1:]
    on_rate = (after & ~before).sum(0) / (~before).sum(0)
    off_rate = (~after & before).sum(0) / before.sum(0)
    np.testing.assert_allclose(on_rate, [0.05, 0.05], atol=0.01)
    np.testing.assert_allclose(off_rate, [0.45, 0.05], atol=0.03)


def test_markov_rescales_when_leaving_would_exceed_one():
    # p = 0.02, q = 0.05: q (1/p - 1) = 2.45 > 1 -> off->on = 0.05 / 2.45, on->off = 1.
    availability = Availability(
        ParticipationSpec(model="markov", markov_active=0.05), np.array([0.02]), 0
    )
    assert availability.to_inactive[0] == 1.0
    assert availability.to_active[0] == pytest.approx(0.05 / 2.45)


def test_label_linked_probabilities_golden():
    # C = 4. A client with uniform labels gets exactly p_mean (sum of m is 1);
    # C one-class clients get p_mean C m_c, summing to p_mean C.
    counts = np.vstack([np.ones(4) * 5, np.eye(4) * 7])
    spec = ParticipationSpec(model="bernoulli", mean=0.1, minimum=0.0, alpha=1.0)
    p = participation_probabilities(spec, seed=1, label_counts=counts)
    assert p[0] == pytest.approx(0.1)
    assert p[1:].sum() == pytest.approx(0.4)
    again = participation_probabilities(spec, seed=1, label_counts=counts)
    np.testing.assert_array_equal(p, again)
    other = participation_probabilities(spec, seed=2, label_counts=counts)
    assert not np.allclose(p[1:], other[1:])


def test_minimum_cap_and_other_links():
    spec = ParticipationSpec(model="bernoulli", mean=0.2, minimum=0.05, link="size")
    p = participation_probabilities(spec, 0, sizes=[10, 30, 1, 200])
    # mean size 60.25: 0.2 * n / 60.25, clipped to [0.05, 1].
    np.testing.assert_allclose(p, [0.05, 0.2 * 30 / 60.25, 0.05, 0.2 * 200 / 60.25])
    big = ParticipationSpec(model="bernoulli", mean=0.9, link="size")
    assert participation_probabilities(big, 0, sizes=[1, 100]).max() == 1.0
    flat = ParticipationSpec(model="bernoulli", mean=0.3, link="none")
    np.testing.assert_array_equal(
        participation_probabilities(flat, 0, sizes=[1] * 3), 0.3
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "sometimes"}, "participation must"),
        ({"link": "mood"}, "participation-link"),
        ({"mean": 0.0}, "participation-mean"),
        ({"alpha": 0.0}, "participation-alpha"),
        ({"cycle": 1}, "participation-cycle"),
    ],
)
def test_bad_specs_fail_with_the_key_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParticipationSpec(**kwargs)
