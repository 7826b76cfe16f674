"""AFA-CD and AFA-CS: Anarchic Federated Averaging (simulated anarchy).

Paper: Yang, Zhang, Khanduri, Liu. "Anarchic Federated Learning", ICML 2022.
https://arxiv.org/abs/2108.09875 (no public code).

Workers choose when to take part and how many local steps to run, so updates
arrive computed on stale models with unequal work. Both servers use two-sided
learning rates (server ``eta``, worker ``eta_L`` = the shared ``lr`` key):

- **Worker** (recipe ``afa``): from the model ``x_{t-tau}`` it received, run
  ``K_i`` SGD steps (``K_i`` drawn by the worker, uniform in ``[k-min, k]``,
  from its own seed) and return ``G_i = (1/K_i) sum_k g_i(y_k; xi_k)``.
- **AFA-CD** (cross-device): ``x_{t+1} = x_t - eta * mean_{i in M_t} G_i``.
- **AFA-CS** (cross-silo): keep every worker's latest ``G_i``; the arrivals
  overwrite theirs; ``x_{t+1} = x_t - eta * mean_i G_i`` over the table
  (stale entries for absent workers, SAG/MIFA-like).

Anarchy is simulated in the strategy (architecture rule 6: deterministic by seed):
the server keeps the last ``tau-max + 1`` global models and sends each of the
m sampled nodes (m = ``fraction-train`` x N) the model of an age ``tau`` drawn
from ``(seed, round)``. ``arrival = "uniform"``: the base's uniform sample,
``tau ~ U{0..tau-max}``. ``arrival = "biased"``: the upper half of the sorted
node ids are slow: they arrive 4x less often and always with ``tau = tau-max``.

Both servers are a chain: uniform weights, the mean of the ``G_i`` (AFA-CD)
or of the table of latest ``G_i`` (AFA-CS, the combine piece
:class:`TableMean`), then the step ``x - eta G``.

Wire protocol: ``arrays`` (the stale model), ``config`` with ``afa.k``,
``afa.k-min``, ``afa.normalize``, ``afa.version`` (the model's round), and
``local-steps = local-epochs = k`` (room for any ``K_i``). The reply's
``arrays`` is ``G_i`` (zeros for buffers); ``metrics`` add ``afa.local-steps``
(``K_i``); the round's train metrics add ``afa.staleness`` (mean age of the
models the replies were computed on). Server state: ``models`` (version ->
arrays, at most tau-max + 1 of them) and, for AFA-CS, the combine piece's
``table`` (partition-id -> G_i, M x |model|).

Decisions where the spec was open (the algorithms are recalled, not checked
against the paper's Algorithms 1-2):

- The server step is ``x - eta * G``; any printed ``eta * eta_L`` product is
  folded into ``eta``. With ``tau-max = 0``, ``k-min = k`` and
  ``eta = lr * k``, AFA-CD is FedAvg's unweighted mean of the local models.
- ``G_i`` is the mean of the raw loss gradients the worker stepped with (exact
  for momentum 0 and weight decay 0, the paper's setting; with momentum it is
  still the mean gradient, not the model change).
- ``normalize = false`` is the spec's baseline "FedAvg on stale models": the
  worker returns ``x_{t-tau} - y_K`` (no division by ``K_i``); with ``eta = 1``
  the server averages the deltas.
- AFA-CS averages over the workers that have reported at least once (not over
  all M with zeros), so early rounds are not shrunk toward zero.
- Tables are keyed by the reported ``partition-id`` (stable across runners).
- BatchNorm layers stay in eval mode (a gradient says nothing about running
  statistics); use ``model-norm = "group"`` or ``"none"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from flwr.app import ConfigRecord

from bouquet.strategies import pieces
from bouquet.strategies.aggregation import mean64, to_record
from bouquet.strategies.base import BouquetStrategy, Record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedamd import client_key
from bouquet.strategies.pieces import Replies, State, Updated
from bouquet.strategies.registry import register
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire
from bouquet.tasks.params import Param

ARRIVALS = ("uniform", "biased")
SLOW_WEIGHT = 0.25  # relative arrival rate of a slow node under "biased"
VERSION = "afa.version"


@dataclass(frozen=True)
class TableMean(pieces.Combine):
    """AFA-CS: the mean over a table of every worker's latest ``G_i``."""

    def update(
        self, replies: Replies, weights: np.ndarray, state: State, ctx: RoundContext
    ) -> Updated:
        table = {**(state or {}), **{client_key(r): dict(r.arrays) for r in replies}}
        return mean64([table[k] for k in sorted(table)]), table


