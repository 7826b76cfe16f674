"""FedLEx client: a scout in the exploration round, guided gradients afterwards.

Internò et al., "Federated Loss Exploration for Improved Convergence on Non-IID
Data", IJCNN 2024, https://arxiv.org/abs/2506.18640. The server's config key
``fedlex.phase`` picks the hook (see :mod:`strategies.fedlex` for the protocol):

- ``"explore"``: :class:`Scout` trains the received model for ``local-epochs``
  (the server sets ``E_x``) with early stopping after ``fedlex.patience`` epochs
  without a lower last-batch loss, and sends its model after the first epoch as
  the record ``fedlex.base``.
- ``"train"``: :class:`GuidedGradient` multiplies each gradient elementwise by
  the guidance ``G`` of the record ``fedlex.guidance`` (no-op if absent), then
  clips to ``fedlex.max-grad-norm`` when it is > 0, before the optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord

from bouquet.clientapps.bounds import EPOCHS_MAX, NORM_MAX, Bound
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun

PHASE_KEY = "fedlex.phase"
PATIENCE = "fedlex.patience"
MAX_GRAD_NORM = "fedlex.max-grad-norm"
BASE = "fedlex.base"
GUIDANCE = "fedlex.guidance"
EXPLORE_EPOCHS = "fedlex.explore-epochs"
PHASE_BOUND = Bound(PHASE_KEY, "train", choices=("explore", "train"))
PATIENCE_BOUND = Bound(PATIENCE, 1, 1, EPOCHS_MAX)
MAX_GRAD_NORM_BOUND = Bound(MAX_GRAD_NORM, 0.0, 0.0, NORM_MAX)
BOUNDS = (PHASE_BOUND, PATIENCE_BOUND, MAX_GRAD_NORM_BOUND)


class Scout(Hook):
    """Early stopping on the last-batch loss; keeps the model after epoch 1.

    Parameters
    ----------
    patience : int
        Epochs without a new best last-batch loss before training stops.

    """

    def __init__(self, patience: int) -> None:
        self.patience = int(patience)

    def setup(self, run: LocalRun) -> None:
        self.batches = math.ceil(run.num_examples / run.settings.batch_size)
        self.best, self.waited, self.epochs = math.inf, 0, 0
        self.last = math.inf
        self.base: ArrayRecord | None = None

    def loss(
        self,
        run: LocalRun,
        loss: torch.Tensor,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        self.last = float(loss.detach())
        return loss

    def after_step(self, run: LocalRun) -> None:
        if (run.steps + 1) % self.batches:
            return  # not the last batch of an epoch
        self.epochs += 1
        if self.base is None:
            self.base = ArrayRecord(run.model.state_dict())
        if self.last < self.best:
            self.best, self.waited = self.last, 0
        else:
            self.waited += 1
            run.stop = self.waited >= self.patience

    def finish(self, run: LocalRun) -> None:
        # Fewer steps than one epoch (a local-steps cap): the model as it is.
        base = self.base or ArrayRecord(run.model.state_dict())
        run.reply_records[BASE] = base
        run.metrics[EXPLORE_EPOCHS] = self.epochs


class GuidedGradient(Hook):
    """``grad <- grad * G`` per trainable parameter, then optional clipping.

    Parameters
    ----------
    max_grad_norm : float
        Clip the masked gradients to this global norm (0: no clipping).

    """

    reads = (GUIDANCE,)

    def __init__(self, max_grad_norm: float = 0.0) -> None:
        self.max_grad_norm = float(max_grad_norm)

    def setup(self, run: LocalRun) -> None:
        record = run.incoming.get(GUIDANCE)
        self.masks: list[torch.Tensor | None] = []
        if record is None:
            return
        trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
        for name, param in zip(trainable, run.parameters, strict=True):
            mask = record[name].numpy() if name in record else None
            self.masks.append(
                None if mask is None else torch.as_tensor(mask).to(param.device)
            )

    def before_step(self, run: LocalRun) -> None:
        for param, mask in zip(run.parameters, self.masks, strict=False):
            if mask is not None and param.grad is not None:
                param.grad.mul_(mask)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(run.parameters, self.max_grad_norm)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """``Scout`` in the exploration round, ``GuidedGradient`` otherwise."""
    phase, patience = PHASE_BOUND.read(config), PATIENCE_BOUND.read(config)
    max_grad_norm = MAX_GRAD_NORM_BOUND.read(config)
    if phase == "explore":
        return [Scout(patience)]
    return [GuidedGradient(max_grad_norm)]
