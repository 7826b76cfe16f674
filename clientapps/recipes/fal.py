"""FAL client: adversarial training, PGD-l_inf inside every local step.

Li, Song, Yang, "Federated Adversarial Learning: A Framework with Convergence
Analysis", ICML 2023, https://arxiv.org/abs/2208.03635. Per mini-batch
``(x, y)`` (after every batch transform, ``run.batch``):

1. inner maximisation (:class:`AdversarialStep`): the first
   ``ceil(k-prop * B)`` examples get a PGD-l_inf copy: from ``x`` (plus, with
   ``random-start``, uniform noise in the ``rho``-ball), ``pgd-steps`` times
   ``x_adv <- Proj(x_adv + alpha sign(grad_x loss))``, the projection onto
   ``B_inf(x, rho)`` and the data's range; the model is in eval mode and no
   parameter gradient is accumulated;
2. outer step: the loop's closure on the adversarial batch, then the loop's
   default step (so ``before_step`` hooks still apply).

Config keys read: ``fal.rho``, ``fal.alpha``, ``fal.pgd-steps``,
``fal.k-prop``, ``fal.random-start``. No client state.

The valid input range is the local data's ``[min, max]`` (``[0, 1]`` for
pixel data scaled to it, as the bundled datasets are); the noise of the
random start is drawn from a generator derived from the loop's, so the
loop's own shuffle stream is untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from bouquet.clientapps.bounds import RATE_MAX, Bound
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun
from bouquet.tasks.wire import algorithm_key, derive_seed

NAMESPACE = "fal"
RHO = Bound(algorithm_key(NAMESPACE, "rho"), 0.0, 0.0, RATE_MAX)
ALPHA = Bound(algorithm_key(NAMESPACE, "alpha"), 0.0, 0.0, RATE_MAX)
PGD_STEPS = Bound(algorithm_key(NAMESPACE, "pgd-steps"), 5, 0, 1000)
K_PROP = Bound(algorithm_key(NAMESPACE, "k-prop"), 1.0, 0.0, 1.0)
RANDOM_START = Bound(algorithm_key(NAMESPACE, "random-start"), True)
BOUNDS = (RHO, ALPHA, PGD_STEPS, K_PROP, RANDOM_START)


class AdversarialStep(Hook):
    """The step on a PGD-l_inf adversarial batch (see the module docstring).

    ``rho = 0``, ``pgd-steps = 0`` or ``k-prop = 0`` is the plain step.
    """

    def __init__(
        self,
        rho: float,
        alpha: float,
        steps: int,
        k_prop: float = 1.0,
        random_start: bool = True,
    ) -> None:
        self.rho, self.alpha, self.steps = float(rho), float(alpha), int(steps)
        self.k_prop, self.random_start = float(k_prop), bool(random_start)
        self._range = (0.0, 1.0)
        self._noise: torch.Generator | None = None

    @property
    def active(self) -> bool:
        return self.rho > 0 and self.steps > 0 and self.k_prop > 0

    def setup(self, run: LocalRun) -> None:
        x = run.data[0]
        self._range = (float(x.min()), float(x.max()))
        seed = derive_seed(run.generator.initial_seed(), NAMESPACE)
        self._noise = torch.Generator().manual_seed(seed)

    def perturb(self, run: LocalRun, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` with its first ``ceil(k-prop * B)`` rows replaced by PGD copies."""
        count = min(len(x), math.ceil(self.k_prop * len(x)))
        clean = x[:count].detach()
        low, high = clean - self.rho, clean + self.rho
        adv = clean.clone()
        if self.random_start:
            noise = torch.rand(adv.shape, generator=self._noise, dtype=adv.dtype)
            adv = adv + (2 * noise.to(adv.device) - 1) * self.rho
        adv = torch.clamp(adv, *self._range)
        training = run.model.training
        run.model.eval()
        try:
            for _ in range(self.steps):
                adv.requires_grad_(True)
                loss = run.loss_fn(run.model(adv), y[:count], run)
                (grad,) = torch.autograd.grad(loss, adv)
                with torch.no_grad():
                    adv = adv + self.alpha * grad.sign()
                    adv = torch.clamp(
                        torch.minimum(torch.maximum(adv, low), high), *self._range
                    )
        finally:
            run.model.train(training)
        return torch.cat([adv.detach(), x[count:]])

    def step(
        self,
        run: LocalRun,
        closure: Callable[..., torch.Tensor],
        default_step: Callable[[], None],
    ) -> torch.Tensor | None:
        if not self.active or run.batch is None:
            return None
        x, y = run.batch
        loss = closure(self.perturb(run, x, y), y)
        default_step()
        return loss


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """The adversarial step."""
    return [
        AdversarialStep(
            RHO.read(config),
            ALPHA.read(config),
            PGD_STEPS.read(config),
            K_PROP.read(config),
            RANDOM_START.read(config),
        )
    ]
