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

The rule is a weighting piece (:class:`IntervalWeights`) in the chain, then
the weighted sum of ``y_n - x`` and a step of ``eta_g``.

Wire protocol: server sends ``arrays`` and ``config`` (shared training keys
only); clients return full local ``arrays`` and ``metrics`` (``num-examples``).
Server state (the weighting piece's, checkpointed every round): ``node-ids``
and, aligned with them, ``counters`` (``c_n``), ``interval-sums`` and
``interval-counts``. Clients keep none.

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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bouquet.strategies import pieces
from bouquet.strategies.base import BouquetStrategy, Reduction
from bouquet.strategies.context import RoundContext
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param

WEIGHTINGS = ("adaptive", "average-participating", "average-all")


def new_intervals() -> dict[str, np.ndarray]:
    """The bookkeeping of no node."""
    return {
        "node-ids": np.zeros(0, dtype=np.int64),
        "counters": np.zeros(0, dtype=np.int64),
        "interval-sums": np.zeros(0, dtype=np.float64),
        "interval-counts": np.zeros(0, dtype=np.int64),
    }


def slots(state: dict[str, np.ndarray], node_ids: Sequence[int]) -> np.ndarray:
    """Positions of ``node_ids`` in ``state`` (new ids are added, in place)."""
    known = {int(n): i for i, n in enumerate(state["node-ids"])}
    new = [n for n in dict.fromkeys(int(n) for n in node_ids) if n not in known]
    if new:
        grow = len(new)
        state["node-ids"] = np.concatenate([state["node-ids"], np.array(new, np.int64)])
        for key, dtype in (
            ("counters", np.int64),
            ("interval-sums", np.float64),
            ("interval-counts", np.int64),
        ):
            state[key] = np.concatenate([state[key], np.zeros(grow, dtype)])
        known.update({n: len(known) + i for i, n in enumerate(new)})
    return np.array([known[int(n)] for n in node_ids], dtype=np.int64)


def omega(state: dict[str, np.ndarray], node_ids: Sequence[int]) -> np.ndarray:
    """``omega_n``: mean recorded interval of each node, 1 if none yet."""
    at = slots(state, node_ids)
    counts = state["interval-counts"][at]
    return np.where(counts > 0, state["interval-sums"][at] / np.maximum(counts, 1), 1.0)


def record_participation(
    state: dict[str, np.ndarray],
    node_ids: Sequence[int],
    participants: set[int],
    k: int,
) -> None:
    """Step 4 of the server rule for every node in ``node_ids`` (in place)."""
    for slot, node in zip(slots(state, node_ids), node_ids, strict=True):
        if node in participants:
            state["interval-sums"][slot] += state["counters"][slot] + 1
            state["interval-counts"][slot] += 1
            state["counters"][slot] = 0
        else:
            state["counters"][slot] += 1
            if state["counters"][slot] >= k:
                state["interval-sums"][slot] += k
                state["interval-counts"][slot] += 1
                state["counters"][slot] = 0


@dataclass(frozen=True)
class IntervalWeights(pieces.Weighting):
    """FedAU's weights ``omega_n / N`` (or a baseline's), then the bookkeeping."""

    k: int = 100000
    weighting: str = "adaptive"

    def init(self) -> pieces.State:
        return new_intervals()

    def update(
        self, replies: pieces.Replies, state: pieces.State, ctx: RoundContext
    ) -> tuple[np.ndarray, pieces.State]:
        state = {key: value.copy() for key, value in state.items()}
        nodes = [r.node for r in replies]
        everyone = sorted(set(ctx.nodes) | set(nodes))
        total = max(len(everyone), len(nodes))
        slots(state, everyone)
        if self.weighting == "average-participating":
            weights = np.full(len(nodes), 1.0 / len(nodes))
        elif self.weighting == "average-all":
            weights = np.full(len(nodes), 1.0 / total)
        else:
            weights = omega(state, nodes) / total
        record_participation(state, everyone, set(nodes), self.k)
        return weights, state


@register
class FedAU(BouquetStrategy):
    """FedAU's server: online interval estimates as aggregation weights."""

    name = "fedau"
    paper = "Wang & Ji, ICLR 2024, https://arxiv.org/abs/2306.03401"
    tagline = "FedAvg weighted by online estimates of 1/p_n (unknown participation)"
    family = "participation"
    params = (
        Param("k", 100000, ">= 1", "interval cutoff K (100000: effectively none)"),
        Param("eta-g", 1.0, "> 0", "global learning rate"),
        Param("weighting", "adaptive", choices=WEIGHTINGS, help="FedAU or a baseline"),
    )
    reductions = (
        Reduction(
            {"weighting": "average-participating"}, "fedavg", {"weighting": "uniform"}
        ),
    )

    def make_aggregator(self) -> pieces.Aggregator:
        """Interval weights, their weighted sum of ``y_n - x``, a step of eta_g."""
        return pieces.Aggregator(
            IntervalWeights(self.k, self.weighting),
            pieces.WeightedMean(),
            pieces.ServerSGD(self.eta_g),
        )

    def skipped(self, ctx: RoundContext) -> None:
        """A skipped round counts as non-participation for every node."""
        state = {k: v.copy() for k, v in self.state["aggregator"]["weighting"].items()}
        record_participation(state, sorted(ctx.nodes), set(), self.k)
        self.state["aggregator"] = {**self.state["aggregator"], "weighting": state}
