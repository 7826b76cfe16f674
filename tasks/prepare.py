"""From a ``Source`` to tensors: hold out, shuffle, partition, split, convert.

The order is fixed so that every process derives the same data from a spec:

1. the central test split is the source's own, or ``test_fraction`` of the
   rows held out first (stratified, seeded by ``seed``);
2. the remaining pool is shuffled with ``seed`` and handed to the partitioner;
3. each partition is split into the node's train and evaluation parts by
   ``val_fraction``, with a stream seeded by ``(seed, partition_id)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from bouquet.tasks.partitioners import make_partitioner
from bouquet.tasks.sources import Source, in_memory_dataset, open_source
from bouquet.tasks.spec import DataSpec

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

Tensors = dict[str, "torch.Tensor"]


def stratified_holdout(
    groups: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(kept, held_out)``: ``fraction`` of every group held out.

    A group always keeps at least one row, so no class or client vanishes
    from the pool.
    """
    rng = np.random.default_rng(seed)
    # One stable sort puts each group's rows together, ascending, in the order
    # of np.unique: the same draws as scanning ``groups == group`` per group,
    # without its O(rows x groups) cost (10,000 synthetic clients: 3.6 M rows).
    order = np.argsort(groups, kind="stable")
    _, starts = np.unique(groups[order], return_index=True)
    held = []
    for members in np.split(order, starts[1:]) if len(order) else []:
        members = rng.permutation(members)
        count = min(round(fraction * len(members)), len(members) - 1)
        held.append(members[:count])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = all_but(len(groups), held_out)
    return kept, held_out


def all_but(size: int, excluded: np.ndarray) -> np.ndarray:
    """``np.setdiff1d(np.arange(size), excluded)``, by a mask.

    numpy's hashing ``unique`` inside ``setdiff1d`` took 3 s per call on 4.5 M
    rows.
    """
    keep = np.ones(size, bool)
    keep[excluded] = False
    return np.flatnonzero(keep)


