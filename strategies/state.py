"""Server state: a typed snapshot that is checkpointed every round.

A checkpoint is two files written atomically side by side: ``<stem>.npz``
holds every array, ``<stem>.json`` the structure (round, scalars, which npz
entry goes where). No pickle is involved, so a checkpoint can be read without
trusting its author, and the JSON part stays human-readable.

It is the one checkpoint format of the package: the driver writes it after
every round (or model version) with the strategy's state
(:meth:`strategies.base.BouquetStrategy.export_state`) and its schedule's
(the asynchronous bookkeeping), both plain data: nested dicts and lists of
numpy arrays, Python scalars, strings and ``None``. Dict keys are strings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_ARRAY_TAG = "__array__"
FORMAT_VERSION = 2


@dataclass
class ServerState:
    """What a run needs to continue after round ``round``.

    Attributes
    ----------
    round : int
        Last completed server round (0 before the first).
    arrays : dict[str, np.ndarray]
        Global model, in state-dict order.
    strategy : dict[str, Any]
        The strategy's own state (server optimizer moments, per-client
        estimates, ...), as returned by ``export_state``.
    driver : dict[str, Any]
        The schedule's state (an asynchronous run's clock, tasks in flight).

    """

    round: int
    arrays: dict[str, np.ndarray]
    strategy: dict[str, Any] = field(default_factory=dict)
    driver: dict[str, Any] = field(default_factory=dict)


def _flatten(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Replace every array in ``value`` by a reference into ``arrays``."""
    if isinstance(value, np.ndarray):
        ref = f"a{len(arrays)}"
        arrays[ref] = value
        return {_ARRAY_TAG: ref}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _flatten(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_flatten(v, arrays) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"Cannot checkpoint a value of type {type(value).__name__}.")


def _unflatten(value: Any, arrays: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAY_TAG}:
            return np.array(arrays[value[_ARRAY_TAG]])
        return {k: _unflatten(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, arrays) for v in value]
    return value


def save_state(state: ServerState, stem: str | Path) -> None:
    """Write ``state`` to ``<stem>.npz`` and ``<stem>.json``, atomically."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    skeleton = {
        "format-version": FORMAT_VERSION,
        "round": state.round,
        "arrays": _flatten(dict(state.arrays), arrays),
        "array-order": list(state.arrays),
        "strategy": _flatten(state.strategy, arrays),
        "driver": _flatten(state.driver, arrays),
    }
    npz_tmp = stem.with_name(stem.name + ".npz.tmp")
    with open(npz_tmp, "wb") as fh:
        np.savez(fh, **arrays)
    json_tmp = stem.with_name(stem.name + ".json.tmp")
    json_tmp.write_text(json.dumps(skeleton, indent=1))
    # The JSON is replaced last: a reader that finds it finds a complete npz.
    os.replace(npz_tmp, stem.with_suffix(".npz"))
    os.replace(json_tmp, stem.with_suffix(".json"))


def load_state(stem: str | Path) -> ServerState:
    """Read a state written by :func:`save_state`."""
    stem = Path(stem)
    json_path = stem.with_suffix(".json")
    if not json_path.exists():
        raise FileNotFoundError(f"No checkpoint at {json_path}.")
    skeleton = json.loads(json_path.read_text())
    if skeleton.get("format-version") != FORMAT_VERSION:
        raise ValueError(
            f"{json_path} is checkpoint format {skeleton.get('format-version')}; "
            f"this version reads format {FORMAT_VERSION}. Resume it with the "
            "Bouquet version that wrote it."
        )
    with np.load(stem.with_suffix(".npz"), allow_pickle=False) as npz:
        arrays = _unflatten(skeleton["arrays"], npz)
        strategy = _unflatten(skeleton["strategy"], npz)
        driver = _unflatten(skeleton["driver"], npz)
    ordered = {k: arrays[k] for k in skeleton["array-order"]}
    return ServerState(
        round=int(skeleton["round"]), arrays=ordered, strategy=strategy, driver=driver
    )
