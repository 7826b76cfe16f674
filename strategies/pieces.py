"""Aggregation that composes: weighting, combine rule, server optimizer.

A synchronous round turns the accepted replies into new global arrays in
three steps, each a small piece in the spirit of optax's ``(init, update)``
transforms (``docs/architecture.md``, "Aggregation"):

1. a :class:`Weighting` gives each reply its coefficient ``w_i``
   (by examples, uniform, FedAU's participation estimates, staleness, ...);
2. a :class:`Combine` rule turns replies and weights into one update
   ``Delta`` relative to the arrays sent (weighted mean, median, Krum,
   FedLD's principal directions, ...), in float64;
3. a :class:`ServerOptimizer` applies ``Delta`` to the global arrays
   (step size, momentum, Adam / Yogi / Adagrad).

A piece holds only its hyperparameters; its state is a value that ``init``
creates and ``update`` returns anew (plain data: numbers, strings, NumPy
arrays, dicts and lists of these), so the strategy can checkpoint it and a
resumed run continues bit for bit. :class:`Aggregator` chains the three; FedAvg,
FedAvgM and FedAdam are one chain with three server optimizers.

Pieces never read a strategy's attributes: what they need of the round comes
in the :class:`~strategies.context.RoundContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bouquet.strategies.aggregation import (
    NDArrays,
    cast_like,
    coordinate_median,
    pairwise_sq_distances,
    weighted_sum,
)
from bouquet.strategies.context import RoundContext
from bouquet.strategies.validation import ClientReply

State = Any
"""A piece's state: plain data (see the module docstring); None when stateless."""

Replies = Sequence[ClientReply]
"""Accepted replies, in deterministic order."""

Updated = tuple[NDArrays, State]
"""What a combine rule or a server optimizer returns: arrays and its new state."""


# ---------------------------------------------------------------- weighting --
class Weighting:
    """The coefficient ``w_i`` of each accepted reply (stateless by default)."""

    def init(self) -> State:
        """The state before the first round."""
        return None

    def update(
        self, replies: Replies, state: State, ctx: RoundContext
    ) -> tuple[np.ndarray, State]:
        """``(w, new state)``, ``w`` aligned with ``replies``."""
        raise NotImplementedError


class ByExamples(Weighting):
    """``w_i = n_i / sum_j n_j`` (FedAvg's weighting)."""

    def update(
        self, replies: Replies, state: State, ctx: RoundContext
    ) -> tuple[np.ndarray, State]:
        n = np.array([r.num_examples for r in replies], dtype=np.float64)
        return n / n.sum(), state


class Uniform(Weighting):
    """``w_i = 1 / m`` over the ``m`` replies."""

    def update(
        self, replies: Replies, state: State, ctx: RoundContext
    ) -> tuple[np.ndarray, State]:
        return np.full(len(replies), 1.0 / len(replies)), state


@dataclass(frozen=True)
class RuleWeights(Weighting):
    """Weights computed by a strategy's own rule (``rule(replies, ctx)``).

    For rules whose state is the strategy's (asynchronous algorithms keep
    durations and inclusion counts with their schedule).
    """

    rule: Callable[[Sequence[ClientReply], RoundContext], Sequence[float]]

    def update(
        self, replies: Replies, state: State, ctx: RoundContext
    ) -> tuple[np.ndarray, State]:
        return np.asarray(self.rule(replies, ctx), dtype=np.float64), state


# ------------------------------------------------------------------ combine --
class Combine:
    """The update ``Delta`` (float64) from the replies and their weights."""

    def init(self) -> State:
        """The state before the first round."""
        return None

    def update(
        self, replies: Replies, weights: np.ndarray, state: State, ctx: RoundContext
    ) -> Updated:
        """``(Delta, new state)``; ``Delta``'s keys are a subset of ``ctx.arrays``."""
        raise NotImplementedError


def _reference(of: str, ctx: RoundContext) -> Mapping[str, np.ndarray] | None:
    if of not in ("models", "updates"):
        raise ValueError(f"Replies are 'models' or 'updates'; got {of!r}.")
    return ctx.arrays if of == "models" else None


@dataclass(frozen=True)
class WeightedMean(Combine):
    """``Delta = sum_i w_i (y_i - x)``: the weighted mean update.

    For update replies (``of="updates"``: deltas or gradients) it is
    ``sum_i w_i Delta_i``. ``accumulate="float64"`` (default) sums one layer
    at a time in float64 (:func:`~strategies.aggregation.weighted_sum`);
    ``"wire"`` sums the model replies in their own dtype, in reply order, as
    Flower's ``aggregate_arrayrecords`` does, so that the baselines Flower
    ships (FedAvg, FedProx, FedAvgM, FedAdam) give Flower's arrays bit for bit.
    """

    of: str = "models"
    accumulate: str = "float64"

    def update(
        self, replies: Replies, weights: np.ndarray, state: State, ctx: RoundContext
    ) -> Updated:
        reference = _reference(self.of, ctx)
        keys = ctx.shared
        if self.accumulate == "wire" and reference is not None:
            return {
                k: np.subtract(
                    _wire_mean(replies, weights, k), reference[k], dtype=np.float64
                )
                for k in keys
            }, state
        arrays = [{k: r.arrays[k] for k in keys} for r in replies]
        if reference is not None:
            reference = {k: reference[k] for k in keys}
        return weighted_sum(arrays, weights, reference), state


