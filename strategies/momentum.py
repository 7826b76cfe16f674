"""SCAFFOLD, FedAvg-M, SCAFFOLD-M and their variance-reduced (-VR) variants.

Papers: Cheng, Huang, Wu, Yuan. "Momentum Benefits Non-IID Federated Learning
Simply and Provably", ICLR 2024, https://arxiv.org/abs/2306.16504 (FedAvg-M,
SCAFFOLD-M, FedAvg-M-VR, SCAFFOLD-M-VR); Karimireddy et al. "SCAFFOLD:
Stochastic Controlled Averaging for Federated Learning", ICML 2020,
https://arxiv.org/abs/1910.06378 (SCAFFOLD, option II).

Notation: round r, global model x^r, momentum direction g^r (gradient units),
K_i local steps of lr eta, global lr eta_g, beta the weight of the FRESH
gradient (beta = 1: no momentum). Client i starts at y_0 = x^r and steps
``y <- y - eta * d_k`` with, over the trainable parameters,

- SCAFFOLD:       ``d = grad(y) - c_i + c``
- FedAvg-M:       ``d = beta * grad(y) + (1 - beta) * g^r``
- SCAFFOLD-M:     ``d = beta * (grad(y) - c_i + c) + (1 - beta) * g^r``
- -VR (STORM):    ``d = grad(y; xi) + (1 - beta) * (g^r - grad(x^{r-1}; xi))``,
  plus ``- c_i + c`` for SCAFFOLD-M-VR (two gradients per step, same batch).

SCAFFOLD variants then set ``c_i+ = c_i - c + (x^r - y_K) / (K_i eta)``
(option II) and return ``dc_i = c_i+ - c_i``. Server, over the valid replies S
of N connected nodes (uniform means, as in both papers):
``x^{r+1} = x^r + eta_g * mean_S (y_i - x^r)``,
``g^{r+1} = mean_S (x^r - y_i) / (eta K_i)`` (momentum variants),
``c <- c + (1/N) * sum_S dc_i`` (= ``(|S|/N) mean_S dc_i``; SCAFFOLD variants).

**Not Flower's ``fedavgm``.** The baseline ``fedavgm`` (Hsu et al. 2019) keeps a
momentum buffer on the SERVER over pseudo-gradients; ``fedavg-m`` here mixes the
server's average direction g^r into every LOCAL step of every client.

The update of x is the chain (uniform weights, mean of ``y_i - x``, a step
of ``eta_g``); ``g``, ``c`` and ``x^{r-1}`` are the family's own state.

Wire protocol (namespace ``momentum``, shared by the five names):
config ``momentum.beta`` (float), ``momentum.scaffold`` (bool), ``momentum.vr``
(bool); extra records server -> client ``momentum.c`` (SCAFFOLD variants),
``momentum.g`` (momentum variants, from round 2), ``momentum.x-prev`` (-VR,
from round 2); client -> server full local ``arrays``, ``metrics`` with
``num-examples`` and ``momentum.eta-k`` (= eta * K_i), and ``momentum.dc``
(SCAFFOLD variants). Records cover every state-dict entry (zeros for buffers)
so they validate like the model. Server state: ``g``, ``c``, ``x_prev``
(exported, so resume works). Client state: ``c_i`` in ``Context.state``
under ``momentum.c-i`` (absent = zeros).

Decisions where the spec was open:

- beta weights the fresh gradient (the spec's convention); beta = 1 is FedAvg
  (SCAFFOLD for the SCAFFOLD variants). The lead's issue wrote the reduction
  as "beta = 0", the other convention: it is tested here as beta = 1.
- Default beta: 0.1 (FedCM's alpha) for FedAvg-M and SCAFFOLD-M, 0.5 for the
  -VR variants, the top of the spec's typical 0.1-0.5: at 0.1 FedAvg-M-VR
  ended at 0.23 (0.11-0.33) on the quickstart's settings, at 0.5 at 0.80
  (0.77-0.83), 3 seeds (``docs/defaults.md``). The reproduction configs set
  beta explicitly.
- g^0: there is none. In round 1 no ``momentum.g`` is sent and clients step on
  the fresh (corrected) gradient, so g^1 is the first round's average
  direction (the spec's second option). -VR likewise runs plain in round 1.
- Server step ``x + eta_g * mean(y - x)`` (= ``x - eta_g eta K g`` with equal
  K), applied to every state-dict entry; BatchNorm statistics are thus
  averaged at eta_g = 1 (the default), integer buffers rounded.
- ``eta * K_i`` comes from the client (metric ``momentum.eta-k``), so clients
  with different step counts (epoch-based training) give g in gradient units.
  It divides the update, so a reply's ``eta K_i`` must be 0 (no step) or in
  ``[1e-8, 1e6]``; a denormal would make g infinite (``reply_metric_ranges``).
- The local optimizer is plain SGD without heavy-ball momentum, as in both
  papers: the family sends ``optimizer = 'sgd'`` and ``momentum = 0``
  whatever the run config says (the family's momentum is its own ``beta``).
  Option II divides ``x^r - y_K`` by ``K eta``, which holds for plain SGD
  only: with the run config's default momentum 0.9 the control variates came
  out about ten times too large and SCAFFOLD fell to chance within three
  rounds. ``weight-decay`` is still the run config's (0 by default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from bouquet.strategies.aggregation import cast_like, mean64, to_record, weighted_sum
from bouquet.strategies.base import BouquetStrategy, Record, Reduction
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.pieces import Aggregator, ServerSGD, Uniform, WeightedMean
from bouquet.strategies.registry import register
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire
from bouquet.tasks.params import Param

NAMESPACE = "momentum"
BETA = f"{NAMESPACE}.beta"
USE_SCAFFOLD = f"{NAMESPACE}.scaffold"
USE_VR = f"{NAMESPACE}.vr"
C_RECORD = f"{NAMESPACE}.c"
G_RECORD = f"{NAMESPACE}.g"
X_PREV_RECORD = f"{NAMESPACE}.x-prev"
DC_RECORD = f"{NAMESPACE}.dc"
ETA_K = f"{NAMESPACE}.eta-k"

ETA_G = Param("eta-g", 1.0, "> 0", "global learning rate eta_g")
BETA_PARAM = Param("beta", 0.1, "(0, 1]", "weight of the fresh gradient (1: none)")
VR_BETA_PARAM = Param(
    "beta",
    0.5,
    "(0, 1]",
    "weight of the fresh gradient (1: none); 0.5, the top of the spec's "
    "typical 0.1-0.5: at 0.1 the -VR variants fell back towards chance on the "
    "quickstart's settings (docs/defaults.md)",
)
PAPER = "Cheng et al., ICLR 2024, https://arxiv.org/abs/2306.16504"
NO_MOMENTUM_IS_FEDAVG = (Reduction({"beta": 1.0}, "fedavg", {"weighting": "uniform"}),)
NO_MOMENTUM_IS_SCAFFOLD = (Reduction({"beta": 1.0}, "scaffold"),)


def _like(arrays: Mapping[str, np.ndarray], reference: NDArrays) -> Record:
    """``arrays`` as a record in the keys and dtypes of the model."""
    return to_record(
        {
            k: cast_like(np.asarray(arrays.get(k, np.zeros(r.shape))), r)
            for k, r in reference.items()
        }
    )


class MomentumFamily(BouquetStrategy):
    """Server of the whole family; subclasses fix which parts are on."""

    routine = NAMESPACE
    reply_arrays = "model"
    family = "optimization"
    paper = PAPER
    params: ClassVar[tuple[Param, ...]] = (BETA_PARAM, ETA_G)
    reply_metrics = (ETA_K,)
    # eta K_i divides the update: 0 (no step) or a real step size, never a
    # denormal that would make g infinite.
    reply_metric_ranges: ClassVar[dict] = {ETA_K: ("[0, 0]", "[1e-8, 1e6]")}
    beta: float = 1.0
    """Weight of the fresh gradient; SCAFFOLD does not declare it (no momentum)."""
    control_variates: ClassVar[bool] = False
    variance_reduced: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.reply_records = (DC_RECORD,) if cls.control_variates else ()

    @property
    def uses_momentum(self) -> bool:
        """Whether clients mix g into their steps (so the server must track g)."""
        return self.beta < 1.0 or self.variance_reduced

    def dp_problem(self) -> str:
        """SCAFFOLD is protected (its dc records are not); g reads raw replies."""
        if self.uses_momentum:
            return (
                "the direction g it sends every client is computed from the raw "
                "replies (FedAvg-M, SCAFFOLD-M and the -VR variants)"
            )
        return super().dp_problem()

    def make_aggregator(self) -> Aggregator:
        """Uniform mean of ``y_i - x`` (both papers), a step of ``eta_g``."""
        return Aggregator(Uniform(), WeightedMean(), ServerSGD(self.eta_g))

    def init_state(self) -> dict[str, Any]:
        return {"g": {}, "c": {}, "x_prev": {}}

    def round_config(self, ctx: RoundContext) -> dict[str, Any]:
        return {
            # Plain local SGD (see the module doc): option II assumes it.
            wire.OPTIMIZER: "sgd",
            wire.MOMENTUM: 0.0,
            BETA: self.beta,
            USE_SCAFFOLD: self.control_variates,
            USE_VR: self.variance_reduced,
        }

    def outgoing_records(self, ctx: RoundContext) -> dict[str, Record]:
        x = {k: ctx.arrays[k] for k in ctx.shared}
        g, records = self.state["g"], {}
        if self.control_variates:
            records[C_RECORD] = _like(self.state["c"], x)
        if self.uses_momentum and g:
            records[G_RECORD] = _like(g, x)
        if self.variance_reduced and self.state["x_prev"] and g:
            records[X_PREV_RECORD] = _like(self.state["x_prev"], x)
        return records

    def aggregate(self, replies: Sequence[ClientReply], ctx: RoundContext) -> NDArrays:
        """The chain's update of x, then g, c and x^{r-1}."""
        x = {k: ctx.arrays[k] for k in ctx.shared}
        arrays = super().aggregate(replies, ctx)
        if self.uses_momentum:
            used = [
                (r, float(r.metrics[ETA_K])) for r in replies if r.metrics[ETA_K] > 0
            ]
            if used:
                # g = mean_i of -(y_i - x) / eta_k,i over the replies with a step
                self.state["g"] = weighted_sum(
                    [r.arrays for r, _ in used],
                    [-1.0 / (eta * len(used)) for _, eta in used],
                    reference=x,
                )
        if self.control_variates:
            mean_dc = mean64([r.records[DC_RECORD] for r in replies])
            scale = len(replies) / max(ctx.population, len(replies))
            c = self.state["c"]
            self.state["c"] = {
                k: (c[k] if k in c else 0.0) + scale * v for k, v in mean_dc.items()
            }
        if self.variance_reduced:
            self.state["x_prev"] = {k: np.array(v) for k, v in x.items()}
        return arrays