def local_split(
    size: int, fraction: float, seed: int, partition_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)`` of a partition; train keeps at least one row."""
    order = np.random.default_rng([seed, partition_id]).permutation(size)
    count = min(round(fraction * size), max(size - 1, 0))
    return np.sort(order[count:]), np.sort(order[:count])


def to_tensors(rows: Dataset, source: Source) -> tuple[torch.Tensor, torch.Tensor]:
    """Float inputs shaped ``(N, *input_shape)`` and int64 labels."""
    import torch

    if len(rows) == 0:
        return torch.zeros((0, *source.input_shape)), torch.zeros(0, dtype=torch.int64)
    columns = rows.with_format("numpy", columns=[source.feature, source.label])[:]
    return arrays_to_tensors(columns[source.feature], columns[source.label], source)


def arrays_to_tensors(
    x: np.ndarray, y: np.ndarray, source: Source
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`to_tensors` of rows already read as arrays (shares them if it can)."""
    import torch

    y = np.asarray(y, np.int64)
    if x.dtype == object:  # rows of different shapes are not stacked by datasets
        try:
            x = np.stack(list(x))
        except ValueError as exc:
            raise ValueError(f"Samples of {source.feature!r} differ in shape") from exc
    if source.image:
        x = x.astype(np.float32) / 255.0
        x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
        if x.shape[1:] != source.input_shape:
            raise ValueError(
                f"Images have shape {x.shape[1:]}, expected {source.input_shape}"
            )
        mean = np.asarray(source.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(source.std, np.float32).reshape(1, -1, 1, 1)
        x = (x - mean) / std
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(len(y), *source.input_shape)
    return torch.from_numpy(x), torch.from_numpy(y)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence datasets' progress bars and a pyarrow deprecation, then restore."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*null_placement.*")
            yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _column(rows: Dataset, name: str) -> np.ndarray:
    """One column as an array, converted in one go rather than row by row."""
    return rows.with_format("numpy", columns=[name])[:][name]


def _pool_column(source: Source, name: str) -> np.ndarray:
    """A column of the pool: its own array if it has one, else read from it."""
    if source.arrays is not None and name in source.arrays:
        return source.arrays[name]
    return _column(source.pool, name)


def _select(rows: Dataset, indices: np.ndarray) -> Dataset:
    # Naming the result ourselves spares datasets from pickling the indices
    # to fingerprint it (a third of the build time on small data).
    fingerprint = hashlib.sha256(indices.tobytes()).hexdigest()[:32]
    return rows.select(indices, new_fingerprint=f"bouquet-select-{fingerprint}")


def _held_out_rows(spec: DataSpec, source: Source) -> np.ndarray | None:
    """Rows of ``source.pool`` held out as the central test, or None."""
    if source.central is not None:
        return None
    groups = _pool_column(source, source.natural_id or source.label)
    return stratified_holdout(groups, spec.test_fraction, spec.seed)[1]


def _partition_column(spec: DataSpec, source: Source) -> str:
    if spec.partition_by != "label":
        column = spec.partition_by
    elif spec.partitioner == "natural-id" or source.sequence:
        # Per-token targets are no class to split by: the natural groups are.
        column = source.natural_id or source.label
    else:
        column = source.label
    if column not in source.pool.column_names:
        raise ValueError(
            f"partition-by column {column!r} not in the dataset "
            f"({source.pool.column_names})"
        )
    return column


def _partitioned_rows(spec: DataSpec, source: Source) -> list[np.ndarray]:
    """The pool rows of every partition.

    The partitioner sees a small in-memory table (the column it partitions by
    and the row number) rather than the pool itself: no image is decoded and
    no indices cache is written next to on-disk data.
    """
    held = _held_out_rows(spec, source)
    rows = np.arange(len(source.pool))
    if held is not None:
        rows = all_but(len(source.pool), held)
    rows = np.random.default_rng(spec.seed).permutation(rows)
    column = _partition_column(spec, source)
    values = _pool_column(source, column)[rows]
    if spec.partitioner == "natural-id":
        # Ids in sorted order: partition i is the i-th id whatever the seed
        # (synthetic client i, the i-th writer), each still shuffled inside.
        order = np.argsort(values, kind="stable")
        return _check_count(
            spec, column, natural_id_partitions(rows[order], values[order])
        )
    keys = in_memory_dataset(**{column: values, "row": rows})
    partitioner = make_partitioner(spec, column, len(keys))
    partitioner.dataset = keys
    try:
        found = partitioner.num_partitions
        partitions = [
            _column(partitioner.load_partition(i), "row") for i in range(found)
        ]
    except ValueError as exc:
        raise ValueError(
            f"Cannot split {len(keys)} rows of {spec.dataset!r} into "
            f"{spec.num_partitions} {spec.partitioner!r} partitions: {exc}"
        ) from exc
    return _check_count(spec, column, partitions)


def _check_count(
    spec: DataSpec, column: str, partitions: list[np.ndarray]
) -> list[np.ndarray]:
    found = len(partitions)
    if found != spec.num_partitions:
        raise ValueError(
            f"natural-id over {column!r} gives {found} partitions, but "
            f"num-partitions is {spec.num_partitions}; run {found} nodes or "
            f"set num-partitions={found}."
        )
    return partitions


def natural_id_partitions(rows: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    """``rows`` split by ``ids`` (sorted): partition i holds the i-th smallest id.

    What flwr-datasets' ``NaturalIdPartitioner`` gives for the same table (ids
    numbered in sorted order, rows in table order; tested equal), without its
    per-row Python loop and one ``Dataset.select`` per partition: 10,000
    partitions took minutes that way.
    """
    if len(ids) == 0:
        return []
    _, starts = np.unique(ids, return_index=True)
    return np.split(rows, starts[1:])


POOL_IN_MEMORY_BYTES = 2**30
"""Largest pool (as float32 inputs) converted to tensors once for all partitions.

Below it, partitions are cut from one tensor of the whole pool; above it, each
partition is converted on its own (``datasets`` select and format: about 10 ms
per partition, which adds up to minutes over 10,000 partitions). The values are
the same either way (``to_tensors`` is elementwise; tested).
"""


def _pool_tensors(source: Source) -> tuple[torch.Tensor, torch.Tensor] | None:
    if source.arrays is not None:  # in memory already: a view, not a copy
        x, y = source.arrays[source.feature], source.arrays[source.label]
        return arrays_to_tensors(x, y, source)
    size = len(source.pool) * math.prod(source.input_shape) * 4
    if size > POOL_IN_MEMORY_BYTES:
        return None
    return to_tensors(source.pool, source)


def torch_index(rows: np.ndarray) -> torch.Tensor:
    """Row numbers as an int64 tensor, for indexing a pool tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))


def open_source_quietly(spec: DataSpec) -> Source:
    """``open_source(spec)`` without datasets' progress bars."""
    with _quiet():
        return open_source(spec)


def build_partitions(
    spec: DataSpec, source: Source | None = None
) -> Iterator[tuple[int, Tensors]]:
    """Yield ``(partition_id, tensors)`` for every partition, one at a time.

    ``tensors`` holds ``train_x``, ``train_y``, ``test_x`` and ``test_y``.
    Partitioning needs the whole pool anyway, so all partitions come out of one
    pass; yielding them one by one bounds memory to a single partition.
    ``source`` is ``open_source(spec)``, if already open.
    """
    if source is None:
        source = open_source_quietly(spec)
    with _quiet():
        partitions = _partitioned_rows(spec, source)
        pool = _pool_tensors(source)
    for partition_id, rows in enumerate(partitions):
        if pool is not None:
            index = torch_index(rows)
            x, y = pool[0][index], pool[1][index]
        else:
            with _quiet():
                x, y = to_tensors(_select(source.pool, rows), source)
        train, test = local_split(len(y), spec.val_fraction, spec.seed, partition_id)
        yield (
            partition_id,
            {
                "train_x": x[train],
                "train_y": y[train],
                "test_x": x[test],
                "test_y": y[test],
            },
        )


def build_central_test(spec: DataSpec, source: Source | None = None) -> Tensors:
    """The central test split as ``{"x": ..., "y": ...}`` (``source`` as above)."""
    if source is None:
        source = open_source_quietly(spec)
    if source.central is None and spec.test_fraction == 0:
        raise ValueError(
            f"{spec.dataset!r} has no test split of its own and test-fraction is 0: "
            "there is no central test set."
        )
    with _quiet():
        held = _held_out_rows(spec, source)
        if held is None:
            x, y = to_tensors(source.central, source)
        elif source.arrays is not None:
            # Indexing the arrays, not formatting a selection of the pool:
            # 10,000 synthetic clients' central test took 30 s and 1.2 GB so.
            x, y = arrays_to_tensors(
                source.arrays[source.feature][held],
                source.arrays[source.label][held],
                source,
            )
        else:
            x, y = to_tensors(_select(source.pool, held), source)
    return {"x": x, "y": y}
