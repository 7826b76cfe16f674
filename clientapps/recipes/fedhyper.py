"""FedHyper client: the client-side local learning-rate scheduler (FedHyper-CL).

Wang et al., "FedHyper: A Universal and Robust Learning Rate Scheduler for
Federated Learning with Hypergradient Descent", ICLR 2024,
https://arxiv.org/abs/2310.03156 (official ``src/update.py``).

The step size of step ``k + 1`` is ``eta_0 * beta_k`` with ``beta_0 = 1`` and,
after step ``k`` moved the trainable parameters by ``u_k``,

``gamma = min(gamma_max, 1 + h * (w <u_k, Delta> / n + <u_k, u_prev>))``,
``beta_k = clip(gamma * beta_{k-1}, beta_min, beta_max)``,

where ``Delta`` is the previous global update (record ``fedhyper.global-update``),
``n`` the number of clients sampled this round, ``w`` the global-term weight,
``h`` the hypergradient step size and ``u_prev`` the change of the last
counted step (``Delta`` before the first). As in the code, the first step of
every local epoch is not counted (it neither updates ``beta`` nor becomes
``u_prev``), and ``beta`` restarts at 1 every round: no client state is kept.

Only ``cl`` and ``full`` enable it (config key ``fedhyper.client-scheduler``);
the other schedulers train plainly (``sl`` through the config's ``lr``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bouquet.clientapps.bounds import RATE_MAX, Bound, ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun

NAME = "fedhyper"
GLOBAL_UPDATE = f"{NAME}.global-update"
CLIENT_SCHEDULER = Bound(f"{NAME}.client-scheduler", False)
NUM_SAMPLED = Bound(f"{NAME}.num-sampled", 1.0, 0.0, 1e9)
"""Nodes sampled this round (values below 1 count as 1)."""
HYPERGRAD_LR = Bound(f"{NAME}.hypergrad-lr", 1.0, 0.0, RATE_MAX)
GLOBAL_WEIGHT = Bound(f"{NAME}.global-weight", 0.1, -RATE_MAX, RATE_MAX)
GAMMA_MAX = Bound(f"{NAME}.gamma-max", 1.1, 0.0, RATE_MAX, low_open=True)
BETA_MIN = Bound(f"{NAME}.beta-min", 0.1, 0.0, RATE_MAX, low_open=True)
BETA_MAX = Bound(f"{NAME}.beta-max", 10.0, 0.0, RATE_MAX, low_open=True)
BOUNDS = (
    CLIENT_SCHEDULER,
    NUM_SAMPLED,
    HYPERGRAD_LR,
    GLOBAL_WEIGHT,
    GAMMA_MAX,
    BETA_MIN,
    BETA_MAX,
)


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def multiplier(
    beta: float,
    step: torch.Tensor,
    previous_step: torch.Tensor,
    global_update: torch.Tensor,
    *,
    num_sampled: float,
    hypergrad_lr: float = 1.0,
    global_weight: float = 0.1,
    gamma_max: float = 1.1,
    beta_bounds: tuple[float, float] = (0.1, 10.0),
) -> float:
    """The next ``beta`` from the current one and step ``k``'s change ``u_k``."""
    hypergradient = global_weight * float(step @ global_update) / num_sampled + float(
        step @ previous_step
    )
    gamma = min(gamma_max, 1.0 + hypergrad_lr * hypergradient)
    return min(max(gamma * beta, beta_bounds[0]), beta_bounds[1])


class LocalLrScheduler(Hook):
    """Rescales the optimizer's lr after every step (FedHyper-CL).

    Parameters
    ----------
    config : mapping
        The message config: ``fedhyper.num-sampled``, ``fedhyper.hypergrad-lr``,
        ``fedhyper.global-weight``, ``fedhyper.gamma-max``,
        ``fedhyper.beta-min``, ``fedhyper.beta-max``.

    """

    fixed_optimizer = True

    reads = (GLOBAL_UPDATE,)

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.num_sampled = max(1.0, NUM_SAMPLED.read(config))
        self.hypergrad_lr = HYPERGRAD_LR.read(config)
        self.global_weight = GLOBAL_WEIGHT.read(config)
        self.gamma_max = GAMMA_MAX.read(config)
        self.beta_bounds = (BETA_MIN.read(config), BETA_MAX.read(config))

    def setup(self, run: LocalRun) -> None:
        record = run.incoming.get(GLOBAL_UPDATE)
        if record is None:
            raise ConfigError(GLOBAL_UPDATE, None, "present for FedHyper-CL", "record")
        names = [n for n, p in run.model.named_parameters() if p.requires_grad]
        missing = [n for n in names if n not in record]
        if missing:
            raise ValueError(f"'{GLOBAL_UPDATE}' lacks parameters {missing}.")
        device = run.parameters[0].device
        arrays = [torch.from_numpy(record[n].numpy()) for n in names]
        self.global_update = _flat(arrays).to(device)
        self.previous_step = self.global_update
        self.last = _flat(run.parameters)
        self.beta = 1.0
        self.epoch_of_last_step = -1

    def after_step(self, run: LocalRun) -> None:
        current = _flat(run.parameters)
        step, self.last = current - self.last, current
        first_of_epoch = run.epoch != self.epoch_of_last_step
        self.epoch_of_last_step = run.epoch
        if first_of_epoch:
            return
        self.beta = multiplier(
            self.beta,
            step,
            self.previous_step,
            self.global_update,
            num_sampled=self.num_sampled,
            hypergrad_lr=self.hypergrad_lr,
            global_weight=self.global_weight,
            gamma_max=self.gamma_max,
            beta_bounds=self.beta_bounds,
        )
        self.previous_step = step
        for group in run.optimizer.param_groups:
            group["lr"] = run.settings.lr * self.beta

    def finish(self, run: LocalRun) -> None:
        run.metrics[f"{NAME}.beta"] = self.beta


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """The local scheduler when the server enables it (``cl``/``full``)."""
    enabled = CLIENT_SCHEDULER.read(config)
    hook = LocalLrScheduler(config)  # its constants are checked either way
    return [hook] if enabled else []
