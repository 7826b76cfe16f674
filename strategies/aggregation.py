"""Aggregation helpers shared by every strategy: pure functions over arrays.

Arrays are ``dict[str, np.ndarray]`` in state-dict order. Helpers never modify
their inputs. Means are accumulated in float64 and cast back to each array's
dtype, so the result does not depend on how many replies there were; integer
arrays (e.g. BatchNorm's ``num_batches_tracked``) are rounded back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord

from bouquet.tasks.arrays import array_record, array_view, npy_view

__all__ = ["array_view", "npy_view"]  # re-exported: the server's readers

NDArrays = dict[str, np.ndarray]


def to_numpy(record: ArrayRecord) -> NDArrays:
    """ArrayRecord -> ordered dict of read-only numpy arrays (views, no copy)."""
    return {k: array_view(v) for k, v in record.items()}


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Ordered dict of numpy arrays -> ArrayRecord."""
    return array_record(arrays)


def cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``value`` in the dtype of ``like``; integers are rounded, not truncated."""
    if value.dtype == like.dtype:
        return value
    if like.dtype.kind in "iub":
        return np.rint(value).astype(like.dtype)
    return value.astype(like.dtype)


def weighted_sum(
    arrays: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    reference: Mapping[str, np.ndarray] | None = None,
) -> NDArrays:
    """``sum_i w_i x_i`` per key in float64, unnormalised.

    With ``reference``: ``sum_i w_i (x_i - reference)`` (weighted client
    updates).

    The one accumulation loop of the package: one layer of float64 at a time,
    never a float64 copy of every reply (8.8 GB for 100 replies of 1.1e7
    parameters). Weights are float64: a Python float times a float32 array
    would stay float32 (NEP 50).
    """
    if len(arrays) != len(weights) or not arrays:
        raise ValueError(f"{len(weights)} weights for {len(arrays)} sets of arrays.")
    w64 = np.asarray(weights, dtype=np.float64)
    keys_from = arrays[0] if reference is None else reference
    out: NDArrays = {}
    for key, ref in keys_from.items():
        base = None if reference is None else ref.astype(np.float64)
        acc = np.zeros(ref.shape, dtype=np.float64)
        for w, a in zip(w64, arrays, strict=True):
            acc += w * (a[key] if base is None else a[key] - base)
        out[key] = acc
    return out


def mean64(
    arrays: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float] | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
) -> NDArrays:
    """Weighted mean in float64 of the ``x_i``, or of ``x_i - reference``.

    ``sum_i w_i x_i / sum_i w_i``; uniform when ``weights`` is None.
    """
    if not arrays:
        raise ValueError("A mean needs at least one set of arrays.")
    w = np.ones(len(arrays)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(arrays),) or w.sum() <= 0 or (w < 0).any():
        raise ValueError(f"Invalid weights {list(w)} for {len(arrays)} replies.")
    return weighted_sum(arrays, w / w.sum(), reference)


def weighted_mean(
    arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float] | None = None
) -> NDArrays:
    """Weighted mean of several array dicts (uniform when ``weights`` is None).

    Accumulated in float64, then cast back to each array's dtype.
    """
    mean = mean64(arrays, weights)
    return {k: cast_like(v, arrays[0][k]) for k, v in mean.items()}


def coordinate_median(layers: Sequence[np.ndarray]) -> np.ndarray:
    """Coordinate-wise median of equally shaped arrays; equals ``np.median(axis=0)``.

    Taken from a sort along the replies' axis, which numpy vectorises: 2.6x
    faster than ``np.median``'s partition for 100 float32 replies of 1.4e6
    values (0.96 s vs 2.46 s on 2 CPUs).
    """
    ordered = np.sort(np.stack(layers), axis=0)
    mid = len(layers) // 2
    if len(layers) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def gram_matrix(
    replies: Sequence[Mapping[str, np.ndarray]],
    reference: Mapping[str, np.ndarray] | None = None,
    block: int = 1 << 20,
) -> np.ndarray:
    """``K_ij = <x_i, x_j>`` over the replies' arrays (all keys, flattened).

    With ``reference``: the Gram matrix of the updates ``x_i - reference``.
    Accumulated over column blocks of one layer at a time, in float64: memory
    is ``m * block`` doubles plus one layer of every reply, never the whole
    ``(m, d)`` stack (which at m = 100 and d = 1.1e7 is 8.8 GB per copy).
    """
    m = len(replies)
    gram = np.zeros((m, m))
    for key in replies[0] if reference is None else reference:
        layer = [np.asarray(reply[key]).ravel() for reply in replies]
        base = None if reference is None else np.asarray(reference[key]).ravel()
        for start in range(0, layer[0].size, block):
            x = np.stack([a[start : start + block] for a in layer]).astype(np.float64)
            if base is not None:
                x -= base[start : start + block]
            gram += x @ x.T
    return gram


def pairwise_sq_distances(
    replies: Sequence[Mapping[str, np.ndarray]], block: int = 1 << 20
) -> np.ndarray:
    """Squared L2 distances between the replies' arrays (all keys, flattened).

    From their Gram matrix (:func:`gram_matrix`, block by block in float64).
    """
    gram = gram_matrix(replies, block=block)
    norms = np.diag(gram)
    distances = np.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
    np.fill_diagonal(distances, 0.0)
    return distances
