"""pFedGate client: train the shared model and the node's gating layer together.

Chen et al., "Efficient Personalized Federated Learning via Sparse
Model-Adaptation", ICML 2023, https://arxiv.org/abs/2305.02776. The model is the
run's model behind a gating layer (:class:`tasks.gating.GatedModel`, built by the
ClientApp with ``config["model-wrapper"] = "gated"``; a mixed-in client wraps its
own model the same way); the gate's entries are personal parameters, so
``train_client`` keeps them in ``Context.state`` and evaluation uses them.

- ``setup``: the node's budget ``s`` goes into the gate (a personal buffer), so
  evaluation later prunes with the same budget.
- ``before_step``: clip the gate's and the model's gradients apart at
  ``grad-clip`` (official code), then scale the gate's by ``lr-gating / lr``:
  the gate steps with ``lr-gating``.
- ``finish``: report the share of the model the last batch kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from bouquet.clientapps.bounds import NORM_MAX, RATE_MAX, Bound, ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.tasks import wire
from bouquet.tasks.gating import GatedModel

if TYPE_CHECKING:
    from bouquet.clientapps.loop import LocalRun

SPARSE_FACTOR = Bound("pfedgate.sparse-factor", 0.5, 0.0, 1.0, low_open=True)
LR_GATING = Bound("pfedgate.lr-gating", 0.1, 0.0, RATE_MAX)
GRAD_CLIP = Bound("pfedgate.grad-clip", 10.0, 0.0, NORM_MAX)
BOUNDS = (SPARSE_FACTOR, LR_GATING, GRAD_CLIP)

KEPT_FRACTION = "pfedgate.kept-fraction"


class SparseGate(Hook):
    """The gate's budget, learning rate and clipping (see the module docstring)."""

    def __init__(
        self, sparse_factor: float, lr_gating: float, grad_clip: float
    ) -> None:
        self.sparse_factor = float(sparse_factor)
        self.lr_gating = float(lr_gating)
        self.grad_clip = float(grad_clip)

    def setup(self, run: LocalRun) -> None:
        if not isinstance(run.model, GatedModel):
            raise ConfigError(
                wire.MODEL_WRAPPER,
                type(run.model).__name__,
                "a model wrapped in bouquet.tasks.gating.GatedModel (pFedGate)",
            )
        with torch.no_grad():
            run.model.gate.sparse_factor.fill_(self.sparse_factor)
        gate = {id(p) for p in run.model.gate.parameters()}
        self._gate = [p for p in run.parameters if id(p) in gate]
        self._model = [p for p in run.parameters if id(p) not in gate]

    def before_step(self, run: LocalRun) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._gate, self.grad_clip)
            torch.nn.utils.clip_grad_norm_(self._model, self.grad_clip)
        lr = run.settings.lr
        scale = self.lr_gating / lr if lr > 0 else 0.0
        for p in self._gate:
            if p.grad is not None:
                p.grad.mul_(scale)

    def finish(self, run: LocalRun) -> None:
        run.metrics[KEPT_FRACTION] = float(run.model.last_kept)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the gate's budget, learning rate and clipping."""
    return [
        SparseGate(
            SPARSE_FACTOR.read(config), LR_GATING.read(config), GRAD_CLIP.read(config)
        )
    ]
