"""Partitioners by name, all from ``flwr_datasets.partitioner``.

- ``iid``: equal random shares (``IidPartitioner``).
- ``dirichlet``: per-class shares drawn from Dir(alpha) (``DirichletPartitioner``).
- ``shard``: sort by label, cut shards, deal ``num-shards-per-partition`` each.
- ``pathological``: exactly ``classes-per-partition`` classes each; partition i
  gets class i mod C first ("first-deterministic", as in the paper that
  introduced it) and the others are drawn with the seed.
- ``natural-id``: one partition per value of a column (``NaturalIdPartitioner``).
- ``linear`` / ``exponential`` / ``square``: sizes proportional to i, e^i, i^2.
- ``grouped``: grouped label skew (``tasks/skew.py``): partitions
  form ``num-groups`` latent groups, group g owns the classes c with
  c mod G = g, and each class is dealt evenly among its group's partitions.
- ``long-tail``: long-tailed class counts (``tasks/skew.py``): class
  k of C keeps ``n_max * imbalance-factor ** (k / (C - 1))`` of its rows, the
  rest are dropped; the kept rows are split by Dir(``dirichlet-alpha``).

The pool handed to a partitioner is already shuffled with the run's seed, so the
order-based ones (``iid`` and the size-based ones) are random yet reproducible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

    from bouquet.tasks.spec import DataSpec

PARTITIONERS = (
    "iid",
    "dirichlet",
    "shard",
    "pathological",
    "natural-id",
    "linear",
    "exponential",
    "square",
    "grouped",
    "long-tail",
)

USES = {"grouped": ("num_groups",), "long-tail": ("imbalance_factor",)}
"""The ``DataSpec`` fields only some partitioners read (the cache key leaves
them out for the others, so adding them kept every existing cache valid)."""


def list_partitioners() -> list[str]:
    """Names accepted as ``partitioner``."""
    return list(PARTITIONERS)


def dirichlet_min_partition_size(num_rows: int, num_partitions: int) -> int:
    """10 samples per partition, scaled down for pools too small to allow it.

    The Dirichlet partitioner resamples until every partition reaches this size
    and gives up after 10 tries, so a fixed 10 would fail on small datasets.
    """
    return min(10, max(2, num_rows // (4 * num_partitions)))


def make_partitioner(spec: DataSpec, column: str, num_rows: int) -> Partitioner:
    """The flwr-datasets partitioner ``spec.partitioner`` names, over ``column``.

    ``column`` is the label column for the label-based partitioners and the id
    column for ``natural-id``; the size-based and ``iid`` ones ignore it.
    """
    from flwr_datasets import partitioner as fp

    from bouquet.tasks.skew import GroupedLabelPartitioner, LongTailPartitioner

    n, seed = spec.num_partitions, spec.seed
    match spec.partitioner:
        case "iid":
            return fp.IidPartitioner(n)
        case "dirichlet":
            return fp.DirichletPartitioner(
                num_partitions=n,
                partition_by=column,
                alpha=spec.dirichlet_alpha,
                min_partition_size=dirichlet_min_partition_size(num_rows, n),
                seed=seed,
            )
        case "shard":
            return fp.ShardPartitioner(
                num_partitions=n,
                partition_by=column,
                num_shards_per_partition=spec.num_shards_per_partition,
                seed=seed,
            )
        case "pathological":
            return fp.PathologicalPartitioner(
                num_partitions=n,
                partition_by=column,
                num_classes_per_partition=spec.classes_per_partition,
                class_assignment_mode="first-deterministic",
                seed=seed,
            )
        case "natural-id":
            return fp.NaturalIdPartitioner(partition_by=column)
        case "linear":
            return fp.LinearPartitioner(n)
        case "exponential":
            return fp.ExponentialPartitioner(n)
        case "square":
            return fp.SquarePartitioner(n)
        case "grouped":
            return GroupedLabelPartitioner(n, column, spec.num_groups, seed)
        case "long-tail":
            return LongTailPartitioner(
                n,
                column,
                spec.imbalance_factor,
                spec.dirichlet_alpha,
                dirichlet_min_partition_size(num_rows, n),
                seed,
            )
    raise AssertionError(f"unhandled partitioner {spec.partitioner!r}")