@register
class SCAFFOLD(MomentumFamily):
    """SCAFFOLD (option II): control variates, no momentum."""

    name = "scaffold"
    paper = "Karimireddy et al., ICML 2020, https://arxiv.org/abs/1910.06378"
    tagline = "Client/server control variates correct local drift (option II)"
    params = (ETA_G,)
    control_variates = True


@register
class FedAvgMomentum(MomentumFamily):
    """FedAvg-M: the server's average direction g^r mixed into local steps."""

    name = "fedavg-m"
    tagline = (
        "Local steps mix in the global direction g (client-side momentum; "
        "not fedavgm's server momentum)"
    )
    reductions = NO_MOMENTUM_IS_FEDAVG


@register
class SCAFFOLDMomentum(MomentumFamily):
    """SCAFFOLD-M: SCAFFOLD's corrected gradient mixed with g^r."""

    name = "scaffold-m"
    tagline = "SCAFFOLD with the global direction g mixed into local steps"
    control_variates = True
    reductions = NO_MOMENTUM_IS_SCAFFOLD


@register
class FedAvgMomentumVR(MomentumFamily):
    """FedAvg-M-VR: STORM-type recursive momentum over rounds."""

    name = "fedavg-m-vr"
    tagline = "FedAvg-M with STORM variance reduction (2 gradients/step)"
    params = (VR_BETA_PARAM, ETA_G)
    variance_reduced = True
    reductions = NO_MOMENTUM_IS_FEDAVG


@register
class SCAFFOLDMomentumVR(MomentumFamily):
    """SCAFFOLD-M-VR: STORM-type momentum plus control variates."""

    name = "scaffold-m-vr"
    tagline = "SCAFFOLD-M with STORM variance reduction (2 gradients/step)"
    control_variates = True
    params = (VR_BETA_PARAM, ETA_G)
    variance_reduced = True
    reductions = NO_MOMENTUM_IS_SCAFFOLD