def _wire_mean(
    replies: Sequence[ClientReply], weights: np.ndarray, key: str
) -> np.ndarray:
    """``sum_i w_i y_i`` summed in the replies' dtype, in reply order.

    A Python float weight stays weak (NEP 50): float32 replies are summed in
    float32, as Flower does.
    """
    total = None
    for reply, weight in zip(replies, weights, strict=True):
        term = reply.arrays[key] * float(weight)
        if total is None:
            total = term
        else:
            total += term
    return np.asarray(total)


@dataclass(frozen=True)
class CoordinateMedian(Combine):
    """Coordinate-wise median of the replies (weights are not used).

    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018. Taken over the models; ``Delta`` is the
    median minus the arrays sent.
    """

    of: str = "models"

    def update(
        self, replies: Replies, weights: np.ndarray, state: State, ctx: RoundContext
    ) -> Updated:
        reference = _reference(self.of, ctx)
        delta: NDArrays = {}
        for key in ctx.shared:
            median = np.asarray(coordinate_median([r.arrays[key] for r in replies]))
            if reference is None:
                delta[key] = median.astype(np.float64)
            else:
                delta[key] = np.subtract(median, reference[key], dtype=np.float64)
        return delta, state


def krum_select(
    distances: np.ndarray, num_malicious: int, num_select: int
) -> list[int]:
    """Indices of the ``num_select`` replies with the lowest Krum score.

    Score of reply i (Blanchard et al., NeurIPS 2017): the sum of its squared
    distances to its ``n - f - 2`` nearest other replies (at least 1).
    """
    n = len(distances)
    nearest = max(1, n - num_malicious - 2)
    scores = [
        float(np.sort(np.delete(distances[i], i))[:nearest].sum()) for i in range(n)
    ]
    return [int(i) for i in np.argsort(scores, kind="stable")[:num_select]]


@dataclass(frozen=True)
class KrumMean(Combine):
    """Krum's choice among the replies, then their weighted mean.

    Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS 2017 (``num_select = 1``: Krum; more: Multi-Krum,
    El Mhamdi et al. 2018). The weights of the chosen replies are renormalised.
    Pairwise distances are accumulated block by block
    (:func:`~strategies.aggregation.pairwise_sq_distances`), never as an
    ``m x d`` float64 stack.
    """

    num_malicious: int = 0
    num_select: int = 1
    of: str = "models"

    def update(
        self, replies: Replies, weights: np.ndarray, state: State, ctx: RoundContext
    ) -> Updated:
        distances = pairwise_sq_distances([r.arrays for r in replies])
        chosen = krum_select(distances, self.num_malicious, self.num_select)
        w = np.asarray(weights, dtype=np.float64)[chosen]
        return WeightedMean(self.of).update(
            [replies[i] for i in chosen], w / w.sum(), state, ctx
        )


# ---------------------------------------------------------------- optimizer --
class ServerOptimizer:
    """Applies ``Delta`` to the global arrays ``x``."""

    def init(self) -> State:
        """The state before the first round."""
        return None

    def update(self, delta: NDArrays, state: State, ctx: RoundContext) -> Updated:
        """``(new arrays, new state)``: every entry of ``ctx.arrays``, its dtype."""
        raise NotImplementedError


PRECISIONS = ("float64", "wire")


def in_precision(
    precision: str, ctx: RoundContext, delta: NDArrays
) -> dict[str, np.ndarray]:
    """The ``Delta`` a server optimizer steps with.

    As it is (``"float64"``), or ``mean - x`` in each array's own dtype
    (``"wire"``), as Flower's server optimizers compute it: the mean is the
    float64 ``x + Delta`` rounded to the dtype it was summed in (float arrays
    keep theirs; integer buffers were summed in float64), so after a
    ``"wire"`` mean the result is Flower's bit for bit.
    """
    if precision == "float64":
        return delta
    if precision != "wire":
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    out = {}
    for k, d in delta.items():
        x = ctx.arrays[k]
        summed = x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)
        out[k] = (x.astype(np.float64) + d).astype(summed) - x
    return out


def apply_step(
    ctx: RoundContext, step: Mapping[str, np.ndarray], scale: float = 1.0
) -> NDArrays:
    """``x + scale * step`` in float64, cast back to each entry's dtype.

    One layer at a time (no model-sized scaled copy). Entries without a step
    (personal parameters) keep their value.
    """
    out = {}
    for k, x in ctx.arrays.items():
        if k not in step:
            out[k] = x
            continue
        scaled = step[k] if scale == 1.0 else scale * step[k]
        out[k] = cast_like(np.add(x, scaled, dtype=np.float64), x)
    return out


