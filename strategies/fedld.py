"""FedLD: loss decomposition (margin control + principal-gradient aggregation).

Paper: Zeng, Guo, Wang, Wang, Zhou, Qu. "Tackling Data Heterogeneity in Federated
Learning via Loss Decomposition", MICCAI 2024. https://arxiv.org/abs/2408.12300
Official code: github.com/Zeng-Shuang/FedLD (``methods/fedld.py``, ``svd_tools.py``).

The global loss splits into local, distribution-shift and aggregation loss.
FedLD attacks the second on the client and the third on the server:

- **Client** (recipe ``fedld``): ``L = CE(Z, y) + lambda * log(1 + ||P||_F^2)`` with
  ``P = softmax(Z)`` over the whole batch (margin control).
- **Server** (per state-dict entry, "layer" ``l``): stack the client deltas
  ``d_i = w_i - w_global`` into ``D`` (m x n_l), take the SVD of the Gram matrix
  ``G = D D^T / m`` (singular values ``s_j``, vectors ``e_j``), principal
  directions ``v_j = D^T e_j`` for ``j <= k = max(1, floor(m * k_proportion))``;
  each client's delta is rebuilt as ``r_i = sum_j (s_j / sum_l s_l) ||d_i|| u_ij``
  (``u_ij`` the unit vector of ``d_i``'s projection on ``v_j``), and
  ``w_global += mean_i r_i``. First round and one-element entries: plain mean.

Cost: ``G`` is m x m, so a layer costs O(m^2 n_l) time and O(m n_l) memory; no
n x n matrix is formed. Because ``D D^T e_j = m s_j e_j``, the projections are
``<d_i, v_j> = m s_j e_ij`` and ``||v_j|| = sqrt(m s_j)``, so the update is one
more product ``D^T c`` (c an m-vector).

Wire protocol: server sends ``arrays`` and ``config`` with ``fedld.lambda``
(0 in the aggregation-only ablation); clients return full local ``arrays`` and
``metrics`` (``num-examples``, ``train-loss``, ``train-loss-first``). Server
state: ``history`` (per-entry EMA of the update, 0.99/0.01, as in the official
code, where it only marks that the first round has passed). Clients keep none.

Decisions where the spec was open:

- ``k = max(1, floor(m * k_proportion))`` (the official code gives k = 0 at m = 1).
- A direction with ``||v_j|| <= eps`` (zero singular value) or a client with
  ``<d_i, v_j> = 0`` contributes nothing (the official code divides by zero).
- The mean over clients is unweighted, as the official code's effective rule
  (it averages identical rebuilt models by sample size, a no-op);
  ``weighting = "num-examples"`` weights ``r_i`` by sample size instead.
- The mean divides by the number of replies m, not by the total number of
  clients (the official code's ``num_users``): they differ only under partial
  participation.
- BatchNorm running statistics go through the same SVD path (as in the
  official code); integer buffers (``num_batches_tracked``) are one-element
  entries, averaged and rounded.
- Sign alignment (flip ``v_j`` when most clients project negatively on it) is
  applied as in the official code; note that the rebuilt ``r_i`` does not depend
  on the sign of ``v_j`` (a projection onto a line ignores its orientation).
- ``mode`` selects the paper's decomposition ablations: ``full``, ``loss-only``
  (server takes the plain mean) and ``aggregation-only`` (client lambda = 0).
- Default lambda = 0.1: the value of the official README's command (code
  default 0.03, fluke 0.2). Local SGD (lr 0.01, momentum 0.5, weight decay
  5e-4, batch 50) is set through the shared run-config keys in the
  reproduction configs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flwr_strategy

from strategies import keys
from strategies.aggregation import apply_delta, to_numpy, to_record
from strategies.base import BouquetStrategy
from strategies.registry import AlgorithmEntry, register

EPS = 1e-12
MODES = ("full", "loss-only", "aggregation-only")


def principal_update(
    deltas: np.ndarray, k_proportion: float, weights: np.ndarray | None = None
) -> np.ndarray:
    """FedLD's update for one layer from the stacked client deltas.

    Parameters
    ----------
    deltas : np.ndarray
        ``D``, shape (m, n): one flattened client delta per row.
    k_proportion : float
        Fraction of the m principal directions kept.
    weights : np.ndarray, optional
        Weights of the clients in the final mean (uniform if None).

    Returns
    -------
    np.ndarray
        The mean rebuilt delta, shape (n,), float64.

    """
    d = np.asarray(deltas, dtype=np.float64)
    m = d.shape[0]
    w = (
        np.full(m, 1.0 / m)
        if weights is None
        else np.asarray(weights) / np.sum(weights)
    )
    gram = d @ d.T / m
    e, s, _ = np.linalg.svd(gram, hermitian=True)  # G = E diag(s) E^T, s descending
    k = max(1, int(np.floor(m * k_proportion)))
    share = s / max(s.sum(), EPS)
    norms = np.sqrt(np.maximum(np.diag(gram) * m, 0.0))  # ||d_i||, from G_ii
    coefficients = np.zeros(m)
    for j in range(min(k, m)):
        v_norm = np.sqrt(max(m * s[j], 0.0))  # ||v_j|| = ||D^T e_j||
        if v_norm <= EPS:
            continue
        projections = m * s[j] * e[:, j]  # <d_i, v_j>
        if np.sum(projections >= 0) < np.sum(projections < 0):
            e[:, j] = -e[:, j]  # sign alignment: most clients project positively
            projections = -projections
        signs = np.sign(projections)
        # mean_i r_i along v_j: sum_i w_i share_j ||d_i|| sign_ij v_j / ||v_j||
        scale = share[j] * np.sum(w * norms * signs) / v_norm
        coefficients += scale * e[:, j]
    return d.T @ coefficients


class FedLD(BouquetStrategy, flwr_strategy.FedAvg):
    """FedLD's server: principal-gradient aggregation (see the module docstring).

    Parameters
    ----------
    lambda_ : float
        Margin-control weight, sent to clients as ``fedld.lambda``.
    k_proportion : float
        Fraction of principal directions kept.
    weighting : str
        ``"uniform"`` (official) or ``"num-examples"``.
    mode : str
        ``"full"``, ``"loss-only"`` or ``"aggregation-only"``.

    """

    state_attributes = ("history",)

    def __init__(
        self,
        *args: Any,
        lambda_: float = 0.1,
        k_proportion: float = 0.8,
        weighting: str = "uniform",
        mode: str = "full",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if mode not in MODES:
            raise ValueError(f"fedld.mode must be one of {MODES}; got {mode!r}.")
        if weighting not in ("uniform", "num-examples"):
            raise ValueError(
                f"fedld.weighting must be 'uniform' or 'num-examples'; "
                f"got {weighting!r}."
            )
        if not 0.0 < k_proportion <= 1.0:
            raise ValueError(
                f"fedld.k-proportion must be in (0, 1]; got {k_proportion}."
            )
        self.lambda_ = 0.0 if mode == "aggregation-only" else float(lambda_)
        self.k_proportion = float(k_proportion)
        self.weighting = weighting
        self.mode = mode
        self.history: dict[str, np.ndarray] = {}

    def round_config(self, server_round: int) -> dict[str, Any]:
        return {keys.algorithm_key("fedld", "lambda"): self.lambda_}

    def aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        clients = [to_numpy(r.content[keys.ARRAYS]) for r in replies]
        weights = None
        if self.weighting == "num-examples":
            weights = np.array(
                [float(r.content[keys.METRICS][keys.NUM_EXAMPLES]) for r in replies]
            )
        update = self.aggregate_deltas(self.global_arrays, clients, weights)
        metrics = self.train_metrics_aggr_fn(
            [r.content for r in replies], self.weighted_by_key
        )
        return to_record(apply_delta(self.global_arrays, update)), metrics

    def aggregate_deltas(
        self,
        reference: Mapping[str, np.ndarray],
        clients: Sequence[Mapping[str, np.ndarray]],
        weights: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """The per-entry update ``delta`` (float64) and the history update."""
        update: dict[str, np.ndarray] = {}
        plain = self.mode == "loss-only" or not self.history
        m = len(clients)
        w = np.full(m, 1.0 / m) if weights is None else weights / np.sum(weights)
        for key, ref in reference.items():
            flat_ref = ref.reshape(-1).astype(np.float64)
            # One (m, n_l) float64 buffer per entry: the deltas, written in place.
            stacked = np.empty((m, flat_ref.size))
            for row, client in zip(stacked, clients, strict=True):
                np.subtract(client[key].reshape(-1), flat_ref, out=row)
            if plain or ref.size == 1:
                delta = w @ stacked
            else:
                delta = principal_update(stacked, self.k_proportion, weights)
            update[key] = delta.reshape(ref.shape)
            previous = self.history.get(key)
            self.history[key] = (
                0.01 * update[key]
                if previous is None
                else 0.99 * previous + 0.01 * update[key]
            )
        return update


def _build(common: Mapping[str, Any], hp: Mapping[str, Any]) -> FedLD:
    return FedLD(
        **common,
        lambda_=hp["lambda"],
        k_proportion=hp["k-proportion"],
        weighting=hp["weighting"],
        mode=hp["mode"],
    )


register(
    AlgorithmEntry(
        "fedld",
        _build,
        client="fedld",
        hyperparameters={
            "lambda": 0.1,
            "k-proportion": 0.8,
            "weighting": "uniform",
            "mode": "full",
        },
        paper="Zeng et al., MICCAI 2024, https://arxiv.org/abs/2408.12300",
        summary="Margin-control loss + SVD principal-gradient aggregation",
        family="optimization",
    )
)
