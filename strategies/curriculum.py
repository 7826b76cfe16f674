"""Curriculum: ordered local learning with pacing, and easy-first client selection.

Paper: Vahidian, Kadaveru, Baek, Wang, Kungurtsev, Chen, Shah, Lin. "When Do
Curricula Work in Federated Learning?", ICCV 2023. https://arxiv.org/abs/2212.12712
No official code was found; the pacing families are those of Wu, Dyer, Neyshabur,
"When Do Curricula Work?", ICLR 2021 (https://arxiv.org/abs/2012.03107).

- **Client** (recipe ``curriculum``): score every local example by the loss of
  the global model just received, rank them (``curriculum``: easy to hard,
  ``anti``: hard to easy, ``random``: a fixed random ranking), and draw every
  mini-batch of the round uniformly from the first ``ceil(g(t) * N_i)`` ranked
  examples. An epoch keeps its ``N_i`` example slots, so the step budget is the
  same as FedAvg's. The server aggregates with FedAvg's weighted mean.
- **Pacing** ``g(t) = min(1, max(0, h(t / (a T))))`` with ``t = r - 1`` the
  rounds completed, ``T`` the run's rounds, ``a`` the fraction of ``T`` after
  which all data is used and ``b = g(0)``; ``h`` is ``linear``
  ``b + (1-b) u``, ``quad`` ``b + (1-b) u^2``, ``root`` ``b + (1-b) sqrt(u)``,
  ``step`` ``b + floor(u)``, ``exp`` ``b + (1-b) (e^{10u} - 1)/(e^10 - 1)``,
  ``log`` ``b + (1-b) (1 + 0.1 ln(u + e^-10))`` (Wu et al.'s families).
- **Client selection** (``client-pacing`` != ``none``): rank clients by their
  last reported difficulty (the global model's mean loss on their data), easy
  first, clients never scored ahead of all others (so every client gets scored);
  each round sample uniformly from the first ``max(K, ceil(g_c(t) * N))`` of
  them, ``g_c`` the same families with ``client-a`` and ``client-b``.

Wire protocol: the server sends ``arrays`` and ``config`` with
``curriculum.ordering``, ``curriculum.fraction`` (this round's ``g(t)``) and
``curriculum.rescore-every``. Clients return full local ``arrays`` and
``metrics`` with ``num-examples``, ``train-loss`` and ``curriculum.mean-score``.
Client state (``Context.state``, namespace ``curriculum``): the per-example
scores and the round they were computed (reused for ``rescore-every`` rounds;
the ``random`` ranking is drawn once and kept). Server state:
``client-scores`` and ``score-rounds`` per node id.

Decisions where the spec was open (all ASSUMPTIONs of the spec, kept):

- The pacing clock is the server round, not the local step: all clients of a
  round use the same fraction, which the server computes and sends. The
  ``log`` family is clipped at 1 (it slightly exceeds 1 at ``u = 1``).
- Scorer: the global model just received, in eval mode (no running-statistics
  update). A local or expert scorer is not implemented.
- Within the paced subset batches are a fresh seeded shuffle of the subset,
  repeated until the epoch's slots are filled. The shuffle is the very
  permutation FedAvg's loop draws, restricted to the subset, so at
  ``g = 1`` every ordering trains exactly like FedAvg.
- Difficulty comes from train replies (``curriculum.mean-score``, training
  split, model received that round) and from evaluate replies (``eval-loss``,
  held-out split, aggregated model); the latest one wins. Scores are keyed by
  node id: a resumed deployment whose nodes got new ids starts unscored.
- Participants are re-drawn from the eligible pool with a stream derived from
  ``(seed, round, "curriculum")``; the sample size is FedAvg's.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bouquet.strategies.base import BouquetStrategy, Record, Reduction
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.registry import register
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire
from bouquet.tasks.params import Param

NAME = "curriculum"
ORDERINGS = ("curriculum", "anti", "random")
PACINGS = ("linear", "quad", "root", "step", "exp", "log")
FRACTION = f"{NAME}.fraction"
MEAN_SCORE = f"{NAME}.mean-score"


def pacing(family: str, t: float, total: float, a: float, b: float) -> float:
    """Fraction of the data (or clients) in use at time ``t`` of ``total``.

    Parameters
    ----------
    family : str
        One of :data:`PACINGS`.
    t, total : float
        Elapsed and total training time (here: rounds completed, rounds).
    a : float
        Fraction of ``total`` after which everything is used (> 0).
    b : float
        Initial fraction.

    Returns
    -------
    float
        ``g(t)`` clipped to ``[0, 1]``.

    """
    u = t / (a * total)
    if family == "linear":
        g = b + (1 - b) * u
    elif family == "quad":
        g = b + (1 - b) * u**2
    elif family == "root":
        g = b + (1 - b) * math.sqrt(u)
    elif family == "step":
        g = b + math.floor(u)
    elif family == "exp":
        g = b + (1 - b) * math.expm1(10 * min(u, 1.0)) / math.expm1(10)
    elif family == "log":
        g = b + (1 - b) * (1 + 0.1 * math.log(u + math.exp(-10)))
    else:
        raise ValueError(f"Unknown pacing family {family!r}; use one of {PACINGS}.")
    return min(1.0, max(0.0, g))


def eligible_nodes(
    node_ids: Iterable[int], scores: Mapping[str, float], count: int
) -> list[int]:
    """The ``count`` easiest nodes: never-scored first, then by ascending score."""
    ranked = sorted(
        node_ids,
        key=lambda n: (str(n) in scores, scores.get(str(n), 0.0), n),
    )
    return ranked[: max(0, count)]


@register
class Curriculum(BouquetStrategy):
    """FedAvg with ordered local learning and optional easy-first selection."""

    name = NAME
    routine = NAME
    paper = "Vahidian et al., ICCV 2023, https://arxiv.org/abs/2212.12712"
    tagline = (
        "Ordered local learning (curriculum/anti/random, paced) + "
        "easy-first client selection"
    )
    family = "optimization"
    params = (
        Param("ordering", "curriculum", choices=ORDERINGS, send=True),
        Param("pacing", "linear", choices=PACINGS, help="data pacing family g(t)"),
        Param("a", 0.8, "> 0", "fraction of the rounds until all data is used"),
        Param("b", 0.2, "[0, 1]", "initial data fraction"),
        Param(
            "rescore-every", 1, ">= 1", "rounds a client's scores stay valid", send=True
        ),
        Param("client-pacing", "none", choices=("none", *PACINGS)),
        Param("client-a", 0.8, "> 0"),
        Param("client-b", 0.2, "[0, 1]"),
    )
    reductions = (Reduction({"b": 1.0}, "fedavg"),)

    def init_state(self) -> dict[str, Any]:
        return {"client-scores": {}, "score-rounds": {}}

    def total_rounds(self, ctx: RoundContext) -> int:
        """``T``: the run's length, which the pacing needs."""
        if ctx.num_rounds is None:
            raise ValueError(
                "curriculum paces by the run's length: put "
                f"'{wire.NUM_ROUNDS}' in the train config (Bouquet's driver does)."
            )
        return max(1, ctx.num_rounds)

    def data_fraction(self, ctx: RoundContext) -> float:
        """``g(t)`` for the round (``t = server_round - 1``)."""
        return pacing(
            self.pacing, ctx.server_round - 1, self.total_rounds(ctx), self.a, self.b
        )

    def client_fraction(self, ctx: RoundContext) -> float:
        """``g_c(t)``: the eligible fraction of clients (1 without client pacing)."""
        if self.client_pacing == "none":
            return 1.0
        return pacing(
            self.client_pacing,
            ctx.server_round - 1,
            self.total_rounds(ctx),
            self.client_a,
            self.client_b,
        )

    def round_config(self, ctx: RoundContext) -> dict[str, Any]:
        return {FRACTION: self.data_fraction(ctx)}

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        """The base's seeded sample, re-drawn from the easy pool when pacing."""
        plan = super().recipients(ctx)
        if self.client_pacing == "none" or not plan:
            return plan
        nodes = sorted(ctx.nodes)
        # round(): g = .6000000000000001 must give 6 of 10, not 7.
        size = math.ceil(round(self.client_fraction(ctx) * len(nodes), 9))
        scores = self.state["client-scores"]
        pool = eligible_nodes(nodes, scores, max(len(plan), size))
        rng = random.Random(wire.derive_seed(self.seed, ctx.server_round, NAME))
        return {n: {} for n in sorted(rng.sample(pool, len(plan)))}

    def _record(
        self, ctx: RoundContext, replies: Iterable[ClientReply], key: str
    ) -> None:
        scores = dict(self.state["client-scores"])
        rounds = dict(self.state["score-rounds"])
        for reply in replies:
            value = reply.metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                scores[str(reply.node)] = float(value)
                rounds[str(reply.node)] = int(ctx.server_round)
        self.state["client-scores"], self.state["score-rounds"] = scores, rounds

    def aggregate(self, replies: Sequence[ClientReply], ctx: RoundContext) -> NDArrays:
        """Record the clients' difficulty, then FedAvg."""
        self._record(ctx, replies, MEAN_SCORE)
        return super().aggregate(replies, ctx)

    def evaluate_metrics(
        self, replies: Sequence[ClientReply], ctx: RoundContext
    ) -> dict[str, float]:
        """Evaluation losses update the clients' difficulty too."""
        self._record(ctx, replies, wire.EVAL_LOSS)
        return {}
