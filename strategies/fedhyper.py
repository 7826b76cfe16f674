"""FedHyper: hypergradient learning-rate schedulers for FL (global and local).

Paper: Wang, Wang, Li. "FedHyper: A Universal and Robust Learning Rate Scheduler
for Federated Learning with Hypergradient Descent", ICLR 2024.
https://arxiv.org/abs/2310.03156. Official code: github.com/ATP-1010/FedHyper
(``src/federated_main.py``: server schedulers; ``src/update.py``: client one).

The hypergradient of the loss with respect to a learning rate is (minus) the
dot product of consecutive updates: the rate grows while they agree and
shrinks when they oppose. With ``x_t`` the global model and
``Delta_t = mean_i(w_i) - x_t`` the FedAvg pseudo-update, ``h`` the
hypergradient step size (1 in the code) and ``a_0 = 0``, from round 2 on:

- ``g``: ``a_t = clip(a_{t-1} + h <Delta_t, Delta_{t-1}>, a-min-g, a-max)``,
  ``x_{t+1} = x_t + (1 + a_t) Delta_t`` (global lr ``1 + a_t``).
- ``gm`` (recommended): ``a_t = clip(a_{t-1} + h <Delta_t, m_{t-1}>, a-min-gm,
  a-max)``, ``x_{t+1} = x_t + (1 + a_t) Delta_t + mu a_t m_{t-1}`` and
  ``m_t = Delta_t + mu m_{t-1}`` (``m_1 = Delta_1``, ``mu = gm-momentum``;
  not textbook momentum, kept as in the code).
- ``sl``: ``a_t`` accumulates as in ``g`` without a clip; the global step is
  FedAvg and every client of the next round trains with
  ``lr = clip(eta_0 (1 + a_t), local-lr-min, local-lr-max)``.
- ``cl``: FedAvg on the server; clients rescale their step size after every
  step (recipe ``fedhyper``, see ``clientapps/recipes/fedhyper.py``).
- ``full``: ``gm`` on the server and ``cl`` on the clients.

Round 1 is plain FedAvg in every variant (there is no previous update yet).
The server schedulers are one server-optimizer piece, :class:`HypergradientLR`,
after FedAvg's weighted mean.

Wire protocol: server sends ``arrays`` and ``config``. ``sl`` overrides the
shared ``lr`` key with the scheduled rate. ``cl``/``full`` add the record
``fedhyper.global-update`` (``Delta_{t-1}`` over the trainable entries, zeros in
round 1) and the config keys ``fedhyper.client-scheduler`` (True),
``fedhyper.num-sampled`` (clients sampled this round, the code's ``N * frac``),
``fedhyper.hypergrad-lr``, ``fedhyper.gamma-max``, ``fedhyper.beta-min``,
``fedhyper.beta-max``, ``fedhyper.global-weight``. Clients return their full
local ``arrays`` and ``metrics`` (``cl`` adds ``fedhyper.beta``, the final
multiplier). Server state (the optimizer piece's): ``alpha`` (``a_t``),
``previous`` (``Delta_{t-1}``) and ``momentum`` (``m_{t-1}``, ``gm``/``full``).
Clients keep none: the multiplier restarts at 1 every round, as in the code.

Decisions where the spec was open:

- One registry name with a ``scheduler`` hyperparameter (``g``, ``gm``, ``sl``,
  ``cl``, ``full``; default ``gm``, the paper's recommendation): the variants
  share their state and wire protocol.
- ``hypergrad-lr`` (default 1, the code's implicit value) scales every dot
  product; at 0 every variant is exactly FedAvg (``sl`` when ``eta_0`` lies in
  the lr bounds).
- Dot products and the scaled step use the trainable entries only; BatchNorm
  running statistics (state-dict names ending in ``running_mean``,
  ``running_var``, ``num_batches_tracked``) and integer entries take the plain
  mean, as ``parameters_to_vector`` does in the code.
- The mean is Flower's FedAvg (weighted by ``num-examples``), so the reduction
  is to this pack's ``fedavg``; the code averages uniformly over equal shards.
- ``sl``: the code resets every client's lr to ``eta_0`` at the start of each
  round, which makes its scheduled rate dead code; we apply the intended rule
  (the rate from ``a_t`` is used in round ``t + 1``), and clip from round 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from bouquet.strategies import pieces
from bouquet.strategies.aggregation import cast_like, to_record
from bouquet.strategies.base import BouquetStrategy, Record, Reduction
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.registry import register
from bouquet.tasks import wire
from bouquet.tasks.params import Param, python_name

NAME = "fedhyper"
SCHEDULERS = ("g", "gm", "sl", "cl", "full")
GLOBAL_UPDATE = f"{NAME}.global-update"
"""ArrayRecord sent to ``cl`` clients: the previous FedAvg update."""
NUM_SAMPLED = f"{NAME}.num-sampled"
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
CLIENT_CONSTANTS = (
    "hypergrad-lr",
    "gamma-max",
    "beta-min",
    "beta-max",
    "global-weight",
)


def trainable_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """State-dict entries that are trainable parameters (not BN statistics)."""
    return [
        k
        for k, v in arrays.items()
        if v.dtype.kind == "f" and not k.endswith(BUFFER_SUFFIXES)
    ]


def dot(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """``<a, b>`` over the keys of ``a``, flattened, in float64."""
    return float(sum(np.dot(a[k].ravel().astype(np.float64), b[k].ravel()) for k in a))


@dataclass(frozen=True)
class HypergradientLR(pieces.ServerOptimizer):
    """FedHyper's global schedulers on ``Delta_t`` (see the module docstring).

    ``x_{t+1} = x_t + Delta_t + extra``: ``extra = a_t Delta_t`` (``g``),
    ``a_t Delta_t + mu a_t m_{t-1}`` (``gm``/``full``), none for ``sl``/``cl``
    (``sl`` only moves ``a_t``, which schedules the next round's local rate).
    """

    scheduler: str = "gm"
    hypergrad_lr: float = 1.0
    a_bounds: tuple[float, float] = (-0.2, 4.0)
    mu: float = 0.9

    def init(self) -> pieces.State:
        return {"alpha": 0.0, "previous": None, "momentum": None}

    def update(
        self, delta: NDArrays, state: pieces.State, ctx: RoundContext
    ) -> pieces.Updated:
        names = trainable_keys({k: ctx.arrays[k] for k in delta})
        d = {k: delta[k] for k in names}
        alpha, previous, momentum = state["alpha"], state["previous"], state["momentum"]
        extra: NDArrays = {}
        h = self.hypergrad_lr
        if self.scheduler in ("gm", "full"):
            if momentum is not None:
                alpha = float(np.clip(alpha + h * dot(d, momentum), *self.a_bounds))
                extra = {k: alpha * d[k] + self.mu * alpha * momentum[k] for k in names}
                momentum = {k: d[k] + self.mu * momentum[k] for k in names}
            else:
                momentum = d
        elif previous is not None and self.scheduler in ("g", "sl"):
            alpha += h * dot(d, previous)
            if self.scheduler == "g":
                alpha = float(np.clip(alpha, *self.a_bounds))
                extra = {k: alpha * d[k] for k in names}
        step = {k: delta[k] + extra[k] if k in extra else delta[k] for k in delta}
        new_state = {"alpha": float(alpha), "previous": d, "momentum": momentum}
        return pieces.apply_step(ctx, step), new_state


@register
class FedHyper(BouquetStrategy):
    """FedHyper's server (see the module docstring for the rules)."""

    name = NAME
    routine = NAME
    paper = "Wang et al., ICLR 2024, https://arxiv.org/abs/2310.03156"
    tagline = "Hypergradient schedulers of the global and local learning rates"
    family = "optimization"
    params = (
        Param("scheduler", "gm", choices=SCHEDULERS, help="g | gm | sl | cl | full"),
        Param("hypergrad-lr", 1.0, ">= 0", "step size on the dot products; 0 = FedAvg"),
        Param("a-min-g", -0.8, help="g: global lr 1 + a_t in [0.2, 5]"),
        Param("a-min-gm", -0.2, help="gm / full: global lr in [0.8, 5]"),
        Param("a-max", 4.0),
        Param("gm-momentum", 0.9, ">= 0", "mu of gm"),
        Param("local-lr-min", 0.001, "> 0", "sl: clip of the scheduled local lr"),
        Param("local-lr-max", 0.1, "> 0"),
        Param("gamma-max", 1.1, "> 0", "cl: cap of the per-step multiplier"),
        Param("beta-min", 0.1, "> 0", "cl: bounds of the local lr factor"),
        Param("beta-max", 10.0, "> 0"),
        Param("global-weight", 0.1, help="cl: weight of <u_k, Delta_{t-1}> / n"),
    )
    reductions = (Reduction({"hypergrad-lr": 0.0}, "fedavg"),)

    def validate(self) -> None:
        """The clip bounds must be ordered."""
        if self.a_max < max(self.a_min_g, self.a_min_gm):
            raise ValueError("fedhyper: a-max must be >= a-min-g and a-min-gm.")
        if self.local_lr_min > self.local_lr_max or self.beta_min > self.beta_max:
            raise ValueError("fedhyper: lr and beta bounds must be min <= max.")

    @property
    def client_scheduler(self) -> bool:
        """Whether clients run the ``cl`` scheduler."""
        return self.scheduler in ("cl", "full")

    def make_aggregator(self) -> pieces.Aggregator:
        """FedAvg's mean, then the hypergradient schedule."""
        low = self.a_min_g if self.scheduler == "g" else self.a_min_gm
        return pieces.Aggregator(
            pieces.ByExamples(),
            pieces.WeightedMean(accumulate="wire"),
            HypergradientLR(
                self.scheduler, self.hypergrad_lr, (low, self.a_max), self.gm_momentum
            ),
        )

    @property
    def alpha(self) -> float:
        """``a_t``."""
        return float(self.state["aggregator"]["optimizer"]["alpha"])

    def local_lr(self, eta_0: float) -> float:
        """``sl``'s local rate for the next round, from the initial rate."""
        bounds = (self.local_lr_min, self.local_lr_max)
        return float(np.clip(eta_0 * (1.0 + self.alpha), *bounds))

    def round_config(self, ctx: RoundContext) -> dict[str, Any]:
        """``sl``'s scheduled lr, or the client scheduler's constants."""
        values: dict[str, Any] = {}
        if self.scheduler == "sl":
            values[wire.LR] = self.local_lr(float(ctx.caller_config.get(wire.LR, 0.0)))
        if self.client_scheduler:
            values[f"{NAME}.client-scheduler"] = True
            for key in CLIENT_CONSTANTS:
                values[f"{NAME}.{key}"] = getattr(self, python_name(key))
        return values

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        """The base's sample; ``cl`` clients also learn the cohort size."""
        plan = super().recipients(ctx)
        if not self.client_scheduler:
            return plan
        config = ConfigRecord({**ctx.config, NUM_SAMPLED: len(plan)})
        return {node: {wire.CONFIG: config} for node in plan}

    def outgoing_records(self, ctx: RoundContext) -> dict[str, Record]:
        """``Delta_{t-1}`` over the trainable entries (zeros in round 1)."""
        if not self.client_scheduler:
            return {}
        previous = self.state["aggregator"]["optimizer"]["previous"] or {}
        sent = ctx.arrays
        return {
            GLOBAL_UPDATE: to_record(
                {
                    k: cast_like(previous.get(k, np.zeros(sent[k].shape)), sent[k])
                    for k in trainable_keys({k: sent[k] for k in ctx.shared})
                }
            )
        }

    def train_metrics(self, replies: Any, ctx: RoundContext) -> dict[str, float]:
        """The global rate and ``a_t`` (and ``sl``'s next local rate)."""
        global_lr = 1.0 + self.alpha if self.scheduler in ("g", "gm", "full") else 1.0
        metrics = {f"{NAME}.global-lr": global_lr, f"{NAME}.alpha": self.alpha}
        if self.scheduler == "sl":
            eta_0 = float(ctx.caller_config.get(wire.LR, 0.0))
            metrics[f"{NAME}.local-lr"] = self.local_lr(eta_0)
        return metrics