@dataclass(frozen=True)
class ServerSGD(ServerOptimizer):
    """``x + lr * Delta``, with heavy-ball momentum on ``-Delta`` when > 0.

    With momentum (Hsu et al., "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", 2019, FedAvgM):
    ``v = mu v + (x - mean)`` (``v`` = the first pseudo-gradient in round 1),
    ``x <- x - lr v``, as Flower's FedAvgM. ``precision``: see
    :func:`in_precision`.
    """

    lr: float = 1.0
    momentum: float = 0.0
    precision: str = "float64"

    def update(self, delta: NDArrays, state: State, ctx: RoundContext) -> Updated:
        delta = in_precision(self.precision, ctx, delta)
        if self.momentum <= 0.0:
            return apply_step(ctx, delta, self.lr), state
        pseudo = {k: -d for k, d in delta.items()}
        velocity = (
            pseudo
            if not state
            else {k: self.momentum * state[k] + g for k, g in pseudo.items()}
        )
        return apply_step(ctx, velocity, -self.lr), velocity


@dataclass(frozen=True)
class _Adaptive(ServerOptimizer):
    """Shared part of FedAdagrad / FedAdam / FedYogi.

    Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
    https://arxiv.org/abs/2003.00295: ``m = beta_1 m + (1 - beta_1) Delta``, a
    second moment ``v`` (the subclass's rule) and
    ``x <- x + eta_t m / (sqrt(v) + tau)``. ``precision``: see
    :func:`in_precision`.
    """

    eta: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    precision: str = "float64"

    def init(self) -> State:
        return {"m": {}, "v": {}}

    def second_moment(self, v: np.ndarray | None, d: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step_size(self, server_round: int) -> float:
        return self.eta

    def update(self, delta: NDArrays, state: State, ctx: RoundContext) -> Updated:
        delta = in_precision(self.precision, ctx, delta)
        m_old, v_old = state["m"], state["v"]
        m = {
            k: self.beta_1 * m_old.get(k, 0.0) + (1.0 - self.beta_1) * d
            for k, d in delta.items()
        }
        v = {k: self.second_moment(v_old.get(k), d) for k, d in delta.items()}
        eta = self.step_size(ctx.server_round)
        step = {k: eta * m[k] / (np.sqrt(v[k]) + self.tau) for k in delta}
        return apply_step(ctx, step), {"m": m, "v": v}


@dataclass(frozen=True)
class ServerAdagrad(_Adaptive):
    """``v = v + Delta^2`` (FedAdagrad)."""

    def second_moment(self, v: np.ndarray | None, d: np.ndarray) -> np.ndarray:
        return (0.0 if v is None else v) + d**2


@dataclass(frozen=True)
class ServerAdam(_Adaptive):
    """``v = beta_2 v + (1 - beta_2) Delta^2`` (FedAdam).

    The step size is bias-corrected as Flower's FedAdam does it:
    ``eta sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))`` in round ``t`` (the
    paper's Algorithm 2 has no correction; Flower's strategy is the baseline
    this package's ``fedadam`` reproduces).
    """

    def second_moment(self, v: np.ndarray | None, d: np.ndarray) -> np.ndarray:
        return self.beta_2 * (0.0 if v is None else v) + (1.0 - self.beta_2) * d**2

    def step_size(self, server_round: int) -> float:
        t = server_round + 1.0
        # A NumPy scalar, as Flower's: it makes the step float64 (NEP 50).
        return (
            self.eta
            * np.sqrt(1 - np.power(self.beta_2, t))
            / (1 - np.power(self.beta_1, t))
        )


@dataclass(frozen=True)
class ServerYogi(_Adaptive):
    """``v = v - (1 - beta_2) Delta^2 sign(v - Delta^2)`` (FedYogi)."""

    def second_moment(self, v: np.ndarray | None, d: np.ndarray) -> np.ndarray:
        v = np.zeros_like(d) if v is None else v
        return v - (1.0 - self.beta_2) * d**2 * np.sign(v - d**2)


# -------------------------------------------------------------------- chain --
@dataclass(frozen=True)
class Aggregator:
    """The chain: weighting, then combine, then the server optimizer.

    Its state is ``{"weighting": ..., "combine": ..., "optimizer": ...}``.
    """

    weighting: Weighting
    combine: Combine
    optimizer: ServerOptimizer

    def init(self) -> dict[str, State]:
        """Every piece's initial state."""
        return {
            "weighting": self.weighting.init(),
            "combine": self.combine.init(),
            "optimizer": self.optimizer.init(),
        }

    def update(
        self,
        replies: Sequence[ClientReply],
        state: Mapping[str, State],
        ctx: RoundContext,
    ) -> tuple[NDArrays, dict[str, State]]:
        """New global arrays (each entry in its sent dtype) and the new state."""
        weights, w_state = self.weighting.update(replies, state["weighting"], ctx)
        delta, c_state = self.combine.update(replies, weights, state["combine"], ctx)
        arrays, o_state = self.optimizer.update(delta, state["optimizer"], ctx)
        return arrays, {"weighting": w_state, "combine": c_state, "optimizer": o_state}
