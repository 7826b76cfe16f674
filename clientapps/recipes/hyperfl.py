"""HyperFL client: the head first, then the hypernetwork and the embedding.

Guo et al., AAAI 2025, https://arxiv.org/abs/2412.07187. The model is the run's
model behind a hypernetwork (:class:`tasks.hypernet.HyperModel`, built with
``config["model-wrapper"] = "hyper"``). See ``strategies/hyperfl.py``.

:class:`TwoStages`: ``setup`` draws the node's embedding ``v_i ~ N(0, I)`` from
its seeded stream the first time (the server's copy is the same for every
node); ``before_step`` keeps the gradients
of the stage's part only (the head in the first ``head-epochs`` epochs, scaled
by ``lr-head / lr``; then ``phi`` and ``v``, each clipped to ``grad-clip``).
Config keys read: ``hyperfl.head-epochs``, ``hyperfl.lr-head``,
``hyperfl.grad-clip``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from bouquet.clientapps.bounds import EPOCHS_MAX, NORM_MAX, RATE_MAX, Bound, ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.state import load_values, save_values
from bouquet.tasks import wire
from bouquet.tasks.hypernet import HyperModel

if TYPE_CHECKING:
    from bouquet.clientapps.loop import LocalRun

HEAD_EPOCHS = Bound("hyperfl.head-epochs", 1, 0, EPOCHS_MAX)
LR_HEAD = Bound("hyperfl.lr-head", 0.1, 0.0, RATE_MAX, low_open=True)
GRAD_CLIP = Bound("hyperfl.grad-clip", 50.0, 0.0, NORM_MAX)
BOUNDS = (HEAD_EPOCHS, LR_HEAD, GRAD_CLIP)
NAMESPACE = "hyperfl"
"""``Context.state`` namespace (``hyperfl.embedding``: the embedding was drawn)."""


class TwoStages(Hook):
    """HyperFL's two local stages on the one loop (see the module docstring)."""

    def __init__(self, head_epochs: int, lr_head: float, grad_clip: float) -> None:
        self.head_epochs = int(head_epochs)
        self.lr_head = float(lr_head)
        self.grad_clip = float(grad_clip)

    def setup(self, run: LocalRun) -> None:
        model = run.model
        if not isinstance(model, HyperModel):
            raise ConfigError(
                wire.MODEL_WRAPPER,
                type(model).__name__,
                "a model wrapped in bouquet.tasks.hypernet.HyperModel (HyperFL)",
            )
        if load_values(run.state, NAMESPACE, "embedding") is None:
            with torch.no_grad():
                drawn = torch.randn(model.embedding.shape, generator=run.generator)
                model.embedding.copy_(drawn.to(model.embedding.device))
            save_values(run.state, NAMESPACE, "embedding", {"drawn": 1})
        ids = {id(p) for p in model.base.parameters()}
        self._head = [p for p in run.parameters if id(p) in ids]
        self._phi = [p for p in run.parameters if id(p) in _ids(model.hyper)]
        self._v = [p for p in run.parameters if p is model.embedding]

    def before_step(self, run: LocalRun) -> None:
        if run.epoch < self.head_epochs:  # stage 1: the head alone
            for p in (*self._phi, *self._v):
                p.grad = None  # SGD skips it: no momentum, no weight decay
            lr = run.settings.lr
            scale = self.lr_head / lr if lr > 0 else 0.0
            for p in self._head:
                if p.grad is not None:
                    p.grad.mul_(scale)
            return
        for p in self._head:  # stage 2: phi and v, the head fixed
            p.grad = None
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self._phi, self.grad_clip)
            torch.nn.utils.clip_grad_norm_(self._v, self.grad_clip)


def _ids(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the two stages."""
    return [
        TwoStages(
            HEAD_EPOCHS.read(config), LR_HEAD.read(config), GRAD_CLIP.read(config)
        )
    ]
