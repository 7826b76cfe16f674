"""FLAG's flag median against known answers on hand-made subspaces."""

import json
from pathlib import Path

import numpy as np
import pytest

from bouquet.strategies.context import RoundContext
from bouquet.strategies.flag import Flag, FlagMedian, flag_median, flag_objective
from bouquet.strategies.validation import ClientReply


def _replies(points):
    return [
        ClientReply(
            node=n, partition=n, num_examples=1, metrics={}, arrays={"w": np.array(v)}
        )
        for n, v in enumerate(points)
    ]


def _ctx(dim, seed=0, server_round=1):
    x = {"w": np.zeros(dim)}
    nodes = tuple(range(8))
    return RoundContext(server_round, None, "train", nodes, nodes, x, {}, seed=seed)


def _unit_rows(angles_degrees):
    angles = np.radians(angles_degrees)
    return np.stack([np.cos(angles), np.sin(angles)])  # 2 x p, unit columns


def test_orthogonal_outlier_is_projected_away():
    # Three clients along e1 (different scales), one along e3; r = 1.
    # The flag median is e1; G = (1/r) sum_i Y Y^T u_i = 3 e1 (unit norm).
    points = [[2.0, 0, 0], [0.5, 0, 0], [1.0, 0, 0], [0, 0, 7.0]]
    delta, _ = FlagMedian(r=1, norm="unit").update(
        _replies(points), np.full(4, 0.25), None, _ctx(3)
    )
    np.testing.assert_allclose(delta["w"], [3.0, 0.0, 0.0], atol=1e-9)


def test_median_norm_rescales_to_the_median_update_norm():
    points = [[2.0, 0, 0], [0.5, 0, 0], [1.0, 0, 0], [0, 0, 7.0]]
    delta, _ = FlagMedian(r=1).update(_replies(points), np.full(4, 0.25), None, _ctx(3))
    # Median of the norms (2, 0.5, 1, 7) is 1.5; the direction stays e1.
    np.testing.assert_allclose(delta["w"], [1.5, 0.0, 0.0], atol=1e-9)


def test_two_dimensional_subspace_keeps_both_axes_and_drops_the_third():
    # r = 2; two clients on e1, two on e2, one on e3: Y = span(e1, e2)
    # (weights (1 - v)^(-1/4) favour the axes with two clients).
    points = [[1.0, 0, 0], [3.0, 0, 0], [0, 1.0, 0], [0, 2.0, 0], [0, 0, 1.0]]
    delta, _ = FlagMedian(r=2, n_its=5, norm="unit").update(
        _replies(points), np.full(5, 0.2), None, _ctx(3)
    )
    np.testing.assert_allclose(delta["w"], [1.0, 1.0, 0.0], atol=1e-9)


def test_irls_reaches_the_flag_median_found_by_grid_search():
    # Unit vectors in R^2 at 0, 10, 20 and 90 degrees; r = 1. The flag median
    # minimises sum_i |sin(theta - theta_i)|, concave between the data, so it
    # sits on a data line: brute force over a fine grid finds 10 degrees.
    degrees = [0.0, 10.0, 20.0, 90.0]
    u = _unit_rows(degrees)
    grid = np.radians(np.linspace(0.0, 180.0, 180_001))
    values = np.abs(np.sin(grid[:, None] - np.radians(degrees))).sum(axis=1)
    assert np.degrees(grid[np.argmin(values)]) == pytest.approx(10.0)
    start = np.array([[0.6, 0.7, 0.1, 0.3]])  # any Y_0^T U that is not optimal
    a, projections = flag_median(u.T @ u, start, r=1, n_its=200)
    y = u @ a[:, 0]
    # eps = 1e-7 caps the weight of the data point IRLS converges to.
    assert np.degrees(np.arctan2(y[1], y[0])) % 180 == pytest.approx(10.0, abs=0.05)
    assert flag_objective(projections, 0.0) == pytest.approx(values.min(), rel=1e-4)
    # The flag mean (one unweighted step) is pulled toward the 90-degree outlier.
    mean_a, _ = flag_median(u.T @ u, np.zeros((1, 4)), r=1, n_its=1)
    y_mean = u @ mean_a[:, 0]
    assert np.degrees(np.arctan2(y_mean[1], y_mean[0])) % 180 > 12.0


def test_pairwise_term_matches_its_definition():
    u = _unit_rows([0.0, 30.0, 100.0])
    projections = np.array([[1.0, 0.0]]) @ u  # Y = e1
    expected = np.abs(np.sin(np.radians([0.0, 30.0, 100.0]))).sum()
    pair = 0.0
    for i in range(3):
        for j in range(3):
            if i != j:
                pair += np.sqrt(abs(1 - (projections[0, i] - projections[0, j]) ** 2))
    assert flag_objective(projections, 2.0) == pytest.approx(expected + 2 / 6 * pair)


def test_seeded_start_and_zero_updates():
    points = [[1.0, 0.1, 0, 0], [0.9, -0.1, 0, 0], [0, 0, 0, 0], [0.2, 1.0, 0, 0]]
    combine = FlagMedian(r=1, lam=1.0)
    first, _ = combine.update(_replies(points), np.full(4, 0.25), None, _ctx(4))
    again, _ = combine.update(_replies(points), np.full(4, 0.25), None, _ctx(4))
    np.testing.assert_array_equal(first["w"], again["w"])
    assert np.all(np.isfinite(first["w"])) and first["w"][0] > 0.5


def test_registered_with_the_papers_defaults():
    strategy = Flag()
    assert (strategy.r, strategy.lambda_, strategy.n_its) == (4, 0.0, 1)
    combine = strategy.make_aggregator().combine
    assert combine == FlagMedian(4, 0.0, 1, 1e-7, "median")


OFFICIAL = json.loads(
    (Path(__file__).parent / "data" / "flag_official.json").read_text()
)


@pytest.mark.parametrize("case", sorted(OFFICIAL["aggregate"]))
def test_matches_the_official_irls_flag(case):
    # Numbers from the official FlagIRLS (repo and commit in the file's "source")
    # from the same Y_0: 7 gradients in R^12, one sign-flipped, one random.
    g = np.array(OFFICIAL["G"])
    u = g / np.linalg.norm(g, axis=0)
    y0, r = np.array(OFFICIAL["Y0"]), OFFICIAL["r"]
    lam, its = case.removeprefix("lam").split("_its")
    a, projections = flag_median(u.T @ u, y0.T @ u, r, float(lam), int(its))
    ours = u @ (a @ projections.sum(axis=1)) / r
    np.testing.assert_allclose(ours, OFFICIAL["aggregate"][case], atol=1e-12)
