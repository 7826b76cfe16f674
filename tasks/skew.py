"""Partitioners of their own for personalised FL: grouped label skew, long tails.

flwr-datasets ``Partitioner`` subclasses (``tasks/partitioners.py`` names them
``grouped`` and ``long-tail``); seeded by the run's seed, like the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr_datasets.partitioner import Partitioner

if TYPE_CHECKING:
    from datasets import Dataset


class _RowsPartitioner(Partitioner):
    """A partitioner that computes every partition's row positions at once."""

    def __init__(self, num_partitions: int, partition_by: str, seed: int) -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        self._num_partitions = int(num_partitions)
        self._partition_by = partition_by
        self._seed = int(seed)
        self._rows: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def load_partition(self, partition_id: int) -> Dataset:
        if not 0 <= partition_id < self._num_partitions:
            raise ValueError(f"partition_id {partition_id} is out of range")
        if self._rows is None:
            labels = np.asarray(self.dataset[self._partition_by])
            self._rows = self.positions(labels, np.random.default_rng(self._seed))
        return self.dataset.select(self._rows[partition_id])

    def positions(self, labels: np.ndarray, rng: np.random.Generator) -> list:
        """Sorted row positions of every partition, from the labels."""
        raise NotImplementedError


class GroupedLabelPartitioner(_RowsPartitioner):
    """Grouped label skew: partitions drawn from latent groups of classes.

    Partition i belongs to group ``i mod G``; group g owns the classes (in
    sorted order, ``k``-th class) with ``k mod G = g``; every row of a class
    goes, in a seeded random order, to the group's partitions in turn (equal
    shares, up to one row). Clients of a group see the same classes, clients
    of different groups none in common: the setting where clustered and
    collaboration-based personalisation (ClusterPFL, FedCAC) can find the
    groups. Every row is used.
    """

    def __init__(
        self, num_partitions: int, partition_by: str, num_groups: int, seed: int
    ) -> None:
        super().__init__(num_partitions, partition_by, seed)
        if not 1 <= num_groups <= num_partitions:
            raise ValueError(
                f"num-groups must be in [1, num-partitions={num_partitions}], "
                f"got {num_groups}"
            )
        self._num_groups = int(num_groups)

    def group_of(self, partition_id: int) -> int:
        """The latent group of ``partition_id``."""
        return partition_id % self._num_groups

    def positions(self, labels: np.ndarray, rng: np.random.Generator) -> list:
        classes = np.unique(labels)
        if len(classes) < self._num_groups:
            raise ValueError(
                f"num-groups={self._num_groups} exceeds the {len(classes)} classes"
            )
        members = [
            list(range(g, self._num_partitions, self._num_groups))
            for g in range(self._num_groups)
        ]
        rows: list[list[np.ndarray]] = [[] for _ in range(self._num_partitions)]
        for k, label in enumerate(classes):
            group = members[k % self._num_groups]
            shuffled = rng.permutation(np.flatnonzero(labels == label))
            for j, part in enumerate(np.array_split(shuffled, len(group))):
                rows[group[j]].append(part)
        return [np.sort(np.concatenate(r)) for r in rows]


def long_tail_counts(counts: np.ndarray, imbalance_factor: float) -> np.ndarray:
    """Rows kept per class: ``n_max * IF ** (k / (C - 1))``, at most what exists.

    The exponential profile of the long-tailed CIFAR benchmarks (Cao et al.
    2019), class 0 the head; ``n_max`` is the largest class count.
    """
    c = len(counts)
    exponents = np.arange(c) / max(c - 1, 1)
    wanted = np.floor(counts.max() * imbalance_factor**exponents).astype(int)
    return np.maximum(np.minimum(wanted, counts), 1)


class LongTailPartitioner(_RowsPartitioner):
    """Long-tailed class counts, then a Dirichlet label skew over partitions.

    The pool is made long-tailed first (:func:`long_tail_counts`: the
    ``k``-th class in sorted order keeps that many rows, chosen at random,
    and the others are dropped), then each class's kept rows are split over
    the partitions by proportions drawn from ``Dir(alpha)``; the draw is
    repeated (at most 20 times) until every partition has ``min_size`` rows
    (at most a quarter of an even share of the kept rows).
    The central test split, held out before, stays balanced: generic
    accuracy is measured on balanced data, as in the Fed-LT papers.
    """

    def __init__(
        self,
        num_partitions: int,
        partition_by: str,
        imbalance_factor: float,
        alpha: float,
        min_size: int,
        seed: int,
    ) -> None:
        super().__init__(num_partitions, partition_by, seed)
        if not 0.0 < imbalance_factor <= 1.0:
            raise ValueError(
                f"imbalance-factor must be in (0, 1], got {imbalance_factor}"
            )
        self._imbalance_factor = float(imbalance_factor)
        self._alpha = float(alpha)
        self._min_size = int(min_size)

    def positions(self, labels: np.ndarray, rng: np.random.Generator) -> list:
        classes, counts = np.unique(labels, return_counts=True)
        kept = long_tail_counts(counts, self._imbalance_factor)
        pools = [
            rng.choice(np.flatnonzero(labels == label), size=n, replace=False)
            for label, n in zip(classes, kept, strict=True)
        ]
        n = self._num_partitions
        # The pool shrank: ask at most a quarter of an even share, as for
        # flwr-datasets' Dirichlet partitioner on small pools.
        min_size = min(self._min_size, max(2, int(kept.sum()) // (4 * n)))
        for _ in range(20):
            rows: list[list[np.ndarray]] = [[] for _ in range(n)]
            for pool in pools:
                shares = rng.dirichlet(np.full(n, self._alpha))
                cuts = (np.cumsum(shares)[:-1] * len(pool)).astype(int)
                for i, part in enumerate(np.split(pool, cuts)):
                    rows[i].append(part)
            merged = [np.sort(np.concatenate(r)) for r in rows]
            if min(len(r) for r in merged) >= min_size:
                return merged
        raise ValueError(
            f"{int(kept.sum())} long-tailed rows give some of {n} partitions fewer "
            f"than {min_size} rows in 20 draws; raise dirichlet-alpha or "
            "imbalance-factor, or use fewer partitions"
        )
