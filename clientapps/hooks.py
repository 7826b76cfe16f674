"""Hooks: the only way an algorithm changes local training (DESIGN rule 2).

A hook is a small object with no-op defaults; an algorithm's recipe is a list
of hooks that :func:`clientapps.loop.train_local` calls at fixed points:

======================  ==========================================================
``setup(run)``          before the first step: read client state / extra records
``order(run, n)``       the example order of an epoch (curriculum); None = shuffle
``transform_batch``     ``(run, x, y) -> (x, y)`` (augmentation, label noise)
``loss``                ``(run, loss, logits, x, y) -> loss``: add a term
``before_step(run)``    gradients are ready: correct them (SCAFFOLD, clipping)
``step``                ``(run, closure, default_step) -> loss``: take over the
                        step when it must re-evaluate the loss (SAM, FedSpeed);
                        at most one hook of a recipe may do this
``after_step(run)``     after the optimizer step
``finish(run)``         after the last step: write client state, add reply records
======================  ==========================================================

Hooks read their hyperparameters from the message config (``run.config``), never
from the run config, so the server can schedule them per round. A hook ends
local training early by setting ``run.stop``; it replaces the reply's model by
putting an ArrayRecord under ``"arrays"`` in ``run.reply_records`` (e.g. a
gradient instead of weights, shaped like the model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from clientapps.loop import LocalRun


class Hook:
    """Base class: every method is a no-op, override what you need."""

    def setup(self, run: LocalRun) -> None:
        """Prepare before the first step."""

    def order(self, run: LocalRun, num_examples: int) -> torch.Tensor | None:
        """Example order for ``run.epoch``; ``None`` leaves the seeded shuffle."""
        return None

    def transform_batch(
        self, run: LocalRun, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Change a batch before the forward pass."""
        return x, y

    def loss(
        self,
        run: LocalRun,
        loss: torch.Tensor,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        """Return the loss to minimise (add a term to ``loss``)."""
        return loss

    def before_step(self, run: LocalRun) -> None:
        """Gradients are in ``p.grad``; modify them in place."""

    def step(
        self,
        run: LocalRun,
        closure: Callable[[], torch.Tensor],
        default_step: Callable[[], None],
    ) -> torch.Tensor | None:
        """Take over the step; return the loss, or None to leave it to the loop."""
        return None

    def after_step(self, run: LocalRun) -> None:
        """After the optimizer step."""

    def finish(self, run: LocalRun) -> None:
        """After the last step."""


class ProximalTerm(Hook):
    """FedProx's proximal term ``mu/2 * ||w - w_global||^2`` (Li et al. 2020, eq. 2).

    Parameters
    ----------
    mu : float
        The paper's mu; 0 leaves the loss unchanged.

    """

    def __init__(self, mu: float) -> None:
        self.mu = float(mu)

    def loss(
        self,
        run: LocalRun,
        loss: torch.Tensor,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        if self.mu == 0.0:
            return loss
        squared = sum(
            (p - g).pow(2).sum()
            for p, g in zip(run.parameters, run.global_parameters, strict=True)
        )
        return loss + 0.5 * self.mu * squared


class FreezeBatchNorm(Hook):
    """Keeps BatchNorm layers in eval mode: running statistics are not updated.

    The layers' affine weights still train; normalisation uses the statistics
    the client received. For algorithms whose replies are gradients (FedAMD,
    AFA), which have nothing to say about running statistics.
    """

    def setup(self, run: LocalRun) -> None:
        for module in run.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
