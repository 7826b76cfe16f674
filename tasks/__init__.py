"""What is learned: datasets, partitioners and models, by name.

Importing this package is cheap: the public names are loaded from their
submodules on first use (PEP 562), so a ClientApp pays for torch, datasets or
scikit-learn only when it needs them, and a cached partition never imports
``datasets`` at all.

>>> from tasks import DataSpec, load_client_data, build_model, dataset_info
>>> spec = DataSpec(dataset="digits", partitioner="dirichlet", num_partitions=10)
>>> data = load_client_data(spec, partition_id=3)
>>> model = build_model("cnn", dataset_info(spec), norm="group", seed=0)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bouquet.tasks.catalog import dataset_info, list_datasets
    from bouquet.tasks.data import load_central_test, load_client_data
    from bouquet.tasks.models import build_model, list_models, resolve_device
    from bouquet.tasks.partitioners import list_partitioners
    from bouquet.tasks.spec import ClientData, DatasetInfo, DataSpec

_EXPORTS = {
    "DataSpec": "bouquet.tasks.spec",
    "ClientData": "bouquet.tasks.spec",
    "DatasetInfo": "bouquet.tasks.spec",
    "dataset_info": "bouquet.tasks.catalog",
    "list_datasets": "bouquet.tasks.catalog",
    "list_partitioners": "bouquet.tasks.partitioners",
    "load_client_data": "bouquet.tasks.data",
    "load_central_test": "bouquet.tasks.data",
    "build_model": "bouquet.tasks.models",
    "list_models": "bouquet.tasks.models",
    "resolve_device": "bouquet.tasks.models",
}

__all__ = [
    "ClientData",
    "DataSpec",
    "DatasetInfo",
    "build_model",
    "dataset_info",
    "list_datasets",
    "list_models",
    "list_partitioners",
    "load_central_test",
    "load_client_data",
    "resolve_device",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tasks' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
