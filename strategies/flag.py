"""FLAG: the Flag Aggregator, a flag median of the client updates (robust).

Paper: Almasi, Mishra, Vamanan, Ravi. "Flag Aggregator: Scalable Distributed
Training under Failures and Augmented Losses using Convex Optimization",
ICLR 2024. https://arxiv.org/abs/2302.05865
Official code: github.com/hamidralmasi/FlagAggregator (``aggregators/flag.py``,
``aggregators/center_algorithms_torch.py``), read for the decisions below.

- **Server** (:class:`FlagMedian`, a combine rule): normalise the updates,
  ``u_i = Delta_i / ||Delta_i||``, and find the ``r``-dimensional subspace
  ``Y`` (``Y^T Y = I``) that best explains them, the flag median

  ``min_Y  sum_i sqrt(1 - ||Y^T u_i||^2)
  + lambda / (p (p - 1)) sum_{i != j} sqrt(|1 - ||Y^T (u_i - u_j)||^2|)``

  by FlagIRLS: from a seeded random ``Y_0``, each iteration weights every
  column by ``(|1 - ||Y^T u||^2| + eps)^(-1/4)`` (pairs also by
  ``lambda / (p (p - 1))``) and takes the top ``r`` left singular vectors of
  the weighted columns (a weighted flag mean). The update is
  ``G = (1/r) sum_i Y Y^T u_i``, applied by SGD at the server.
- **Client**: plain local SGD; the reply is the local model.

Everything is computed in the ``p``-dimensional span of the replies: with
``K`` the Gram matrix of the ``u_i`` (accumulated layer by layer,
:func:`~strategies.aggregation.gram_matrix`), ``Y = U A`` and the top
singular vectors come from the eigenvectors of ``B^T K B`` (``B`` the column
weights), never from an ``n x p`` SVD (spec: "do the SVD on the Gram
matrix"). ``G = U c`` is a weighted sum of the updates. From the same
``Y_0``, it equals the official ``irls_flag`` to 1e-12 (golden numbers in
``tests/strategies/data/flag_official.json``, with the commit).

Wire protocol: FedAvg's. Server state: the server optimizer's momentum.

Decisions where the spec was open:

- FL pseudo-gradients are the model updates ``Delta_i = y_i - x``; ``Y Y^T``
  ignores signs, so ``G`` is a step direction: ``x <- x + server-lr * G``.
- ``norm = "median"`` (default) rescales ``G`` to the median norm of the
  updates: the paper's ``G`` has norm about (agreeing clients) / r whatever
  the updates' scale, tuned there with a server lr of 0.2 on minibatch
  gradients; an FL round's update has its own scale. ``norm = "unit"`` is the
  paper's ``G`` unchanged (retune ``server-lr``).
- ``Y_0``: Gaussian ``n x r`` drawn from ``(seed, round)``, orthonormalised
  through the Cholesky factor of ``R^T R`` (``Y_0 = R L^{-T}``); the official
  code draws uniform ``[-0.5, 0.5)`` values with a fixed torch seed and QR
  (the same subspace law, since ``QR`` and ``R L^{-T}`` span the same
  columns; a different stream).
- As the official ``irls_flag``, iterations stop after ``n-its`` (default 1,
  the official aggregator's) or when the objective stops decreasing by
  1e-10, keeping the better iterate; but the first iterate is always taken
  (``Y_0`` is random noise outside the replies' span). The objective
  includes the pairwise term (the official code's stopping test does not).
- A zero update has no direction: its ``u_i`` is 0 and it adds nothing.
- When the replies span fewer than ``r`` dimensions, ``Y`` has as many columns
  as they span; the ``1/r`` factor keeps the configured ``r``.
- Reply weights (``num-examples``) are not used (the paper's rule is
  unweighted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bouquet.strategies.aggregation import gram_matrix, weighted_sum
from bouquet.strategies.base import BouquetStrategy
from bouquet.strategies.context import RoundContext
from bouquet.strategies.pieces import (
    Aggregator,
    ByExamples,
    Combine,
    Replies,
    ServerSGD,
    State,
    Updated,
)
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param
from bouquet.tasks.wire import derive_seed

NORMS = ("median", "unit")
TOLERANCE = 1e-10  # the official irls_flag's stopping threshold
RANK_FLOOR = 1e-12  # eigenvalues below this (relative) span nothing


def _columns(projections: np.ndarray, lam: float, eps: float) -> np.ndarray:
    """``B``: FlagIRLS's weighted columns, as coefficients on the ``u_i``.

    ``projections`` is ``Y^T U`` (r x p). Column ``i`` is ``w_i e_i``; with
    ``lam > 0`` column ``(i, j)``, ``i != j``, is ``w_ij (e_i - e_j)``.
    """
    p = projections.shape[1]
    explained = np.sum(projections**2, axis=0)
    columns = [np.diag((np.abs(1.0 - explained) + eps) ** -0.25)]
    if lam > 0 and p > 1:
        pairs = [(i, j) for i in range(p) for j in range(p) if i != j]
        diff = np.zeros((p, len(pairs)))
        for c, (i, j) in enumerate(pairs):
            diff[i, c], diff[j, c] = 1.0, -1.0
        pair_explained = np.sum((projections @ diff) ** 2, axis=0)
        scale = lam / (p * (p - 1))
        columns.append(diff * scale * (np.abs(1.0 - pair_explained) + eps) ** -0.25)
    return np.hstack(columns)


def flag_objective(projections: np.ndarray, lam: float) -> float:
    """The flag-median objective ``F(Y)`` from ``Y^T U`` (see the module)."""
    p = projections.shape[1]
    value = float(np.sum(np.sqrt(np.abs(1.0 - np.sum(projections**2, axis=0)))))
    if lam > 0 and p > 1:
        diffs = projections[:, :, None] - projections[:, None, :]
        pair = np.sqrt(np.abs(1.0 - np.sum(diffs**2, axis=0)))
        np.fill_diagonal(pair, 0.0)
        value += lam / (p * (p - 1)) * float(pair.sum())
    return value


def flag_mean_step(gram: np.ndarray, columns: np.ndarray, r: int) -> np.ndarray:
    """``A`` with ``Y = U A``: the top-``r`` left singular vectors of ``U B``.

    From the eigenvectors of ``(U B)^T (U B) = B^T K B``: ``Y = U B v / s``.
    """
    m = columns.T @ gram @ columns
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    order = np.argsort(values)[::-1][:r]
    keep = order[values[order] > RANK_FLOOR * max(values.max(), RANK_FLOOR)]
    return columns @ vectors[:, keep] / np.sqrt(values[keep])


def flag_median(
    gram: np.ndarray,
    initial: np.ndarray,
    r: int,
    lam: float = 0.0,
    n_its: int = 1,
    eps: float = 1e-7,
) -> tuple[np.ndarray, np.ndarray]:
    """FlagIRLS on unit vectors ``U`` given their Gram matrix ``K = U^T U``.

    Parameters
    ----------
    gram : np.ndarray
        ``K`` (p x p).
    initial : np.ndarray
        ``Y_0^T U`` (r x p), the start's projections.
    r, lam, n_its, eps
        Subspace dimension, pairwise weight, iterations, weight floor.

    Returns
    -------
    (A, P) : tuple of np.ndarray
        ``Y = U A`` (p x r') and its projections ``P = Y^T U`` (r' x p).

    """
    projections, best, solution = initial, np.inf, None
    for _ in range(max(1, n_its)):
        a = flag_mean_step(gram, _columns(projections, lam, eps), r)
        candidate = a.T @ gram
        value = flag_objective(candidate, lam)
        if solution is not None and not value < best - TOLERANCE:
            break
        solution, projections, best = a, candidate, value
    return solution, projections


def _random_start(
    updates: list[dict[str, np.ndarray]], norms: np.ndarray, r: int, seed: int
) -> np.ndarray:
    """``Y_0^T U`` for a seeded Gaussian ``Y_0``, one layer at a time."""
    rng = np.random.default_rng(seed)
    rtr, rtu = np.zeros((r, r)), np.zeros((r, len(updates)))
    for key in updates[0]:
        layer = np.stack([u[key].ravel() for u in updates], axis=1)
        draw = rng.standard_normal((layer.shape[0], r))
        rtr += draw.T @ draw
        rtu += draw.T @ layer
    chol = np.linalg.cholesky(rtr + 1e-12 * np.eye(r))
    safe = np.where(norms > 0, norms, 1.0)
    return np.linalg.solve(chol, rtu) * np.where(norms > 0, 1.0 / safe, 0.0)


@dataclass(frozen=True)
class FlagMedian(Combine):
    """The Flag Aggregator's update (see the module docstring)."""

    r: int = 4
    lam: float = 0.0
    n_its: int = 1
    eps: float = 1e-7
    norm: str = "median"

    def update(
        self, replies: Replies, weights: np.ndarray, state: State, ctx: RoundContext
    ) -> Updated:
        reference = {k: ctx.arrays[k] for k in ctx.shared}
        arrays = [{k: r.arrays[k] for k in ctx.shared} for r in replies]
        gram = gram_matrix(arrays, reference)
        norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
        inverse = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)
        unit_gram = gram * np.outer(inverse, inverse)
        updates = [
            {k: np.subtract(a[k], reference[k], dtype=np.float64) for k in a}
            for a in arrays
        ]
        seed = derive_seed(ctx.seed, ctx.server_round, "flag")
        start = _random_start(updates, norms, self.r, seed)
        a, projections = flag_median(
            unit_gram, start, self.r, self.lam, self.n_its, self.eps
        )
        on_units = a @ projections.sum(axis=1) / self.r
        if self.norm == "median":
            size = float(np.sqrt(max(on_units @ unit_gram @ on_units, 0.0)))
            if size > 0:
                on_units = on_units * float(np.median(norms)) / size
        return weighted_sum(arrays, on_units * inverse, reference), state


@register
class Flag(BouquetStrategy):
    """FLAG (see the module docstring)."""

    name = "flag"
    paper = "Almasi et al., ICLR 2024, https://arxiv.org/abs/2302.05865"
    tagline = "Flag median of the normalised updates by FlagIRLS (robust)"
    family = "robustness"
    params = (
        Param("r", 4, ">= 1", "subspace dimension (r_col)"),
        Param("lambda", 0.0, ">= 0", "pairwise regulariser weight"),
        Param("n-its", 1, ">= 1", "FlagIRLS iterations"),
        Param("eps", 1e-7, "> 0", "weight floor"),
        Param("norm", "median", choices=NORMS, help="median: G at median norm"),
        Param("server-lr", 1.0, "> 0", "server step on G"),
        Param("server-momentum", 0.0, "[0, 1)", "server heavy-ball momentum"),
    )

    def make_aggregator(self) -> Aggregator:
        """Example weights (unused), the flag median, the server step."""
        combine = FlagMedian(self.r, self.lambda_, self.n_its, self.eps, self.norm)
        return Aggregator(
            ByExamples(), combine, ServerSGD(self.server_lr, self.server_momentum)
        )
