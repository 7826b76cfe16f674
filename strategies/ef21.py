"""EF21: error feedback with a compressed uplink (Top-k by default).

Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better,
and Practically Faster Error Feedback", NeurIPS 2021,
https://arxiv.org/abs/2106.05203; restated and re-analysed (stepsizes from the
arithmetic mean of the smoothness constants) in Richtarik, Gasanov,
Burlachenko, "Error Feedback Reloaded: From Quadratic to Arithmetic Mean of
Smoothness Constants", ICLR 2024, https://arxiv.org/abs/2402.10774.

- **Client** (recipe ``ef21``): from the global ``x^t``, the loop's local
  training gives ``y_i``; its update ``v_i = y_i - x^t`` (with one
  full-batch SGD step, ``-lr grad f_i(x^t)`` exactly) is what EF21 tracks.
  It sends ``c_i = C(v_i - g_i)`` compressed and keeps ``g_i <- g_i + c_i``
  in ``Context.state``.
- **Server**: ``g <- g + (1/N) sum_i c_i`` (so ``g`` is the mean of the
  ``g_i``), then ``x^{t+1} = x^t + eta_g g``. The paper's stepsize is
  ``gamma = lr * eta_g``.

One Flower round is one EF21 iteration with the server's step moved after the
clients' (the paper's ``x^{t+1} = x^t - gamma g^t`` then ``c_i = C(grad
f_i(x^{t+1}) - g_i^t)``): starting from ``g_i = 0``, round 1 sends
``C(grad f_i(x^0))``, the paper's second initialisation.

With the identity compressor, ``g`` is the mean of the ``v_i`` and the update
is ``x + eta_g mean_i (y_i - x)``: FedAvg with uniform weights at ``eta_g = 1``
(the declared reduction), gradient descent with step ``lr eta_g`` when
clients take one full-batch step.

Wire protocol: the server sends ``arrays`` (``x^t``, dense) and ``config``
with ``ef21.compressor``, ``ef21.k``, ``ef21.levels``; a reply's ``arrays``
record is the compressor's payload (:mod:`tasks.compression`: Top-k sends
``indices`` int32 and ``values`` float32 of length k), checked against the
payload's declared shapes and dtypes, then decoded once (indices in range
and increasing, codes within their levels) before aggregation. State: the
server keeps ``g`` (model-sized, float64, the combine piece's state); each
client keeps ``g_i`` (``ef21.g``, one flat float64 vector).

Decisions where the spec was open:

- Clients train with the shared loop and track their update ``y_i - x``
  (``-lr`` times the gradient), not a separately computed gradient: one
  full-batch local step (``local-steps = 1``, ``batch-size`` at least the
  local set, no momentum) is the paper's EF21 with deterministic gradients,
  a mini-batch step is EF21-SGD, several steps are a local-steps variant.
- ``C`` acts on the concatenation of every float state-dict entry (in
  state-dict order; BatchNorm statistics included, as FedAvg averages them);
  integer entries are not sent and keep the server's value. Personal entries
  never leave the node.
- Compressors that are unbiased but not contractive (Rand-k, QSGD) are used
  as ``C / (omega + 1)``, which is contractive with ``alpha = 1/(omega+1)``.
- The mean is over the connected population N (the paper's ``1/n``): nodes
  not sampled keep their ``g_i`` and their share of ``g`` (EF21-PP). A reply
  dropped by validation leaves its node's ``g_i`` advanced but not ``g``
  (the server cannot know); with no drops ``g = mean_i g_i`` exactly.
- The paper's ``gamma`` is split as ``lr * eta-g`` (``eta-g`` defaults to 1,
  FedAvg's server step), so the identity reduction holds at any ``lr``. The
  theory stepsize needs smoothness constants that a neural network does not
  have. ``k`` defaults to the paper's Top-1.
- EF21-W (weights ``w_i`` proportional to ``L_i``) is :class:`EF21W` below.

EF21-W (``ef21-w``; Richtarik, Gasanov, Burlachenko, ICLR 2024,
https://arxiv.org/abs/2402.10774, as the pack's spec states it): with
``w_i = L_i / sum_j L_j`` each client tracks its scaled gradient,
``c_i = C(grad f_i / (n w_i) - g_i)``, and the server's estimate is
``g = sum_i w_i g_i``. This is EF21 run on the functions
``f_i / (n w_i)``, whose weighted sum is ``f`` and whose smoothness
constants are all ``L_i / (n w_i) = L_AM``: the quadratic mean of equal
constants is their arithmetic mean (the paper's cloning argument); with the
identity compressor ``g = (1/n) sum_i grad f_i``. The stored material did
not include the paper's algorithm box; the rule is the spec's, checked
against these two identities. Decisions:

- **Scaling by ``1/L_i`` instead of ``1/(n w_i)``.** The paper's client needs
  ``n w_i = L_i / L_AM`` and so the whole population's mean ``L_AM``, which a
  client does not know (and which a sampled, growing population changes).
  Every compressor of :mod:`tasks.compression` is positively homogeneous
  (``C(a x) = a C(x)`` for ``a > 0`` with the same random draws: Top-k
  keeps the same indices, Rand-k, sign, QSGD and quantize scale their
  float32 scale), so the client tracks ``h_i = g_i / L_AM`` instead:
  ``c'_i = C(v_i / L_i - h_i)``, ``h_i <- h_i + c'_i``, and the server adds
  ``(1/N) sum_i L_i c'_i`` to ``g``. Then ``g = (1/N) sum_i L_i h_i =
  sum_i w_i g_i``, the paper's ``g`` exactly (up to rounding), with no
  ``L_AM`` anywhere and EF21-PP's rule for nodes not sampled (they keep
  their share ``L_i h_i / N``).
- **Where ``L_i`` comes from.** The spec's setting (logistic regression with
  heterogeneous smoothness) gives it from the client's data:
  ``L_i = lambda_max(A_i^T A_i) / (4 m_i) + weight-decay`` with ``A_i`` the
  client's flattened inputs and a column of ones (the bias), ``m_i`` its
  examples (``smoothness = "logistic"``). The client computes it once, from
  its whole local set, keeps it in ``Context.state`` (``ef21.L``) and reports
  it in every reply as the metric ``ef21.smoothness`` (declared, range
  ``[1e-8, 1e12]``); the server scales that reply's ``c'_i`` by the value the
  client scaled with, so the two halves can never disagree, and no
  profiling round is needed. The ``1/4`` is the binary logistic bound; for a
  K-class softmax it is ``1/2``, a common factor that cancels in ``w_i``
  when weight decay is 0 (with weight decay, the weights then lean slightly
  towards uniform). For a network that is not linear it is a proxy (the
  bound of a linear model on the same inputs), as the spec flags.
- The server trusts the reported ``L_i`` within its declared range: a node
  can only rescale its own ``c'_i``, which it could do through ``c'_i``
  anyway (EF21 is not a robust aggregator).
- ``smoothness = "uniform"`` sets every ``L_i = 1``: EF21-W is then EF21
  bit for bit (the declared reduction).
- **Same iterates as EF21 at the same stepsize.** Positive homogeneity also
  means that, with ``G_i = n w_i g_i`` (here ``L_i h_i``), EF21-W's client
  rule is EF21's (``G_i <- G_i + C(grad f_i - G_i)``) and its server's ``g``
  is ``(1/n) sum_i G_i``, whatever the ``L_i``: with the compressors of this
  pack EF21-W gives EF21's iterates up to float rounding (tested in-process;
  measured in :mod:`simulations.ef21w_logreg`). What it brings is the
  analysis, the stepsize ``1 / (L + L_AM sqrt(beta / theta))`` instead of
  ``L_QM``, which the paper then proves for EF21 itself; the implementation
  is kept as the spec asks (a client-side ``C`` that is not homogeneous
  would make the two differ).
- The stepsize stays the user's ``lr * eta-g``; the paper's theory stepsize
  ``1 / (L + L_AM sqrt(beta / theta))`` is not computed (the server only
  learns the ``L_i`` of the nodes that replied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from bouquet.strategies import pieces
from bouquet.strategies.base import BouquetStrategy, Reduction
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.pieces import Replies, State, Updated
from bouquet.strategies.registry import register
from bouquet.tasks import compression
from bouquet.tasks.params import Param


@dataclass(frozen=True)
class ErrorFeedbackMean(pieces.Combine):
    """``g <- g + (1/N) sum_i c_i``; ``Delta = eta_g g``. State: ``g``.

    The replies' arrays are the decoded ``c_i`` (float64, the compressed
    entries only); the weights are not used: every node counts ``1/N``.
    """

    eta_g: float = 1.0
    scale_metric: str | None = None
    """EF21-W: each ``c_i`` is multiplied by its reply's metric of this name
    (``L_i``) before the sum; None: EF21, every ``c_i`` counts once."""

    def update(
        self, replies: Replies, weights: np.ndarray, state: State, ctx: RoundContext
    ) -> Updated:
        n = max(ctx.population, len(replies))
        g = dict(state or {})
        delta = {}
        for key in compression.compressed_keys(ctx.arrays, ctx.personal):
            total = np.zeros(ctx.arrays[key].shape)
            for reply in replies:
                c = reply.arrays[key]
                if self.scale_metric is not None:
                    c = float(reply.metrics[self.scale_metric]) * c
                total = total + c
            g[key] = g.get(key, np.zeros(total.shape)) + total / n
            delta[key] = self.eta_g * g[key]
        return delta, g


@register
class EF21(BouquetStrategy):
    """EF21's server (see the module docstring)."""

    name = "ef21"
    routine = "ef21"
    paper = "Richtarik et al., NeurIPS 2021, https://arxiv.org/abs/2106.05203"
    tagline = "Error feedback: clients send C(update - g_i) compressed (Top-k)"
    family = "compression"
    params = (
        Param(
            "compressor",
            "topk",
            choices=compression.NAMES,
            help="contractive compressor C (unbiased ones scaled by 1/(omega+1))",
            send="ef21.compressor",
        ),
        Param(
            "k", 1, ">= 1", "coordinates kept by topk / randk (paper: 1)", send="ef21.k"
        ),
        Param(
            "levels", 16, "[1, 127]", "levels s of qsgd / quantize", send="ef21.levels"
        ),
        Param("eta-g", 1.0, "> 0", "server step on g (paper gamma = lr * eta-g)"),
    )
    reductions = (
        Reduction({"compressor": "identity"}, "fedavg", {"weighting": "uniform"}),
    )

    scale_metric: ClassVar[str | None] = None
    """The reply metric each ``c_i`` is scaled by (EF21-W's ``L_i``)."""

    def make_aggregator(self) -> pieces.Aggregator:
        """Uniform weights (unused), the error-feedback mean, a unit step."""
        return pieces.Aggregator(
            pieces.Uniform(),
            ErrorFeedbackMean(self.eta_g, self.scale_metric),
            pieces.ServerSGD(),
        )

    @property
    def codec(self) -> compression.Compressor:
        """The compressor clients encode with (the same call as the recipe's)."""
        made = compression.make_compressor(self.compressor, self.k, self.levels)
        return compression.contractive(made)

    def reply_codec(self, ctx: RoundContext) -> compression.Compressor:
        """Train replies are always the compressed ``c_i``."""
        return self.codec

    def decoded(self, flat: np.ndarray, ctx: RoundContext) -> NDArrays:
        """``c_i`` itself, shaped as the compressed entries (not a model)."""
        keys = compression.compressed_keys(ctx.arrays, ctx.personal)
        return compression.unflatten(flat, ctx.arrays, keys)


SMOOTHNESS = "ef21.smoothness"
"""Config key (the client's ``L_i`` rule) and reply metric (its ``L_i``)."""


@register
class EF21W(EF21):
    """EF21-W's server: EF21 with each ``c_i`` weighted by its ``L_i``.

    Richtarik, Gasanov, Burlachenko, ICLR 2024 (see the module docstring).
    """

    name = "ef21-w"
    paper = (
        "Richtarik, Gasanov, Burlachenko, ICLR 2024, https://arxiv.org/abs/2402.10774"
    )
    tagline = "Weighted EF21: clients scale by 1/L_i, the server sums L_i c_i / N"
    params = (
        *EF21.params,
        Param(
            "smoothness",
            "logistic",
            choices=("logistic", "uniform"),
            help="client L_i: logistic bound from its data, or 1 (EF21)",
            send=SMOOTHNESS,
        ),
    )
    reductions = (Reduction({"smoothness": "uniform"}, "ef21"),)
    reply_metrics = (SMOOTHNESS,)
    reply_metric_ranges: ClassVar[dict] = {SMOOTHNESS: "[1e-8, 1e12]"}
    scale_metric = SMOOTHNESS
