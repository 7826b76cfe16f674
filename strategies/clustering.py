"""Small clustering rules for detectors, in NumPy (no scikit-learn on the server).

Detectors cluster a few dozen client vectors per round, so the plain
algorithms over a distance matrix are enough and exactly reproducible:

- :func:`dbscan`: Ester et al., KDD 1996, with scikit-learn's conventions (a
  point counts itself among its ``min_samples`` neighbours; a border point
  joins the first cluster that reaches it, in index order; noise is -1);
- :func:`two_means`: Lloyd's k-means with k = 2 from the two farthest points
  (deterministic, no seeding);
- :func:`largest_gap_split`: the midpoint of the largest gap between sorted
  values (MUD-HoG's ``find_separate_point``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def distance_matrix(points: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``points`` (float64)."""
    points = np.asarray(points, dtype=np.float64)
    norms = np.sum(points**2, axis=1)
    squared = norms[:, None] + norms[None, :] - 2.0 * points @ points.T
    distances = np.sqrt(np.maximum(squared, 0.0))
    np.fill_diagonal(distances, 0.0)
    return distances


def dbscan(distances: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """Cluster labels ``0, 1, ...`` (-1 = noise) from a distance matrix."""
    neighbours = np.asarray(distances) <= eps
    core = neighbours.sum(axis=1) >= min_samples
    labels = np.full(len(neighbours), -1)
    cluster = 0
    for seed in range(len(neighbours)):
        if not core[seed] or labels[seed] != -1:
            continue
        labels[seed] = cluster
        frontier = [seed]
        while frontier:
            point = frontier.pop()
            for other in np.flatnonzero(neighbours[point]):
                if labels[other] == -1:
                    labels[other] = cluster
                    if core[other]:
                        frontier.append(int(other))
        cluster += 1
    return labels


def two_means(points: np.ndarray, max_iterations: int = 100) -> np.ndarray:
    """Labels 0/1 of k-means with k = 2, started from the two farthest points."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) < 2:
        return np.zeros(len(points), dtype=int)
    first, second = np.unravel_index(
        np.argmax(distance_matrix(points)), (len(points),) * 2
    )
    centres = points[[first, second]]
    labels = np.full(len(points), -1)
    for _ in range(max_iterations):
        to_centres = np.stack(
            [np.sum((points - c) ** 2, axis=1) for c in centres], axis=1
        )
        new = np.argmin(to_centres, axis=1)  # ties go to cluster 0
        if np.array_equal(new, labels):
            break
        labels = new
        centres = np.stack(
            [
                points[labels == j].mean(axis=0) if np.any(labels == j) else centres[j]
                for j in (0, 1)
            ]
        )
    return labels


def largest_gap_split(values: Sequence[float]) -> float:
    """Midpoint of the largest gap between the sorted values (0 for fewer than 2)."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    if len(ordered) < 2:
        return 0.0
    gap = int(np.argmax(np.diff(ordered)))
    return float((ordered[gap] + ordered[gap + 1]) / 2)
