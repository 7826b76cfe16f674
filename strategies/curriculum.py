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
``client_scores`` and ``score_rounds`` per node id.

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
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Result

from strategies import keys
from strategies.base import BouquetStrategy, derive_seed
from strategies.registry import AlgorithmEntry, register
from strategies.validation import check_reply

NAME = "curriculum"
ORDERINGS = ("curriculum", "anti", "random")
PACINGS = ("linear", "quad", "root", "step", "exp", "log")
ORDERING = keys.algorithm_key(NAME, "ordering")
FRACTION = keys.algorithm_key(NAME, "fraction")
RESCORE_EVERY = keys.algorithm_key(NAME, "rescore-every")
MEAN_SCORE = keys.algorithm_key(NAME, "mean-score")


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


class Curriculum(BouquetStrategy, flwr_strategy.FedAvg):
    """FedAvg with ordered local learning and optional easy-first selection.

    Parameters
    ----------
    ordering : str
        ``"curriculum"``, ``"anti"`` or ``"random"``.
    pacing_family, a, b : str, float, float
        Data pacing ``g(t)`` (see the module docstring).
    rescore_every : int
        Clients re-score their examples every this many rounds.
    client_pacing, client_a, client_b : str, float, float
        Client pacing ``g_c(t)``; ``client_pacing = "none"`` samples uniformly.
    total_rounds : int
        ``T``; :meth:`start` sets it from ``num_rounds``.

    """

    state_attributes = ("client_scores", "score_rounds")

    def __init__(
        self,
        *args: Any,
        ordering: str = "curriculum",
        pacing_family: str = "linear",
        a: float = 0.8,
        b: float = 0.2,
        rescore_every: int = 1,
        client_pacing: str = "none",
        client_a: float = 0.8,
        client_b: float = 0.2,
        total_rounds: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if ordering not in ORDERINGS:
            raise ValueError(f"curriculum.ordering must be one of {ORDERINGS}.")
        if pacing_family not in PACINGS:
            raise ValueError(f"curriculum.pacing must be one of {PACINGS}.")
        if client_pacing not in ("none", *PACINGS):
            raise ValueError(f"curriculum.client-pacing: 'none' or one of {PACINGS}.")
        if a <= 0 or client_a <= 0 or not (0 <= b <= 1 and 0 <= client_b <= 1):
            raise ValueError("curriculum: need a > 0 and b in [0, 1].")
        if rescore_every < 1:
            raise ValueError("curriculum.rescore-every must be >= 1.")
        self.ordering, self.pacing_family = ordering, pacing_family
        self.a, self.b, self.rescore_every = float(a), float(b), int(rescore_every)
        self.client_pacing = client_pacing
        self.client_a, self.client_b = float(client_a), float(client_b)
        self.total_rounds = max(1, int(total_rounds))
        self.client_scores: dict[str, float] = {}
        self.score_rounds: dict[str, int] = {}

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        *args: Any,
        **kwargs: Any,
    ) -> Result:
        """Flower's ``start`` (see the base); records ``T = num_rounds`` first."""
        self.total_rounds = max(1, int(num_rounds))
        return super().start(grid, initial_arrays, num_rounds, *args, **kwargs)

    def data_fraction(self, server_round: int) -> float:
        """``g(t)`` for ``server_round`` (``t = server_round - 1``)."""
        return pacing(
            self.pacing_family, server_round - 1, self.total_rounds, self.a, self.b
        )

    def client_fraction(self, server_round: int) -> float:
        """``g_c(t)``: the eligible fraction of clients (1 without client pacing)."""
        if self.client_pacing == "none":
            return 1.0
        return pacing(
            self.client_pacing,
            server_round - 1,
            self.total_rounds,
            self.client_a,
            self.client_b,
        )

    def round_config(self, server_round: int) -> dict[str, Any]:
        return {
            ORDERING: self.ordering,
            FRACTION: self.data_fraction(server_round),
            RESCORE_EVERY: self.rescore_every,
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The base's seeded sampling, re-drawn from the easy pool when pacing."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.client_pacing == "none" or not messages:
            return messages
        nodes = sorted(grid.get_node_ids())
        # round(): g = .6000000000000001 must give 6 of 10, not 7.
        size = math.ceil(round(self.client_fraction(server_round) * len(nodes), 9))
        pool = eligible_nodes(nodes, self.client_scores, max(len(messages), size))
        rng = random.Random(derive_seed(self.seed, server_round, NAME))
        chosen = sorted(rng.sample(pool, len(messages)))
        # Every message of a round carries the same content: readdress it.
        return list(
            self._construct_messages(messages[0].content, chosen, MessageType.TRAIN)
        )

    def _record_scores(
        self, server_round: int, replies: Iterable[Message], key: str, *, check: bool
    ) -> None:
        for msg in replies:
            if check and check_reply(msg, array_records={}) is not None:
                continue
            value = msg.content[keys.METRICS].get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                node = str(msg.metadata.src_node_id)
                self.client_scores[node] = float(value)
                self.score_rounds[node] = int(server_round)

    def aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Already validated by the base.
        self._record_scores(server_round, replies, MEAN_SCORE, check=False)
        return super().aggregate_valid(server_round, replies)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self._record_scores(server_round, replies, keys.EVAL_LOSS, check=True)
        return super().aggregate_evaluate(server_round, replies)


def _build(common: Mapping[str, Any], hp: Mapping[str, Any]) -> Curriculum:
    return Curriculum(
        **common,
        ordering=hp["ordering"],
        pacing_family=hp["pacing"],
        a=hp["a"],
        b=hp["b"],
        rescore_every=hp["rescore-every"],
        client_pacing=hp["client-pacing"],
        client_a=hp["client-a"],
        client_b=hp["client-b"],
    )


register(
    AlgorithmEntry(
        NAME,
        _build,
        client=NAME,
        hyperparameters={
            "ordering": "curriculum",
            "pacing": "linear",
            "a": 0.8,
            "b": 0.2,
            "rescore-every": 1,
            "client-pacing": "none",
            "client-a": 0.8,
            "client-b": 0.2,
        },
        paper="Vahidian et al., ICCV 2023, https://arxiv.org/abs/2212.12712",
        summary="Ordered local learning (curriculum/anti/random, paced) + "
        "easy-first client selection",
        family="optimization",
    )
)
