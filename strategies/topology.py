"""Communication graphs of decentralized learning, their mixing matrices and gaps.

Shared mechanics of the decentralized family (issue 20: D-PSGD, DFedSAM, ...):
NumPy only, no Flower. A graph is a symmetric boolean adjacency matrix over
vertices ``0..n-1`` with an empty diagonal; random graphs draw from a
``numpy.random.Generator`` the caller seeds (architecture rule 6: the
gossip strategies pass ``derive_seed(seed, "topology")``, and
``derive_seed(seed, round, "topology")`` for the time-varying matching).

Graphs (:func:`make_graph` by name): ``ring``, ``grid`` (2-D lattice),
``torus`` (the lattice with wrap-around), ``regular`` (random d-regular),
``erdos-renyi`` (G(n, p)), ``exponential`` (i ~ i +- 2^k), ``complete``,
``matching`` (a random perfect matching, redrawn every round by the caller:
the time-varying topology) and a user ``edges`` list.

Mixing matrices, both symmetric and doubly stochastic on any graph:

- ``metropolis-hastings``: ``W_ij = 1 / (1 + max(d_i, d_j))`` on edges, the
  rest on the diagonal (Xiao and Boyd, "Fast linear iterations for distributed
  averaging", Systems & Control Letters 2004).
- ``uniform``: the max-degree weights ``W_ij = 1 / (1 + d_max)`` on edges, the
  rest on the diagonal; on a d-regular graph every row is ``1 / (d + 1)`` over
  the closed neighbourhood (a ring: 1/3, 1/3, 1/3).

The spectral gap is ``1 - |lambda_2|``, with ``|lambda_2|`` the second-largest
eigenvalue magnitude of ``W`` (0 for a disconnected graph); consensus error
shrinks by ``|lambda_2|`` per gossip step.

Decisions where the spec was open
---------------------------------
- ``grid`` and ``torus`` use the most nearly square ``r x c = n`` (a prime n
  gives a 1 x n path or ring). A torus side of 2 does not double its edges.
- ``regular`` draws the configuration (pairing) model and rejects draws with
  loops or repeated edges (up to 1000 tries): uniform over simple d-regular
  graphs. ``n d`` must be even and ``d < n``.
- ``erdos-renyi`` redraws (up to 1000 times) until the graph is connected, so
  that every run can reach consensus; it fails if none is.
- ``exponential`` is the undirected exponential graph: i ~ i + 2^k (mod n)
  for ``2^k < n`` (Ying et al., NeurIPS 2021, made symmetric for W = W^T).
- ``matching`` on an odd n leaves one vertex alone (its row of W is e_i).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

GRAPHS = (
    "ring",
    "grid",
    "torus",
    "regular",
    "erdos-renyi",
    "exponential",
    "complete",
    "matching",
    "edges",
)
"""Graph names :func:`make_graph` builds."""

MIXINGS = ("metropolis-hastings", "uniform")
"""Mixing-matrix rules :func:`mixing_matrix` applies."""

_TRIES = 1000


def from_edges(n: int, edges: Iterable[Sequence[int]]) -> np.ndarray:
    """The adjacency matrix of the undirected graph with these ``(i, j)`` edges."""
    adjacency = np.zeros((n, n), dtype=bool)
    for edge in edges:
        i, j = (int(v) for v in edge)
        if not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"Edge ({i}, {j}) names a vertex outside 0..{n - 1}.")
        if i == j:
            raise ValueError(f"Edge ({i}, {j}) is a loop.")
        adjacency[i, j] = adjacency[j, i] = True
    return adjacency


def parse_edges(text: str) -> list[tuple[int, int]]:
    """Edges from ``"0-1, 1-2, 2-0"`` (the run-config form of a user's graph)."""
    edges = []
    for part in text.replace(";", ",").split(","):
        if part.strip():
            i, sep, j = part.strip().partition("-")
            if not sep:
                raise ValueError(f"Edge {part.strip()!r} is not 'i-j'.")
            edges.append((int(i), int(j)))
    return edges


def ring(n: int) -> np.ndarray:
    """The ring: i ~ i + 1 (mod n)."""
    return from_edges(
        n, ((i, (i + 1) % n) for i in range(n) if n > 1 and i != (i + 1) % n)
    )


def _sides(n: int) -> tuple[int, int]:
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    return rows, n // rows


def lattice(n: int, wrap: bool) -> np.ndarray:
    """The ``r x c`` grid (most nearly square), with wrap-around when ``wrap``."""
    rows, cols = _sides(n)
    edges = []
    for r in range(rows):
        for c in range(cols):
            here = r * cols + c
            if c + 1 < cols or (wrap and cols > 2):
                edges.append((here, r * cols + (c + 1) % cols))
            if r + 1 < rows or (wrap and rows > 2):
                edges.append((here, ((r + 1) % rows) * cols + c))
    return from_edges(n, edges)


def complete(n: int) -> np.ndarray:
    """Every pair of vertices."""
    return ~np.eye(n, dtype=bool)


def exponential(n: int) -> np.ndarray:
    """The exponential graph: i ~ i + 2^k (mod n) for every ``2^k < n``."""
    edges = [
        (i, (i + 2**k) % n)
        for i in range(n)
        for k in range(max(0, (n - 1).bit_length()))
        if 2**k < n and (i + 2**k) % n != i
    ]
    return from_edges(n, edges)


def random_regular(n: int, degree: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random simple ``degree``-regular graph (pairing model)."""
    if not 0 <= degree < n or (n * degree) % 2:
        raise ValueError(
            f"No {degree}-regular graph on {n} vertices (need d < n, nd even)."
        )
    for _ in range(_TRIES):
        stubs = rng.permutation(np.repeat(np.arange(n), degree)).reshape(-1, 2)
        if np.any(stubs[:, 0] == stubs[:, 1]):
            continue
        pairs = {tuple(sorted(p)) for p in stubs.tolist()}
        if len(pairs) == len(stubs):
            return from_edges(n, pairs)
    raise ValueError(
        f"No simple {degree}-regular graph on {n} vertices in {_TRIES} draws."
    )


def connected(adjacency: np.ndarray) -> bool:
    """Whether the graph is connected (a breadth-first search from vertex 0)."""
    n = len(adjacency)
    if n == 0:
        return True
    seen, frontier = {0}, [0]
    while frontier:
        frontier = [
            j for i in frontier for j in np.flatnonzero(adjacency[i]) if j not in seen
        ]
        seen.update(frontier)
    return len(seen) == n


def erdos_renyi(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """G(n, p), redrawn until connected."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"Edge probability p must be in [0, 1]; got {p}.")
    for _ in range(_TRIES):
        upper = np.triu(rng.random((n, n)) < p, k=1)
        adjacency = upper | upper.T
        if connected(adjacency):
            return adjacency
    raise ValueError(f"No connected G({n}, {p}) in {_TRIES} draws; raise p.")


def random_matching(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random perfect matching (one vertex left alone when n is odd)."""
    order = rng.permutation(n)
    return from_edges(n, order[: n - n % 2].reshape(-1, 2).tolist())


def make_graph(
    name: str,
    n: int,
    rng: np.random.Generator | None = None,
    *,
    degree: int = 4,
    p: float = 0.3,
    edges: Iterable[Sequence[int]] = (),
) -> np.ndarray:
    """The adjacency matrix of graph ``name`` on ``n`` vertices (see the module)."""
    if n < 1:
        raise ValueError(f"A graph needs at least one vertex; got {n}.")
    rng = rng if rng is not None else np.random.default_rng(0)
    builders = {
        "ring": lambda: ring(n),
        "grid": lambda: lattice(n, wrap=False),
        "torus": lambda: lattice(n, wrap=True),
        "regular": lambda: random_regular(n, degree, rng),
        "erdos-renyi": lambda: erdos_renyi(n, p, rng),
        "exponential": lambda: exponential(n),
        "complete": lambda: complete(n),
        "matching": lambda: random_matching(n, rng),
        "edges": lambda: from_edges(n, edges),
    }
    if name not in builders:
        raise ValueError(f"Unknown graph {name!r}; choose one of {', '.join(GRAPHS)}.")
    return builders[name]()


def mixing_matrix(
    adjacency: np.ndarray, rule: str = "metropolis-hastings"
) -> np.ndarray:
    """The symmetric, doubly stochastic gossip matrix ``W`` of the graph (float64)."""
    adjacency = np.asarray(adjacency, dtype=bool)
    degrees = adjacency.sum(axis=1)
    if rule == "metropolis-hastings":
        weights = 1.0 / (1.0 + np.maximum(degrees[:, None], degrees[None, :]))
    elif rule == "uniform":
        weights = np.full(adjacency.shape, 1.0 / (1.0 + degrees.max(initial=0)))
    else:
        raise ValueError(f"Unknown mixing rule {rule!r}; choose one of {MIXINGS}.")
    mixing = np.where(adjacency, weights, 0.0)
    np.fill_diagonal(mixing, 1.0 - mixing.sum(axis=1))
    return mixing


def spectral_gap(mixing: np.ndarray) -> float:
    """``1 - |lambda_2(W)|`` of ``W`` (1 for a single vertex).

    A symmetric ``W`` uses the symmetric eigensolver; a row-stochastic one
    (VCMA's conservative average on an irregular graph) the general one.
    """
    if len(mixing) < 2:
        return 1.0
    symmetric = np.array_equal(mixing, mixing.T)
    values = np.linalg.eigvalsh(mixing) if symmetric else np.linalg.eigvals(mixing)
    magnitudes = np.sort(np.abs(values))
    return float(max(0.0, 1.0 - magnitudes[-2]))


def consensus_distance(models: np.ndarray) -> float:
    """``(1/n) sum_i ||x_i - mean_j x_j||^2`` of the rows of ``models`` (float64)."""
    models = np.asarray(models, dtype=np.float64)
    return float(np.mean(np.sum((models - models.mean(axis=0)) ** 2, axis=1)))


__all__ = [
    "GRAPHS",
    "MIXINGS",
    "complete",
    "connected",
    "consensus_distance",
    "erdos_renyi",
    "exponential",
    "from_edges",
    "lattice",
    "make_graph",
    "mixing_matrix",
    "parse_edges",
    "random_matching",
    "random_regular",
    "ring",
    "spectral_gap",
]
