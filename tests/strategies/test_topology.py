"""Graphs, mixing matrices and spectral gaps against hand-computed values."""

import numpy as np
import pytest

from bouquet.strategies import topology as t

ALL = [
    ("ring", 8),
    ("grid", 12),
    ("torus", 12),
    ("regular", 10),
    ("erdos-renyi", 10),
    ("exponential", 8),
    ("complete", 5),
    ("matching", 7),
]


@pytest.mark.parametrize(("name", "n"), ALL)
@pytest.mark.parametrize("rule", t.MIXINGS)
def test_every_mixing_matrix_is_symmetric_and_doubly_stochastic(name, n, rule):
    adjacency = t.make_graph(name, n, np.random.default_rng(1), degree=3)
    assert adjacency.shape == (n, n) and not adjacency.diagonal().any()
    np.testing.assert_array_equal(adjacency, adjacency.T)
    w = t.mixing_matrix(adjacency, rule)
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w.sum(axis=0), 1.0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    assert (w >= 0).all()
    assert ((w > 0) | np.eye(n, dtype=bool) >= adjacency).all()
    assert not (w[~adjacency & ~np.eye(n, dtype=bool)]).any()


@pytest.mark.parametrize("n", [5, 8, 16])
def test_ring_with_uniform_weights_has_the_closed_form_spectrum(n):
    w = t.mixing_matrix(t.make_graph("ring", n), "uniform")
    np.testing.assert_allclose(w[0, [n - 1, 0, 1]], [1 / 3] * 3)
    expected = 1 / 3 + 2 / 3 * np.cos(2 * np.pi * np.arange(n) / n)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(w)), np.sort(expected))
    lambda2 = np.sort(np.abs(expected))[-2]
    assert t.spectral_gap(w) == pytest.approx(1 - lambda2)


def test_spectral_gaps_by_hand():
    # Complete graph, uniform: W = J/n, eigenvalues 1, 0, ..., 0.
    assert t.spectral_gap(t.mixing_matrix(t.complete(6), "uniform")) == pytest.approx(1)
    # Ring of 4, uniform: 1/3 + 2/3 cos(pi k/2) = 1, 1/3, -1/3, 1/3 -> gap 2/3.
    assert t.spectral_gap(t.mixing_matrix(t.ring(4), "uniform")) == pytest.approx(2 / 3)
    # Two disconnected edges: eigenvalue 1 twice -> gap 0.
    w = t.mixing_matrix(t.from_edges(4, [(0, 1), (2, 3)]))
    assert t.spectral_gap(w) == pytest.approx(0)
    assert t.spectral_gap(np.ones((1, 1))) == 1.0


def test_metropolis_hastings_on_a_path_by_hand():
    w = t.mixing_matrix(t.from_edges(3, [(0, 1), (1, 2)]), "metropolis-hastings")
    third = 1 / 3
    np.testing.assert_allclose(
        w, [[1 - third, third, 0], [third, third, third], [0, third, 1 - third]]
    )
    # Max-degree weights on the same path: 1/(1 + 2) on each edge.
    np.testing.assert_allclose(
        t.mixing_matrix(t.from_edges(3, [(0, 1), (1, 2)]), "uniform"), w
    )


def test_graph_shapes():
    degrees = lambda a: sorted(set(a.sum(axis=1).tolist()))  # noqa: E731
    assert degrees(t.ring(7)) == [2]
    assert degrees(t.lattice(12, wrap=True)) == [4]  # 3 x 4 torus
    assert degrees(t.lattice(12, wrap=False)) == [2, 3, 4]
    assert degrees(t.complete(5)) == [4]
    assert degrees(t.exponential(8)) == [5]  # +-1, +-2, 4 (= -4)
    assert degrees(t.random_regular(10, 3, np.random.default_rng(0))) == [3]
    assert degrees(t.random_matching(8, np.random.default_rng(0))) == [1]
    assert degrees(t.random_matching(7, np.random.default_rng(0))) == [0, 1]
    assert t.connected(t.erdos_renyi(10, 0.3, np.random.default_rng(0)))
    assert t.parse_edges("0-1, 1-2;2-0") == [(0, 1), (1, 2), (2, 0)]
    edges = t.make_graph("edges", 3, edges=t.parse_edges("0-1,1-2"))
    assert edges.sum() == 4


def test_random_graphs_are_seeded():
    for name in ("regular", "erdos-renyi", "matching"):
        a = t.make_graph(name, 10, np.random.default_rng(5), degree=4)
        b = t.make_graph(name, 10, np.random.default_rng(5), degree=4)
        np.testing.assert_array_equal(a, b)


def test_bad_graphs_are_refused():
    with pytest.raises(ValueError, match="regular"):
        t.random_regular(5, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="outside"):
        t.from_edges(3, [(0, 3)])
    with pytest.raises(ValueError, match="Unknown graph"):
        t.make_graph("star", 3)
    with pytest.raises(ValueError, match="Unknown mixing"):
        t.mixing_matrix(t.ring(3), "laplacian")


def test_consensus_distance_formula():
    models = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0]])
    mean = models.mean(axis=0)  # (1, 1)
    expected = np.mean([np.sum((m - mean) ** 2) for m in models])  # (2 + 2 + 4) / 3
    assert (
        t.consensus_distance(models) == pytest.approx(expected) == pytest.approx(8 / 3)
    )
    assert t.consensus_distance(np.ones((4, 3))) == 0.0
