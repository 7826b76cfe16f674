"""FedLoGe's SSE-C: a sparse simplex-ETF classifier, refined once and then frozen.

Xiao et al., "FedLoGe: Joint Local and Generic Federated Learning under
Long-tailed Data", ICLR 2024, https://arxiv.org/abs/2401.08977 (section 3.2;
the official repository's ``util/etf_methods.py`` for the refinement).
"""

from __future__ import annotations

import functools

import numpy as np


def simplex_etf(dim: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """``sqrt(C / (C - 1)) P (I - 11^T / C)`` (``dim x C``; P orthonormal columns)."""
    if dim < classes:
        raise ValueError(f"a simplex ETF needs dim >= classes; got {dim} < {classes}")
    basis, _ = np.linalg.qr(rng.uniform(size=(dim, classes)))
    centring = np.eye(classes) - np.full((classes, classes), 1.0 / classes)
    return np.sqrt(classes / (classes - 1)) * basis @ centring


@functools.lru_cache(maxsize=8)
def sparse_etf(
    dim: int,
    classes: int,
    seed: int,
    sparsity: float = 0.6,
    norm: float = 0.1,
    steps: int = 200,
    lr: float = 5e-3,
) -> np.ndarray:
    """The SSE-C weight, ``C x dim`` (float32): one row per class.

    A simplex ETF with a random ``sparsity`` share of its entries zeroed, then
    ``steps`` Adam steps (zeros stay zero) on
    ``sum_c (||M_c|| - norm)^2 - mean_c arccos(max_{c' != c} cos(M_c, M_c'))``:
    column norms to ``norm``, the smallest angle between classes maximised.
    A pure function of its arguments, remembered (read-only result): runs in
    one process (tests, sweeps) build it once.
    """
    rng = np.random.default_rng(seed)
    etf = simplex_etf(dim, classes, rng)
    keep = rng.random(etf.shape) >= sparsity
    refined = refine(etf * keep, keep, norm=norm, steps=steps, lr=lr)
    result = refined.T.astype(np.float32)
    result.flags.writeable = False
    return result


def refine(
    start: np.ndarray, keep: np.ndarray, norm: float, steps: int, lr: float
) -> np.ndarray:
    """:func:`sparse_etf`'s refinement of ``start`` (``dim x C``), float64, same shape.

    ``steps`` Adam steps on the loss of :func:`sparse_etf`; entries where
    ``keep`` is false get no update.
    """
    import torch

    classes = start.shape[1]
    weight = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(keep, dtype=torch.float64)
    optimizer = torch.optim.Adam([weight], lr=lr)
    off_diagonal = ~torch.eye(classes, dtype=torch.bool)
    for _ in range(steps):
        optimizer.zero_grad()
        norms = weight.norm(dim=0)
        unit = weight / norms.clamp_min(1e-12)
        cosine = (unit.T @ unit)[off_diagonal].reshape(classes, classes - 1)
        nearest = torch.arccos(cosine.max(dim=1).values.clamp(-1 + 1e-7, 1 - 1e-7))
        loss = ((norms - norm) ** 2).sum() - nearest.mean()
        loss.backward()
        weight.grad *= mask  # sparse entries stay zero
        optimizer.step()
    return (weight.detach() * mask).numpy()
