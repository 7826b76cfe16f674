"""Client state over ``Context.state`` (architecture rule 4).

``Context.state`` is the node's persistent RecordDict: it survives between
rounds (in simulation and in deployment, where every message is a new
process) and is reset for each new run. Keys are namespaced
``"<namespace>.<name>"`` so hooks of one recipe never collide. Absent on a
node's first round: the getters return ``None`` then.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from bouquet.tasks.arrays import array_record as arrays_to_record


def _key(namespace: str, name: str) -> str:
    return f"{namespace}.{name}"


def has_arrays(state: Mapping[str, Any], namespace: str, name: str) -> bool:
    """Whether arrays were saved under ``namespace.name`` (without decoding them)."""
    return state.get(_key(namespace, name)) is not None


def array_record(arrays: Mapping[str, Any]) -> ArrayRecord:
    """An ArrayRecord of numpy arrays (or tensors), in C order."""
    return arrays_to_record(arrays)


def load_arrays(
    state: Mapping[str, Any], namespace: str, name: str
) -> dict[str, np.ndarray] | None:
    """Arrays saved under ``namespace.name``, or None on the first round."""
    record = state.get(_key(namespace, name))
    if record is None:
        return None
    return {k: v.numpy() for k, v in record.items()}


def save_arrays(
    state: MutableMapping[str, Any],
    namespace: str,
    name: str,
    arrays: Mapping[str, np.ndarray],
) -> None:
    """Save arrays under ``namespace.name`` (replacing what was there)."""
    state[_key(namespace, name)] = array_record(arrays)


def load_values(
    state: Mapping[str, Any], namespace: str, name: str
) -> dict[str, Any] | None:
    """Scalars saved under ``namespace.name``, or None on the first round."""
    record = state.get(_key(namespace, name))
    return None if record is None else dict(record)


def save_values(
    state: MutableMapping[str, Any],
    namespace: str,
    name: str,
    values: Mapping[str, Any],
    *,
    metrics: bool = True,
) -> None:
    """Save scalars: as a MetricRecord (numbers) or a ConfigRecord (any config type)."""
    record_type = MetricRecord if metrics else ConfigRecord
    state[_key(namespace, name)] = record_type(dict(values))
