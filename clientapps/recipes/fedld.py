"""FedLD client: cross-entropy plus the margin-control term.

Zeng et al., "Tackling Data Heterogeneity in Federated Learning via Loss
Decomposition", MICCAI 2024, https://arxiv.org/abs/2408.12300.
``L = CE(Z, y) + lambda * log(1 + ||softmax(Z)||_F^2)``, the Frobenius norm over
the whole batch matrix (all samples and classes), as in the official code.
``lambda`` arrives as the config key ``fedld.lambda``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bouquet.clientapps.bounds import RATE_MAX, Bound
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun

LAMBDA = Bound("fedld.lambda", 0.0, 0.0, RATE_MAX)
BOUNDS = (LAMBDA,)


def margin_control(logits: torch.Tensor, lambda_: float) -> torch.Tensor:
    """``lambda * log(1 + ||softmax(logits)||_F^2)`` for a batch of logits."""
    probabilities = torch.softmax(logits, dim=1)
    return lambda_ * torch.log1p(probabilities.pow(2).sum())


class MarginControl(Hook):
    """Adds FedLD's margin-control term to the loss (no-op at lambda = 0)."""

    def __init__(self, lambda_: float) -> None:
        self.lambda_ = float(lambda_)

    def loss(
        self,
        run: LocalRun,
        loss: torch.Tensor,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        if self.lambda_ == 0.0:
            return loss
        return loss + margin_control(logits, self.lambda_)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the margin-control term with ``fedld.lambda`` from the config."""
    return [MarginControl(LAMBDA.read(config))]
