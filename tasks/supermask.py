"""Supermasks over frozen random weights (FRL), shared by server and client.

Ramanujan et al., "What's Hidden in a Randomly Weighted Neural Network?",
CVPR 2020 (edge-popup): a layer's weight is ``W * M(s)`` with ``W`` frozen at
a seeded signed-constant init and ``M(s)`` keeping the ``k`` fraction of
edges with the largest score ``s``. FRL (Mozaffari et al., USENIX Security
2023) trains the scores on the clients and votes on their rankings.

Both halves derive ``W`` and the initial scores from ``(seed, entry name)``,
so they never travel. Masked entries are the float entries with two or more
dimensions (Linear and Conv weights); rankings are *positions*: the position
of edge ``e`` is its index in the ascending order of scores (0 = least
important), ties broken by index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from bouquet.tasks.wire import derive_seed

GAIN = math.sqrt(2.0)  # ReLU networks (kaiming), as edge-popup's signed constant


def is_masked(value: np.ndarray) -> bool:
    """Whether a state-dict entry carries a supermask (a float weight, ndim >= 2)."""
    return value.dtype.kind == "f" and value.ndim >= 2


def masked_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The masked entries of a state dict, in order."""
    return [k for k, v in arrays.items() if is_masked(np.asarray(v))]


def frozen_weight(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Signed constant ``+-GAIN / sqrt(fan_in)``, signs seeded by name (float64)."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    rng = np.random.default_rng(derive_seed(seed, "frl-weight", name))
    signs = rng.integers(0, 2, size=shape) * 2 - 1
    return signs * (GAIN / math.sqrt(fan_in))


def initial_scores(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Kaiming-uniform scores, seeded by name (float64)."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    bound = math.sqrt(6.0 / fan_in)
    rng = np.random.default_rng(derive_seed(seed, "frl-scores", name))
    return rng.uniform(-bound, bound, size=shape)


def positions(scores: np.ndarray) -> np.ndarray:
    """Each edge's position in the ascending order of ``scores`` (int64)."""
    flat = np.asarray(scores).ravel()
    order = np.argsort(flat, kind="stable")
    out = np.empty(flat.size, dtype=np.int64)
    out[order] = np.arange(flat.size)
    return out.reshape(np.shape(scores))


def top_k_mask(scores: np.ndarray, k: float) -> np.ndarray:
    """1 for the ``round(k * n)`` edges of largest score, 0 elsewhere.

    The edges whose :func:`positions` are the last ``round(k * n)``; found by a
    partition (linear time: the client masks after every step), with the full
    sort only when ties straddle the threshold.
    """
    flat = np.asarray(scores).ravel()
    n = flat.size
    keep = round(k * n)
    if keep in (0, n):
        return np.full(np.shape(scores), float(keep == n))
    threshold = np.partition(flat, n - keep)[n - keep]
    mask = flat >= threshold
    if int(mask.sum()) != keep:
        mask = positions(flat) >= n - keep
    return mask.astype(np.float64).reshape(np.shape(scores))
