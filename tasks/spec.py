"""What data a run uses: the data spec, the dataset facts and a node's tensors.

This module is imported by the ClientApp on every message, so it stays light:
plain dataclasses, no torch or datasets import at module level.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def unknown_name_error(kind: str, name: str, known: Iterable[str]) -> ValueError:
    """A ValueError for an unknown ``kind`` name, listing the known ones."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"Unknown {kind} {name!r}.{hint} Known: {', '.join(known)}.")


@dataclass(frozen=True)
class DatasetInfo:
    """The facts a model needs: one example's shape and the number of classes."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int


@dataclass
class ClientData:
    """One node's data as CPU tensors (``y`` is int64).

    ``train_*`` is what local training uses; ``test_*`` is the node's own
    evaluation split (``DataSpec.val_fraction`` of its partition, seeded).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


# run-config key -> DataSpec field; the values are coerced to the field's type.
_RUN_CONFIG_KEYS = {
    "dataset": "dataset",
    "partitioner": "partitioner",
    "seed": "seed",
    "dirichlet-alpha": "dirichlet_alpha",
    "classes-per-partition": "classes_per_partition",
    "num-shards-per-partition": "num_shards_per_partition",
    "num-groups": "num_groups",
    "imbalance-factor": "imbalance_factor",
    "partition-by": "partition_by",
    "data-path": "data_path",
    "test-fraction": "test_fraction",
    "val-fraction": "val_fraction",
    "synthetic-alpha": "synthetic_alpha",
    "synthetic-beta": "synthetic_beta",
}


@dataclass(frozen=True)
class DataSpec:
    """Which dataset, how it is split into partitions, and with which seed.

    ``data_path`` (a parquet file or a ``datasets.save_to_disk`` folder) takes
    precedence over ``dataset``, which then only names the run. The central test
    split of generated or single-split data is ``test_fraction`` of it, held out
    (stratified, seeded) before partitioning; each partition is then split into
    the node's train and evaluation parts by ``val_fraction``.

    Unknown dataset or partitioner names and out-of-range numbers raise a
    ValueError when the spec is built, before any data is touched.
    """

    dataset: str = "digits"
    partitioner: str = "dirichlet"
    num_partitions: int = 10
    seed: int = 42
    dirichlet_alpha: float = 0.3
    classes_per_partition: int = 2
    num_shards_per_partition: int = 2
    num_groups: int = 4
    imbalance_factor: float = 0.02
    partition_by: str = "label"
    data_path: str = ""
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0

    def __post_init__(self) -> None:
        # Deferred imports: both modules import this one.
        from bouquet.tasks.catalog import list_datasets
        from bouquet.tasks.partitioners import list_partitioners

        if not self.data_path and self.dataset not in list_datasets():
            raise unknown_name_error("dataset", self.dataset, list_datasets())
        if self.partitioner not in list_partitioners():
            raise unknown_name_error(
                "partitioner", self.partitioner, list_partitioners()
            )
        if self.num_partitions < 1:
            raise ValueError(f"num-partitions must be >= 1, got {self.num_partitions}")
        for name in ("test_fraction", "val_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        if self.num_groups < 1:
            raise ValueError(f"num-groups must be >= 1, got {self.num_groups}")
        if not 0.0 < self.imbalance_factor <= 1.0:
            raise ValueError(
                f"imbalance-factor must be in (0, 1], got {self.imbalance_factor}"
            )

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, Any], num_partitions: int | None = None
    ) -> DataSpec:
        """Build a spec from Flower's kebab-case run config.

        Missing keys take the defaults above. ``num-partitions`` in the run
        config wins when it is > 0; otherwise ``num_partitions`` (typically the
        node config's value) is used, and the default when that is None too.
        """
        types = {f.name: f.type for f in fields(cls)}
        casts = {"str": str, "int": int, "float": float}
        values: dict[str, Any] = {}
        for key, name in _RUN_CONFIG_KEYS.items():
            if key in run_config:
                values[name] = casts[str(types[name])](run_config[key])
        configured = int(run_config.get("num-partitions", 0) or 0)
        if configured > 0:
            values["num_partitions"] = configured
        elif num_partitions is not None:
            values["num_partitions"] = int(num_partitions)
        return cls(**values)
