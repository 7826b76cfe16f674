"""DP-SGD on the client: example-level differential privacy for any algorithm.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
https://arxiv.org/abs/1607.00133; the accountant is Google's ``dp-accounting``
(Mironov, "Renyi Differential Privacy", CSF 2017; Mironov, Talwar, Zhang,
"Renyi Differential Privacy of the Sampled Gaussian Mechanism", 2019) through
Flower's ``RdpAccountant``.

Each client privatises its own training, so the guarantee does not rest on
the server: every local step of the one loop (:mod:`clientapps.loop`) is

1. a **Poisson-sampled batch**: every local example joins with probability
   ``q = B / n`` (``B`` the ``batch-size``, ``n`` the node's examples), and
   an epoch is ``round(n / B)`` such batches;
2. **per-example gradients** of the loop's loss (the algorithm's terms
   included), each clipped to L2 norm ``C``;
3. their sum plus ``N(0, (sigma C)^2 I)``, divided by ``B``, as the gradient
   the optimizer (and every ``before_step`` hook: SCAFFOLD's correction, ...)
   then uses.

Everything the reply carries is computed from the noisy steps and the
server's messages, so it is post-processing: the model or update, a
compressed update with its error feedback, SCAFFOLD's control variates.
The node's accountant composes one Poisson-subsampled Gaussian event
(``q``, ``sigma``; add-or-remove-one neighbours, sensitivity ``C``) per step
it took, keeps them in ``Context.state`` and reports the epsilon spent so far
at ``delta`` (metric ``dp-sgd.epsilon``; the server's round metric is the
largest over the replies).

Config keys (:mod:`strategies.privacy`'s ``private_training`` sends them;
the run-config keys are ``dp-sgd-*``):

- ``dp-sgd.noise-multiplier`` ``sigma`` (> 0 turns DP-SGD on), or
- ``dp-sgd.epsilon`` > 0: the budget. The node calibrates ``sigma`` once,
  so that ``num-server-rounds`` rounds of its local steps spend it (the
  bound assumes it trains every round), and refuses to train once another
  round would exceed it (its reply is an error; the run goes on without it).
- ``dp-sgd.delta`` (default ``1e-5``), ``dp-sgd.clip`` ``C`` (default 1).

Decisions:

- **Example-level, on the client.** Clipping and noising the whole update
  (client-level local DP) would need noise of norm ``~ sigma C sqrt(d)`` per
  client and learns nothing at a useful epsilon on our models; DP-SGD is what
  clients run when they do not trust the server (Flower's Opacus example).
- **Poisson sampling, not shuffled epochs**, because that is the mechanism the
  accountant analyses; an empty batch still takes its noise-only step.
- **Per-example gradients** (:mod:`clientapps.per_example`): for models of
  Linear and Conv layers whose loss terms read the parameters only through
  the logits, one backward pass with the layers' inputs and output
  gradients kept (weight gradients as factors, never materialised; the
  loss vmapped over examples); otherwise micro-batches of one through the
  loop's own closure, exact for any model and any term (FedProx's proximal
  term reads the parameters directly). Both give the same step, tested.
  A term that couples the examples of a batch (FedLD's margin
  ``log(1 + ||softmax(Z)||_F^2)``) becomes its one-example version:
  per-example clipping needs a loss that is a sum over examples.
- **Integer RDP orders 2..128** (closed form, fast): the epsilon is a valid
  upper bound, at most a few percent above the one over fractional orders.
- **Refused** (a ``ConfigError`` before training): models with batch
  statistics (BatchNorm mixes the examples of a batch and its running
  statistics are released unprotected; use ``model-norm='group'`` or
  ``'none'``); routines whose hooks read the local data outside the noisy
  steps (a selection or scoring phase, a data-dependent example order, a
  step of their own: DIFF2, SFPrompt's pruning, FedSpeed's SAM step, FAL,
  the curriculum). The hook runs first and seals ``run.data``, so a hook
  that reads the data anywhere else (a statistic such as EF21-W's
  smoothness, FedLoGe's class counts, FedD2S's representations) fails the
  call with the reason instead of releasing it unprotected.
- **What is not privatized**: the reply's ``num-examples`` (FedAvg's weight;
  the node's sampling rate depends on it too) and evaluation replies, as in
  Flower's and Opacus' examples. Train losses are computed on the local data
  outside the accounting, so a private node does not report them.
- Noise comes from the operating system's entropy (noise a known seed
  reproduces protects nothing).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from torch import nn
from torch.func import vmap

from bouquet.clientapps import bounds
from bouquet.clientapps.bounds import NORM_MAX, RATE_MAX, Bound, ConfigError
from bouquet.clientapps.hooks import Hook, parameter_names
from bouquet.clientapps.loop import LocalRun, TrainSettings
from bouquet.clientapps.per_example import (
    ExampleLoss,
    clipped_sum,
    layered,
    per_example_terms,
)
from bouquet.clientapps.state import load_values, save_values
from bouquet.tasks import wire

NOISE_MULTIPLIER = Bound(wire.DP_SGD_NOISE_MULTIPLIER, 0.0, 0.0, RATE_MAX)
EPSILON = Bound(wire.DP_SGD_EPSILON, 0.0, 0.0, 1e6)
DELTA = Bound(wire.DP_SGD_DELTA, 1e-5, 0.0, 1.0, low_open=True, high_open=True)
CLIP = Bound(wire.DP_SGD_CLIP, 1.0, 0.0, NORM_MAX, low_open=True)
BOUNDS = (NOISE_MULTIPLIER, EPSILON, DELTA, CLIP)

NAMESPACE = "bouquet.dp-sgd"
ORDERS = tuple(float(o) for o in (*range(2, 65), 80, 96, 128))
"""RDP orders of the accountant (integers: closed form)."""

_DATA_HOOK_METHODS = ("before_training", "order", "epoch_batches", "step")
"""Hook methods that read local data outside the noisy steps (or take them)."""


def enabled(config: Mapping[str, Any]) -> bool:
    """Whether the message asks for DP-SGD."""
    return NOISE_MULTIPLIER.read(config) > 0 or EPSILON.read(config) > 0


def epsilon_spent(
    events: Sequence[tuple[float, float, int]], delta: float, population: int
) -> float:
    """Epsilon at ``delta`` of ``(sigma, q, steps)`` Poisson-subsampled Gaussians."""
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON,
        ),
        orders=ORDERS,
    )
    # Rounds with the same multiplier and rate are one composition (the RDP
    # of k identical steps is k times one step's): the cost stays flat as
    # rounds accumulate.
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in events:
        if steps > 0:
            merged[(sigma, q)] = merged.get((sigma, q), 0) + int(steps)
    for (sigma, q), steps in merged.items():
        if sigma <= 0:
            return math.inf  # a noiseless step protects nothing
        if steps > 0:
            sample = max(1, min(population, round(q * population)))
            accountant.compose(
                GaussianPrivacyEvent(sigma, sample, population), int(steps)
            )
    if accountant.num_releases == 0:
        return 0.0
    return float(accountant.get_privacy_spent().epsilon)


def calibrate(
    epsilon: float, delta: float, q: float, steps: int, population: int
) -> float:
    """The smallest ``sigma`` (to 0.1%) whose ``steps`` steps spend ``epsilon``."""
    if steps <= 0:
        raise ValueError("Calibration needs at least one step.")

    def spent(sigma: float) -> float:
        return epsilon_spent([(sigma, q, steps)], delta, population)

    low, high = 0.05, 1.0
    while spent(high) > epsilon:
        low, high = high, 2.0 * high
        if high > 1e4:
            raise ValueError(
                f"No noise multiplier up to 1e4 spends only epsilon={epsilon} "
                f"in {steps} steps at delta={delta}."
            )
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        if spent(mid) > epsilon:
            low = mid
        else:
            high = mid
    return high


def check_hooks(hooks: Sequence[Hook]) -> None:
    """Refuse hooks that read the local data outside DP-SGD's noisy steps."""
    for hook in hooks:
        if isinstance(hook, PrivateSteps):
            continue
        taken = [
            m
            for m in _DATA_HOOK_METHODS
            if getattr(type(hook), m) is not getattr(Hook, m)
        ]
        if taken:
            raise ConfigError(
                wire.DP_SGD_NOISE_MULTIPLIER,
                "on",
                f"a routine whose hooks do not read the local data outside the "
                f"noisy steps ({type(hook).__name__} overrides {', '.join(taken)})",
            )


