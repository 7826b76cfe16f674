"""FedAU: FedAvg with aggregation weights estimated online from participation.

Shiqiang Wang and Mingyue Ji, "A Lightweight Method for Tackling Unknown
Participation Statistics in Federated Averaging", ICLR 2024,
https://arxiv.org/abs/2306.03401 (official code: IBM/fedau, ``main.py``).

Client n takes part with an unknown probability ``p_n``; averaging over the
participants then minimises ``sum_n p_n F_n`` instead of ``(1/N) sum_n F_n``.
FedAU weights each participant's update by ``omega_n``, the mean of the
participation intervals observed so far for n, an online estimate of
``1/p_n`` with O(1) memory per client.

Server rule, round t, with ``S_t`` the clients whose update is aggregated:

- ``omega_n`` = (sum of n's recorded intervals) / (their count), or 1 if none is
  recorded yet; computed before this round's bookkeeping.
- ``x_{t+1} = x_t + eta_g (1/N) sum_{n in S_t} omega_n (y_n - x_t)``, N the number
  of registered nodes (``grid.get_node_ids()``), not ``|S_t|``.
- Bookkeeping for every registered node, ``c_n`` = rounds since it last took
  part: a participant records the interval ``c_n + 1`` and resets ``c_n = 0``;
  any other node increments ``c_n`` and, when ``c_n >= K``, records ``K`` and
  resets it (the cutoff bounds the estimate for rare clients).

Client rule: plain local SGD (recipe ``plain``); the spec's "I = 5 local
iterations, batch 16, lr 0.1" are the shared run-config keys ``local-steps``,
``batch-size`` and ``lr``.

Wire protocol: server sends ``arrays`` and ``config`` (shared training keys
only); clients return full local ``arrays`` and ``metrics`` (``num-examples``).
Server state (``state_attributes``, checkpointed every round): ``node_ids``
and, aligned with them, ``counters`` (``c_n``), ``interval_sums`` and
``interval_counts``. Clients keep none.

Decisions where the spec was open:

- Participation means "a valid reply that was aggregated". A dropped reply
  (invalid, or a round skipped for lack of ``min-train-nodes`` replies)
  counts as non-participation: its update was not used, which is what
  ``omega`` must compensate.
- The availability of clients is simulated by the environment
  (``participation`` run-config keys, ``serverapps/participation.py``), never
  read by this strategy; FedAU should run with ``fraction-train = 1.0`` so that
  every available node trains, as in the paper.
- State is keyed by node id: a resumed run on the same grid (in-process,
  deployment with stable node ids) keeps the estimates; a new Ray simulation
  draws new node ids and the estimates start again for them.
- ``weighting`` also selects the official code's baselines on the same
  machinery: ``average-participating`` (FedAvg, equal weights over ``S_t``) and
  ``average-all`` (equal weights, divided by N). The oracle ``known_prob`` is
  left out: the strategy must not read the true probabilities.
- BatchNorm buffers follow the same rule as parameters (the integer counter is
  rounded back); the official models have no BatchNorm.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy

from strategies import keys
from strategies.aggregation import apply_delta, to_numpy, to_record, weighted_sum
from strategies.base import BouquetStrategy
from strategies.registry import AlgorithmEntry, register

WEIGHTINGS = ("adaptive", "average-participating", "average-all")


class FedAU(BouquetStrategy, flwr_strategy.FedAvg):
    """FedAU's server: online interval estimates as aggregation weights.

    Parameters
    ----------
    k : int
        Interval cutoff K.
    eta_g : float
        Global learning rate.
    weighting : str
        ``"adaptive"`` (FedAU), ``"average-participating"`` or ``"average-all"``.

    """

    state_attributes = ("node_ids", "counters", "interval_sums", "interval_counts")

    def __init__(
        self,
        *args: Any,
        k: int = 100000,
        eta_g: float = 1.0,
        weighting: str = "adaptive",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"fedau.weighting must be one of {WEIGHTINGS}; got {weighting!r}."
            )
        if k < 1:
            raise ValueError(f"fedau.k must be >= 1; got {k}.")
        self.k = int(k)
        self.eta_g = float(eta_g)
        self.weighting = weighting
        self.node_ids = np.zeros(0, dtype=np.int64)
        self.counters = np.zeros(0, dtype=np.int64)
        self.interval_sums = np.zeros(0, dtype=np.float64)
        self.interval_counts = np.zeros(0, dtype=np.int64)
        self._round_nodes: list[int] = []
        self._participants: set[int] = set()

    # -------------------------------------------------------- bookkeeping --
    def _slots(self, node_ids: Iterable[int]) -> np.ndarray:
        """Positions of ``node_ids`` in the state arrays (new ids are added)."""
        node_ids = [int(n) for n in node_ids]
        known = {int(n): i for i, n in enumerate(self.node_ids)}
        new = [n for n in dict.fromkeys(node_ids) if n not in known]
        if new:
            grow = len(new)
            self.node_ids = np.concatenate([self.node_ids, np.array(new, np.int64)])
            self.counters = np.concatenate([self.counters, np.zeros(grow, np.int64)])
            self.interval_sums = np.concatenate([self.interval_sums, np.zeros(grow)])
            self.interval_counts = np.concatenate(
                [self.interval_counts, np.zeros(grow, np.int64)]
            )
            known.update({n: len(known) + i for i, n in enumerate(new)})
        return np.array([known[n] for n in node_ids], dtype=np.int64)

    def omega(self, node_ids: Sequence[int]) -> np.ndarray:
        """``omega_n``: mean recorded interval of each node, 1 if none yet."""
        slots = self._slots(node_ids)
        counts = self.interval_counts[slots]
        sums = self.interval_sums[slots]
        return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)

    def record_participation(
        self, node_ids: Sequence[int], participants: set[int]
    ) -> None:
        """Step 4 of the server rule for every node in ``node_ids``."""
        for slot, node in zip(self._slots(node_ids), node_ids, strict=True):
            if node in participants:
                self.interval_sums[slot] += self.counters[slot] + 1
                self.interval_counts[slot] += 1
                self.counters[slot] = 0
            else:
                self.counters[slot] += 1
                if self.counters[slot] >= self.k:
                    self.interval_sums[slot] += self.k
                    self.interval_counts[slot] += 1
                    self.counters[slot] = 0

    # ------------------------------------------------------------- rounds --
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember every registered node (non-participants count too), then sample."""
        self._round_nodes = sorted(int(n) for n in grid.get_node_ids())
        self._slots(self._round_nodes)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate (weights from past intervals), then record this round's."""
        self._participants = set()
        result = super().aggregate_train(server_round, replies)
        self.record_participation(self._round_nodes, self._participants)
        return result

    def weights(self, node_ids: Sequence[int]) -> np.ndarray:
        """The factor of each participant's update before ``eta_g``."""
        total = max(len(self._round_nodes), len(node_ids))
        if self.weighting == "average-participating":
            return np.full(len(node_ids), 1.0 / len(node_ids))
        if self.weighting == "average-all":
            return np.full(len(node_ids), 1.0 / total)
        return self.omega(node_ids) / total

    def aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        nodes = [int(r.metadata.src_node_id) for r in replies]
        self._participants = set(nodes)
        self._round_nodes = sorted(set(self._round_nodes) | self._participants)
        weights = self.weights(nodes)
        reference = self.global_arrays
        update = weighted_sum(
            [to_numpy(r.content[keys.ARRAYS]) for r in replies], weights, reference
        )
        metrics = self.train_metrics_aggr_fn(
            [r.content for r in replies], self.weighted_by_key
        )
        return to_record(apply_delta(reference, update, self.eta_g)), metrics


def _build(common: Mapping[str, Any], hp: Mapping[str, Any]) -> FedAU:
    return FedAU(**common, k=hp["k"], eta_g=hp["eta-g"], weighting=hp["weighting"])


register(
    AlgorithmEntry(
        "fedau",
        _build,
        client="plain",
        hyperparameters={"k": 100000, "eta-g": 1.0, "weighting": "adaptive"},
        paper="Wang & Ji, ICLR 2024, https://arxiv.org/abs/2306.03401",
        summary="FedAvg weighted by online estimates of 1/p_n (unknown participation)",
        family="participation",
    )
)
