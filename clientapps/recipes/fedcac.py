"""FedCAC client: plain local training, then the mask of critical parameters.

Wu et al., "Bold but Cautious: Unlocking the Potential of Personalized
Federated Learning through Cautiously Aggressive Collaboration", ICCV 2023,
https://arxiv.org/abs/2309.11103. The sensitivity of each parameter is
``c = |(w_after - w_before) * w_after|``; per parameter tensor the top
``tau`` share is critical (``strategies/fedcac.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bouquet.clientapps.bounds import Bound
from bouquet.clientapps.hooks import Hook, model_shaped_record, parameter_names
from bouquet.clientapps.loop import LocalRun

TAU = Bound("fedcac.tau", 0.5, 0.0, 1.0)
BOUNDS = (TAU,)
MASK = "fedcac.mask"
ZERO = 1e-10
"""A threshold at or below this is read as zero: the smallest non-zero
score is used instead (the official code's rule)."""


def critical_mask(score: torch.Tensor, tau: float) -> torch.Tensor:
    """True where ``score`` is among the top ``int(tau * n)`` of the tensor.

    Ties at the threshold are all critical; a threshold <= 1e-10 falls back
    to the smallest score above 1e-20 (so more than ``tau`` may be marked).
    """
    flat = score.reshape(-1)
    count = int(tau * flat.numel())
    if count == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    threshold = torch.topk(flat, count).values[-1]
    if threshold <= ZERO:
        nonzero = flat[flat > 1e-20]
        if len(nonzero):
            threshold = nonzero.min()
    return score >= threshold


class CriticalMask(Hook):
    """After training: reply the mask of critical parameters as ``fedcac.mask``."""

    def __init__(self, tau: float) -> None:
        self.tau = float(tau)

    def finish(self, run: LocalRun) -> None:
        masks = {}
        for name, after, before in zip(
            parameter_names(run), run.parameters, run.global_parameters, strict=True
        ):
            after = after.detach()
            score = ((after - before.to(after.device)) * after).abs()
            masks[name] = critical_mask(score, self.tau).to(after.dtype)
        run.reply_records[MASK] = model_shaped_record(run, masks)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the mask after plain local training."""
    return [CriticalMask(TAU.read(config))]