def check_routine(routine: str) -> None:
    """Refuse, before any message is sent, a routine :func:`check_hooks` refuses."""
    from bouquet.clientapps.recipes import get_recipe

    try:
        check_hooks(get_recipe(routine)({}))
    except ConfigError as err:
        raise ConfigError(
            err.key, err.value, f"{err.allowed}; the routine is '{routine}'"
        ) from None


def check_model(model: nn.Module) -> None:
    """Refuse models whose layers mix the examples of a batch."""
    mixing = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    if mixing:
        raise ConfigError(
            wire.DP_SGD_NOISE_MULTIPLIER,
            "on",
            "a model without batch statistics (BatchNorm in "
            f"{mixing[:3]}; use model-norm='group' or 'none')",
        )


class PrivateSteps(Hook):
    """DP-SGD's steps and accounting (see the module doc).

    Parameters
    ----------
    clip : float
        ``C``, the per-example gradient norm bound.
    noise_multiplier : float
        ``sigma``; the noise's standard deviation is ``sigma C``.
    delta : float
        The delta epsilon is reported at.
    epsilon : float
        The node's budget (0: none); a round that would exceed it is refused.
    noise : callable, optional
        ``() -> torch.Generator`` for the noise (default: OS entropy). Tests
        pass a seeded one.
    loss_hooks : sequence of Hook
        The routine's hooks: those that add a loss term are part of each
        example's loss on the vectorised path (the one-by-one path runs the
        loop's own closure, which has them).

    """

    def __init__(
        self,
        clip: float,
        noise_multiplier: float,
        delta: float,
        epsilon: float = 0.0,
        noise: Callable[[], torch.Generator] | None = None,
        loss_hooks: Sequence[Hook] = (),
    ) -> None:
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.delta = float(delta)
        self.epsilon = float(epsilon)
        self._noise = noise or _os_generator
        self.loss_hooks = [h for h in loss_hooks if type(h).loss is not Hook.loss]
        self._fast: bool | None = None
        self.taken = 0

    def rate(self, run: LocalRun) -> float:
        """``q = B / n``, the chance that an example joins a step's batch."""
        return min(1.0, run.settings.batch_size / run.num_examples)

    def setup(self, run: LocalRun) -> None:
        check_model(run.model)
        # The loop keeps its own reference; a hook that reads the data outside
        # the noisy steps (a statistic, a score, soft labels) fails loudly.
        run.data = SealedData()  # type: ignore[assignment]
        self.generator = self._noise()
        self.taken = 0
        self._fast = None
        if self.epsilon > 0:
            planned = steps_per_call(run.num_examples, run.settings)
            spent = epsilon_spent(
                [
                    *self.events(run.state),
                    (self.noise_multiplier, self.rate(run), planned),
                ],
                self.delta,
                run.num_examples,
            )
            if spent > self.epsilon * (1 + 1e-9):
                raise ConfigError(
                    wire.DP_SGD_EPSILON,
                    self.epsilon,
                    f"a budget this round fits in (it would bring epsilon to "
                    f"{spent:.4g}; the node's budget is spent)",
                )

    def epoch_batches(self, run: LocalRun, num_examples: int) -> list[torch.Tensor]:
        q = self.rate(run)
        count = max(1, round(num_examples / run.settings.batch_size))
        # Sampled from the noise's generator, not the run's seed: amplification
        # by sampling assumes the server cannot tell who was sampled.
        draws = torch.rand((count, num_examples), generator=self.generator)
        return [torch.nonzero(row < q).flatten() for row in draws]

    def step(
        self,
        run: LocalRun,
        closure: Callable[..., torch.Tensor],
        default_step: Callable[[], None],
    ) -> torch.Tensor:
        x, y = run.batch if run.batch is not None else (None, None)
        params = run.parameters
        if x is None or len(x) == 0:  # an empty Poisson batch: noise only
            total, loss = [torch.zeros_like(p) for p in params], 0.0
        elif self._vectorised(run, x, y):
            try:
                total, loss = self._layer_sum(run, x, y)
            except RuntimeError:  # a loss term vmap cannot batch
                self._fast = False
                total, loss = self._one_by_one(run, x, y, closure)
        else:
            total, loss = self._one_by_one(run, x, y, closure)
        stdev = self.noise_multiplier * self.clip
        scale = 1.0 / run.settings.batch_size
        with torch.no_grad():
            for p, t in zip(params, total, strict=True):
                noise = torch.randn(
                    t.shape, generator=self.generator, dtype=t.dtype
                ).to(t.device)
                p.grad = (t + stdev * noise) * scale
        default_step()
        self.taken += 1
        return torch.tensor(loss)

    def _example_loss(self, run: LocalRun) -> ExampleLoss:
        """One example's loss as the loop computes it, the hooks' terms added."""

        def one(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = run.loss_fn(logits, y, run)
            for hook in self.loss_hooks:
                loss = hook.loss(run, loss, logits, x, y)
            return loss

        return one

    def _vectorised(self, run: LocalRun, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Whether the layer-factor path applies (decided on the first step).

        It needs a model of Linear/Conv layers and loss terms that depend on
        the parameters only through the logits (FedLD's margin; not
        FedProx's proximal term, which reads the parameters themselves).
        """
        if self._fast is None:
            self._fast = layered(run.model)
            if self._fast and self.loss_hooks:
                with torch.no_grad():
                    logits = run.model(x[:1])
                zero = torch.zeros(())
                for hook in self.loss_hooks:
                    term = hook.loss(run, zero, logits, x[:1], y[:1])
                    if isinstance(term, torch.Tensor) and term.requires_grad:
                        self._fast = False  # it reads the parameters directly
        return self._fast

    def _layer_sum(
        self, run: LocalRun, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[torch.Tensor], float]:
        names = parameter_names(run)
        current = {n: p.detach() for n, p in zip(names, run.parameters, strict=True)}
        one = self._example_loss(run)
        terms = per_example_terms(run, current, x, y, one)
        summed = clipped_sum(terms, None, self.clip)
        with torch.no_grad():
            losses = vmap(lambda lg, xi, yi: one(lg[None], xi[None], yi[None]))(
                run.model(x), x, y
            )
        return [summed[n] for n in names], float(losses.mean())

    def _one_by_one(
        self,
        run: LocalRun,
        x: torch.Tensor,
        y: torch.Tensor,
        closure: Callable[..., torch.Tensor],
    ) -> tuple[list[torch.Tensor], float]:
        params = run.parameters
        total = [torch.zeros_like(p) for p in params]
        losses = []
        for i in range(len(x)):
            losses.append(float(closure(x[i : i + 1], y[i : i + 1]).detach()))
            with torch.no_grad():
                grads = [
                    p.grad if p.grad is not None else torch.zeros_like(p)
                    for p in params
                ]
                norm = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g) for g in grads])
                )
                factor = min(1.0, self.clip / max(float(norm), 1e-30))
                for t, g in zip(total, grads, strict=True):
                    t.add_(g, alpha=factor)
        return total, sum(losses) / len(losses)

    def events(self, state: Mapping[str, Any]) -> list[tuple[float, float, int]]:
        """The node's earlier steps: ``(sigma, q, steps)`` per round."""
        saved = load_values(state, NAMESPACE, "events") or {}
        return list(
            zip(
                saved.get("sigma", []),
                saved.get("q", []),
                saved.get("steps", []),
                strict=True,
            )
        )

    def finish(self, run: LocalRun) -> None:
        events = self.events(run.state)
        events.append((self.noise_multiplier, self.rate(run), self.taken))
        _save_events(run.state, events)
        spent = epsilon_spent(events, self.delta, run.num_examples)
        if math.isfinite(spent):  # metrics must be finite (a noiseless test run)
            run.metrics[wire.DP_SGD_EPSILON_METRIC] = spent
        run.metrics[wire.DP_SGD_NOISE_METRIC] = self.noise_multiplier


class SealedData:
    """``run.data`` under DP-SGD: reading it outside the noisy steps is refused."""

    def _refuse(self, *_: object) -> None:
        raise ConfigError(
            wire.DP_SGD_NOISE_MULTIPLIER,
            "on",
            "a routine whose hooks read the local data only through the loop's "
            "noisy steps (one of them reads run.data, which DP-SGD cannot "
            "protect)",
        )

    __iter__ = __getitem__ = __len__ = _refuse


def steps_per_call(num_examples: int, settings: TrainSettings) -> int:
    """The steps one training call takes: epochs of ``round(n / B)`` batches."""
    per_epoch = max(1, round(num_examples / settings.batch_size))
    steps = settings.epochs * per_epoch
    if settings.max_steps:
        steps = min(steps, settings.max_steps)
    return steps


def private_hooks(
    config: Mapping[str, Any],
    state: MutableMapping[str, Any],
    num_examples: int,
    hooks: Sequence[Hook],
    settings: TrainSettings,
) -> list[Hook]:
    """The DP-SGD hook the message asks for (none when it does not).

    ``settings`` are the round's :class:`~clientapps.loop.TrainSettings`;
    with a budget (``dp-sgd.epsilon``) the noise multiplier is calibrated
    on the first call and kept in ``state``.
    """
    if not enabled(config):
        return []
    check_hooks(hooks)
    clip, delta = CLIP.read(config), DELTA.read(config)
    epsilon = EPSILON.read(config)
    sigma = NOISE_MULTIPLIER.read(config)
    if epsilon > 0:
        saved = load_values(state, NAMESPACE, "calibration") or {}
        if saved.get("epsilon") == epsilon and saved.get("delta") == delta:
            sigma = float(saved["sigma"])
        else:
            q = min(1.0, settings.batch_size / num_examples)
            steps = bounds.NUM_ROUNDS.read(config) * steps_per_call(
                num_examples, settings
            )
            sigma = calibrate(epsilon, delta, q, steps, num_examples)
            save_values(
                state,
                NAMESPACE,
                "calibration",
                {"epsilon": epsilon, "delta": delta, "sigma": sigma},
            )
    return [PrivateSteps(clip, sigma, delta, epsilon, loss_hooks=hooks)]


def _save_events(
    state: MutableMapping[str, Any], events: Sequence[tuple[float, float, int]]
) -> None:
    save_values(
        state,
        NAMESPACE,
        "events",
        {
            "sigma": [float(e[0]) for e in events],
            "q": [float(e[1]) for e in events],
            "steps": [int(e[2]) for e in events],
        },
        metrics=False,
    )


def _os_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


__all__ = [
    "BOUNDS",
    "PrivateSteps",
    "calibrate",
    "epsilon_spent",
    "private_hooks",
]
