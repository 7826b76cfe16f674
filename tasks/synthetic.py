"""FedProx's Synthetic(alpha, beta) data.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
https://arxiv.org/abs/1812.06127, section 5.1, following Shamir et al. (2014).

Client k has its own softmax-regression model and its own input distribution:

- ``u_k ~ N(0, alpha)``, ``W_k ~ N(u_k, 1)`` (60 x 10), ``b_k ~ N(u_k, 1)``;
- ``B_k ~ N(0, beta)``, ``v_k ~ N(B_k, 1)`` (60), ``x ~ N(v_k, Sigma)`` with
  ``Sigma = diag(j^-1.2)``;
- ``y = argmax softmax(W_k^T x + b_k)``;
- ``lognormal(4, 2) + 50`` samples, as in the authors' generator.

alpha controls how much the clients' models differ, beta how much their inputs
do. Decisions: as in the authors' code, alpha and beta are standard deviations
and ``b_k`` shares ``u_k`` with ``W_k``. Each client draws from its own stream
``(seed, k)``, so client k's data does not depend on how many clients exist.
"""

from __future__ import annotations

import numpy as np

DIMENSION = 60
NUM_CLASSES = 10


def make_synthetic(
    num_clients: int, alpha: float, beta: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate ``(x, y, client)`` for ``num_clients`` clients.

    Returns
    -------
    x : ndarray, float32, shape (N, 60)
    y : ndarray, int64, shape (N,)
    client : ndarray, int64, shape (N,)
        The generating client of each row (the natural partition).

    """
    scale = np.sqrt(np.arange(1, DIMENSION + 1, dtype=np.float64) ** -1.2)
    # Two passes over the clients' streams: sizes first (each stream's first
    # draw), then the rows straight into the float32 result. One list of
    # float64 blocks plus their concatenation peaked at 5 GB for 10,000
    # clients (1 GB of float32 rows); this holds the result and one client.
    sizes = [_size(np.random.default_rng([seed, k])) for k in range(num_clients)]
    total = sum(sizes)
    x_all = np.empty((total, DIMENSION), np.float32)
    y_all = np.empty(total, np.int64)
    client = np.repeat(np.arange(num_clients, dtype=np.int64), sizes)
    start = 0
    for k, size in enumerate(sizes):
        rng = np.random.default_rng([seed, k])
        _size(rng)
        model_mean = rng.normal(0, alpha)
        input_mean = rng.normal(rng.normal(0, beta), 1, DIMENSION)
        weights = rng.normal(model_mean, 1, (DIMENSION, NUM_CLASSES))
        bias = rng.normal(model_mean, 1, NUM_CLASSES)
        # Diagonal covariance: independent normals with std sqrt(j^-1.2).
        x = input_mean + scale * rng.standard_normal((size, DIMENSION))
        # argmax of the softmax is the argmax of the logits (in float64).
        y_all[start : start + size] = np.argmax(x @ weights + bias, axis=1)
        x_all[start : start + size] = x
        start += size
    return x_all, y_all, client


def _size(rng: np.random.Generator) -> int:
    """A client's sample count: ``lognormal(4, 2) + 50`` (the stream's first draw)."""
    return int(rng.lognormal(4, 2)) + 50