class AFA(BouquetStrategy):
    """Common server of AFA-CD and AFA-CS: stale models out, ``G_i`` back."""

    routine = "afa"
    broadcasts_global_model = False  # a node may get a stale model
    paper = "Yang et al., ICML 2022, https://arxiv.org/abs/2108.09875"
    family = "participation"
    params: ClassVar[tuple[Param, ...]] = (
        Param("eta", 1.0, "> 0", "server learning rate (G_i is a gradient)"),
        Param("k", 10, ">= 1", "workers draw K_i in [k-min, k]", send="afa.k"),
        Param("k-min", 1, ">= 1", send="afa.k-min"),
        Param("tau-max", 5, ">= 0", "largest model age sent (simulated staleness)"),
        Param(
            "arrival",
            "uniform",
            choices=ARRIVALS,
            help="biased: slow half rarer, stalest",
        ),
        Param(
            "normalize",
            True,
            help="false: raw deltas, the 'FedAvg on stale models' baseline",
            send="afa.normalize",
        ),
    )

    def validate(self) -> None:
        """``k-min <= k``."""
        if self.k_min > self.k:
            raise ValueError(f"AFA needs k-min <= k; got {self.k_min}, {self.k}.")

    def init_state(self) -> dict[str, Any]:
        return {"models": {}}

    def combine_rule(self) -> pieces.Combine:
        """How this round's ``G_i`` become ``G`` (CD: their mean)."""
        return pieces.WeightedMean(of="updates")

    def make_aggregator(self) -> pieces.Aggregator:
        """Uniform weights, the combine rule, the step ``x - eta G``."""
        return pieces.Aggregator(
            pieces.Uniform(), self.combine_rule(), pieces.ServerSGD(-self.eta)
        )

    def round_config(self, ctx: RoundContext) -> dict[str, Any]:
        """Room for any ``K_i``: ``local-steps = local-epochs = k``."""
        return {wire.LOCAL_STEPS: self.k, wire.LOCAL_EPOCHS: self.k}

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        """Sample m nodes, then send each a model of a random age."""
        sampled = self.sample(ctx, self.fraction_train, self.min_train_nodes)
        oldest = ctx.server_round - self.tau_max
        models = {v: a for v, a in self.state["models"].items() if int(v) >= oldest}
        models[str(ctx.server_round)] = dict(ctx.arrays)
        self.state["models"] = models
        rng = np.random.default_rng(
            wire.derive_seed(self.seed, ctx.server_round, "afa")
        )
        nodes = sorted(sampled)
        slow: set[int] = set()
        if self.arrival == "biased" and sampled:
            everyone = sorted(ctx.nodes)
            slow = set(everyone[len(everyone) // 2 :])
            weights = np.array([SLOW_WEIGHT if n in slow else 1.0 for n in everyone])
            drawn = rng.choice(
                everyone, len(sampled), replace=False, p=weights / weights.sum()
            )
            nodes = sorted(int(n) for n in drawn)
        available = min(self.tau_max, len(models) - 1)
        plan: dict[int, dict[str, Record]] = {}
        for node in nodes:
            tau = available if node in slow else int(rng.integers(0, available + 1))
            version = ctx.server_round - tau
            ctx.per_node[node] = {"version": version}
            plan[node] = {
                wire.CONFIG: ConfigRecord({**ctx.config, VERSION: version}),
                wire.ARRAYS: to_record(models[str(version)]),
            }
        return plan

    def train_metrics(
        self, replies: Sequence[ClientReply], ctx: RoundContext
    ) -> dict[str, float]:
        """``afa.staleness``: the mean age of the models the replies trained."""
        ages = [
            ctx.server_round - ctx.per_node[r.node]["version"]
            for r in replies
            if r.node in ctx.per_node
        ]
        return {"afa.staleness": float(np.mean(ages))} if ages else {}


@register
class AFACD(AFA):
    """AFA-CD: the mean of the ``G_i`` that arrived this round."""

    name = "afa-cd"
    tagline = "Stale, self-paced workers; server steps on the mean K-normalised G_i"


@register
class AFACS(AFA):
    """AFA-CS: the mean over the table of every worker's latest ``G_i``."""

    name = "afa-cs"
    tagline = "AFA with a table of every worker's latest G_i (cross-silo)"

    def combine_rule(self) -> pieces.Combine:
        """The mean over the table of latest ``G_i``."""
        return TableMean()
