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
    xs, ys, clients = [], [], []
    for k in range(num_clients):
        rng = np.random.default_rng([seed, k])
        size = int(rng.lognormal(4, 2)) + 50
        model_mean = rng.normal(0, alpha)
        input_mean = rng.normal(rng.normal(0, beta), 1, DIMENSION)
        weights = rng.normal(model_mean, 1, (DIMENSION, NUM_CLASSES))
        bias = rng.normal(model_mean, 1, NUM_CLASSES)
        # Diagonal covariance: independent normals with std sqrt(j^-1.2).
        x = input_mean + scale * rng.standard_normal((size, DIMENSION))
        # argmax of the softmax is the argmax of the logits.
        ys.append(np.argmax(x @ weights + bias, axis=1))
        xs.append(x)
        clients.append(np.full(size, k))
    return (
        np.concatenate(xs).astype(np.float32),
        np.concatenate(ys).astype(np.int64),
        np.concatenate(clients).astype(np.int64),
    )
