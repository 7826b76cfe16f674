"""Soft labels keyed by sample id: the one format of knowledge exchanged as predictions.

KnFu (predictions on a shared transfer set) and FedD2S (a server head's
predictions on each node's own samples) send class-probability vectors as an
``ArrayRecord`` of ``{"<sample id>": float32[C]}``. Both halves use the helpers
here: :func:`keyed` builds the rows, :func:`distribution_problem` says why rows
are not probability vectors (the server checks replies with it, a node checks
what it receives with it before anything trains).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

SUM_TOLERANCE = 1e-3
"""How far from 1 a probability vector's sum may be (float32 softmax)."""


def keyed(
    values: np.ndarray, ids: Iterable[int] | None = None
) -> dict[str, np.ndarray]:
    """Rows of ``values`` (float32) keyed by sample id (default ``"0"``, ``"1"``...)."""
    names = range(len(values)) if ids is None else ids
    return {
        str(int(i)): np.asarray(row, dtype=np.float32)
        for i, row in zip(names, values, strict=True)
    }


def distribution_problem(
    rows: Mapping[str, np.ndarray] | np.ndarray, classes: int | None = None
) -> str | None:
    """Why ``rows`` (keyed rows or an ``N x C`` array) are not probabilities, or None.

    With ``classes``, every row must also have that many entries.
    """
    if isinstance(rows, Mapping):
        listed = [np.asarray(v) for v in rows.values()]
        if not listed:
            return "is empty"
        if any(r.ndim != 1 or r.dtype.kind != "f" for r in listed):
            return "has entries that are not float vectors"
        if len({r.shape for r in listed}) > 1:
            return "has entries of different lengths"
        values = np.stack(listed).astype(np.float64)
    else:
        values = np.asarray(rows, dtype=np.float64)
    if classes is not None and values.shape[1:] != (classes,):
        return f"has entries of {values.shape[1:]} values, expected ({classes},)"
    if not np.isfinite(values).all():
        return "has non-finite values"
    if (values < 0).any():
        return "has negative probabilities"
    if np.abs(values.sum(axis=1) - 1.0).max() > SUM_TOLERANCE:
        return "has rows that do not sum to 1"
    return None
