"""FedAMD client: an anchor's full-batch gradient or a miner's SARAH steps.

Wu et al., "Anchor Sampling for Federated Learning with Partial Client
Participation", ICML 2023, https://arxiv.org/abs/2206.05891. The role arrives
as the config key ``fedamd.role``; a miner's starting direction ``v_t`` as the
ArrayRecord ``fedamd.direction``. See ``strategies/fedamd.py`` for the rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from bouquet.clientapps.bounds import Bound, ConfigError
from bouquet.clientapps.hooks import (
    FreezeBatchNorm,
    Hook,
    model_shaped_record,
    parameter_names,
)
from bouquet.clientapps.loop import LocalRun
from bouquet.tasks import wire

ROLE = wire.algorithm_key("fedamd", "role")
DIRECTION = wire.algorithm_key("fedamd", "direction")
ROLE_BOUND = Bound(ROLE, "miner", choices=("anchor", "miner"))
BOUNDS = (ROLE_BOUND,)


class AnchorGradient(Hook):
    """Accumulates ``grad f_i(x_t)`` over the whole local set; never steps.

    The reply's ``arrays`` become the gradient (zeros for buffers), the mean
    over examples of the per-example loss gradient.
    """

    def setup(self, run: LocalRun) -> None:
        self.total = [torch.zeros_like(p) for p in run.parameters]
        self.batch = 0
        self.seen = 0

    def transform_batch(
        self, run: LocalRun, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.batch = len(x)
        return x, y

    def step(
        self,
        run: LocalRun,
        closure: Callable[[], torch.Tensor],
        default_step: Callable[[], None],
    ) -> torch.Tensor:
        loss = closure()
        for acc, p in zip(self.total, run.parameters, strict=True):
            if p.grad is not None:
                acc.add_(p.grad, alpha=self.batch)  # batch mean -> batch sum
        self.seen += self.batch
        return loss

    def finish(self, run: LocalRun) -> None:
        gradient = {
            name: acc / max(self.seen, 1)
            for name, acc in zip(parameter_names(run), self.total, strict=True)
        }
        run.reply_records[wire.ARRAYS] = model_shaped_record(run, gradient)


class MinerRecursion(Hook):
    """SARAH steps from ``d_0 = v_t``: ``d_k = d_{k-1} + g(y_k) - g(y_{k-1})``.

    Both gradients of a step use the same batch; ``y_{k+1} = y_k - lr * d_k``
    with ``lr`` the shared ``lr`` key (no momentum, no weight decay).
    """

    fixed_optimizer = True

    reads = (DIRECTION,)

    def setup(self, run: LocalRun) -> None:
        if DIRECTION not in run.incoming:
            raise ConfigError(DIRECTION, None, "present for a miner", "record")
        record = run.incoming[DIRECTION]
        names = parameter_names(run)
        device = run.parameters[0].device
        self.d = [
            torch.as_tensor(record[n].numpy(), device=device, dtype=p.dtype).clone()
            for n, p in zip(names, run.parameters, strict=True)
        ]
        self.previous: list[torch.Tensor] | None = None

    def step(
        self,
        run: LocalRun,
        closure: Callable[[], torch.Tensor],
        default_step: Callable[[], None],
    ) -> torch.Tensor:
        loss = closure()
        now = [_grad(p) for p in run.parameters]
        current = [p.detach().clone() for p in run.parameters]
        if self.previous is not None:
            with torch.no_grad():
                for p, old in zip(run.parameters, self.previous, strict=True):
                    p.copy_(old)
            closure()  # same batch, at y_{k-1}
            before = [_grad(p) for p in run.parameters]
            for d, g_now, g_before in zip(self.d, now, before, strict=True):
                d.add_(g_now - g_before)
        with torch.no_grad():
            for p, y, d in zip(run.parameters, current, self.d, strict=True):
                p.copy_(y - run.settings.lr * d)
        self.previous = current
        return loss


def _grad(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """Frozen BatchNorm plus the anchor or the miner hook, as ``fedamd.role`` says."""
    role = ROLE_BOUND.read(config)
    worker = AnchorGradient() if role == "anchor" else MinerRecursion()
    return [FreezeBatchNorm(), worker]
