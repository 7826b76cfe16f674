"""Public data loaders: a node's partition and the central test set, cached.

A cache miss builds every partition of the spec in one pass and writes one file
per partition (``<cache>/<dataset>-<key>/partition-<id>.pt``): partitioning
needs the whole pool anyway, and in simulation the other nodes of the run ask
for their partitions right after. A hit is a single ``torch.load`` with no
import of ``datasets`` or ``flwr_datasets``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bouquet.tasks import prepare
from bouquet.tasks.cache import (
    cache_dir,
    cache_key,
    load_cached,
    path_fingerprint,
    save_atomic,
)
from bouquet.tasks.memo import PARTITIONS
from bouquet.tasks.partitioners import USES
from bouquet.tasks.spec import ClientData, DataSpec

if TYPE_CHECKING:
    from bouquet.tasks.prepare import Tensors
    from bouquet.tasks.sources import Source


def _data_identity(spec: DataSpec) -> dict[str, Any]:
    """What names the raw data: the dataset, or the local files' fingerprint."""
    if spec.data_path:
        return {"data_path": spec.data_path, "files": path_fingerprint(spec.data_path)}
    return {"dataset": spec.dataset}


def _label(spec: DataSpec) -> str:
    return "local" if spec.data_path else spec.dataset


def partitions_dir(spec: DataSpec) -> Path:
    """The cache folder holding ``spec``'s partition files."""
    root = cache_dir()
    if spec.data_path:  # its key includes the files' times: never remembered
        return root / f"{_label(spec)}-{cache_key(_fields(spec))}"
    key = (spec, root)
    if (known := _DIRS.get(key)) is None:
        known = root / f"{_label(spec)}-{cache_key(_fields(spec))}"
        if len(_DIRS) < 1024:
            _DIRS[key] = known
    return known


_DIRS: dict[tuple[DataSpec, Path], Path] = {}
"""Folders of generated or hub data by spec: hashing the spec cost 0.3 ms of
every client call."""


def _fields(spec: DataSpec) -> dict[str, Any]:
    fields = dataclasses.asdict(spec)
    for partitioner, names in USES.items():
        if spec.partitioner != partitioner:
            for name in names:
                fields.pop(name)
    return {**fields, **_data_identity(spec)}


def central_test_path(spec: DataSpec) -> Path:
    """The cache file of ``spec``'s central test split.

    Its key leaves out the partitioning, which does not change the held-out
    rows; the synthetic data's and sbm-graph's size depends on the number of
    clients though (and sbm-graph's labels on ``dirichlet-alpha``).
    """
    fields: dict[str, Any] = {
        **_data_identity(spec),
        "seed": spec.seed,
        "test_fraction": spec.test_fraction,
    }
    if spec.dataset == "synthetic" and not spec.data_path:
        fields.update(
            num_partitions=spec.num_partitions,
            alpha=spec.synthetic_alpha,
            beta=spec.synthetic_beta,
        )
    if spec.dataset == "sbm-graph" and not spec.data_path:
        # One community per partition; dirichlet-alpha sets their label mixes.
        fields.update(
            num_partitions=spec.num_partitions, label_alpha=spec.dirichlet_alpha
        )
    return cache_dir() / f"{_label(spec)}-central-{cache_key(fields)}.pt"


def load_client_data(spec: DataSpec, partition_id: int) -> ClientData:
    """Partition ``partition_id`` of ``spec``, split into train and evaluation.

    Parameters
    ----------
    spec : DataSpec
        The dataset, partitioner and seed.
    partition_id : int
        In ``[0, spec.num_partitions)``.

    Returns
    -------
    ClientData
        CPU tensors; the evaluation part is ``spec.val_fraction`` of the
        partition.

    """
    if not 0 <= partition_id < spec.num_partitions:
        raise ValueError(
            f"partition-id {partition_id} is outside [0, {spec.num_partitions})"
        )
    tensors = _remembered(_partition_path(spec, partition_id))
    if tensors is None:
        tensors = _build_partitions(spec, keep=partition_id)
    return ClientData(**tensors)


def _remembered(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached file's tensors, kept in this process's memory once read."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    return PARTITIONS.get(key, lambda: load_cached(path))


def load_central_test(spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out test split ``(x, y)`` for server-side evaluation, cached."""
    tensors = load_cached(central_test_path(spec))
    if tensors is None:
        tensors = _build_central_test(spec)
    return tensors["x"], tensors["y"]


def _partition_path(spec: DataSpec, partition_id: int) -> Path:
    return partitions_dir(spec) / f"partition-{partition_id}.pt"


def _build_partitions(
    spec: DataSpec, source: Source | None = None, keep: int | None = None
) -> Tensors | None:
    """Build and cache every partition; return partition ``keep``'s tensors."""
    kept = None
    for built_id, built in prepare.build_partitions(spec, source):
        save_atomic(built, _partition_path(spec, built_id))
        if built_id == keep:
            kept = built
    return kept


def _build_central_test(spec: DataSpec, source: Source | None = None) -> Tensors:
    tensors = prepare.build_central_test(spec, source)
    save_atomic(tensors, central_test_path(spec))
    return tensors


def missing_caches(spec: DataSpec) -> tuple[bool, bool]:
    """Whether ``spec``'s partition files and its central test are not cached."""
    return (
        not _partition_path(spec, 0).is_file(),
        not central_test_path(spec).is_file(),
    )


def prepare_caches(spec: DataSpec) -> None:
    """Fill ``spec``'s partition files and central test cache, from one source.

    What is cached already is kept. Generated data (synthetic) is generated
    once for both, not once per cache. A dataset without a central test (no
    split of its own, ``test_fraction`` 0) gets none; the ServerApp says so.
    """
    partitions_missing, central_missing = missing_caches(spec)
    if not (partitions_missing or central_missing):
        return
    source = prepare.open_source_quietly(spec)
    if partitions_missing:
        _build_partitions(spec, source)
    if central_missing and (source.central is not None or spec.test_fraction > 0):
        _build_central_test(spec, source)


def main(argv: list[str] | None = None) -> None:
    """``python -m bouquet.tasks.data '<DataSpec as JSON>'``: :func:`prepare_caches`.

    The ServerApp runs this in a process of its own before round 1 of a
    simulation (``serverapps.run.prepare_client_data``).
    """
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m bouquet.tasks.data '<DataSpec as JSON>'")
    prepare_caches(DataSpec(**json.loads(args[0])))


if __name__ == "__main__":
    main()
