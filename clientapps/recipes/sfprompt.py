"""SFPrompt client: local-loss update, EL2N pruning, then split training.

Cao, Zhu, Gong, "SFPrompt: Communication-Efficient Split Federated
Fine-Tuning for Large Pre-Trained Models over Resource-Limited Devices",
arXiv 2024, https://arxiv.org/abs/2407.17533 (see :mod:`strategies.sfprompt`).

The model is split U-shaped (:func:`tasks.foundation.split_blocks`): the
client's head (embeddings, prompts, ``sfprompt.head-blocks`` blocks), the
server's frozen body, the client's tail (``sfprompt.tail-blocks`` blocks and
the classifier). The split is simulated: the node holds the frozen body
too, so the math is the split's exactly, and the bytes that would cross
the network are counted and reported.

One ``before_training`` phase, then the loop:

1. local-loss update: ``sfprompt.local-loss-epochs`` epochs of the loop's
   own training (the run's optimizer settings, a fresh optimizer) on
   ``tail(head(x))``, the body skipped (:func:`tasks.foundation.without_body`);
2. pruning: EL2N ``||softmax(tail(head(x))) - onehot(y)||_2`` of every
   local example with the updated local path (eval mode), the
   ``ceil(sfprompt.keep-fraction * n)`` highest kept (ties by index);
3. split training: the loop trains ``tail(body(head(x)))`` on the kept
   examples; per batch, ``s = head(x)`` goes up, ``h = body(s)`` down,
   ``dL/dh`` up, and ``dL/ds`` down when the head has trainable entries
   (prompts). The element counts are measured on the body's input and
   output, times the activations' element size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from bouquet.clientapps.bounds import EPOCHS_MAX, INT63_MAX, Bound
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun, train_local
from bouquet.tasks.foundation import split_blocks, without_body

NAMESPACE = "sfprompt"
KEEP_FRACTION = Bound(f"{NAMESPACE}.keep-fraction", 0.5, 0.0, 1.0, low_open=True)
LOCAL_LOSS_EPOCHS = Bound(f"{NAMESPACE}.local-loss-epochs", 1, 0, EPOCHS_MAX)
HEAD_BLOCKS = Bound(f"{NAMESPACE}.head-blocks", 1, 0, INT63_MAX)
TAIL_BLOCKS = Bound(f"{NAMESPACE}.tail-blocks", 1, 0, INT63_MAX)
BOUNDS = (KEEP_FRACTION, LOCAL_LOSS_EPOCHS, HEAD_BLOCKS, TAIL_BLOCKS)

UPLINK_BYTES = f"{NAMESPACE}.split-uplink-bytes"
"""Reply metric: bytes of ``s`` and ``dL/dh`` the client sent the server."""
DOWNLINK_BYTES = f"{NAMESPACE}.split-downlink-bytes"
"""Reply metric: bytes of ``h`` and ``dL/ds`` the server sent the client."""
KEPT = f"{NAMESPACE}.kept-examples"
"""Reply metric: examples left after pruning (those of the split phase)."""
SCORING_BATCH = 1024


def el2n_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """EL2N per example, ``||softmax(f(x)) - onehot(y)||_2`` (eval mode, no grad).

    For sequence outputs (``logits`` of shape ``(n, C, T)``, targets
    ``(n, T)``) the per-token norms are averaged over the tokens.
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    scores = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), SCORING_BATCH):
                logits = model(x[i : i + SCORING_BATCH].to(device))
                labels = y[i : i + SCORING_BATCH].to(device)
                # Classes are dim 1 (a sequence model's logits are (n, C, T)).
                error = torch.softmax(logits.double(), dim=1).movedim(1, -1)
                error -= nn.functional.one_hot(labels, logits.shape[1]).double()
                norms = error.norm(dim=-1)
                scores.append(norms.reshape(len(norms), -1).mean(dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores)


def kept_indices(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``ceil(fraction * n)`` highest-scored indices, ascending (stable ties)."""
    keep = max(1, math.ceil(fraction * len(scores)))
    return torch.sort(torch.argsort(-scores, stable=True)[:keep]).values


STALE_HANDLES = "_bouquet_sfprompt_handles"
"""Model attribute holding the byte counters' hook handles until finish()."""


class SplitPhases(Hook):
    """SFPrompt's three phases on the one loop (see the module docstring)."""

    def __init__(
        self,
        keep_fraction: float,
        local_loss_epochs: int,
        head_blocks: int,
        tail_blocks: int,
    ) -> None:
        self.keep_fraction = float(keep_fraction)
        self.local_loss_epochs = int(local_loss_epochs)
        self.head_blocks = int(head_blocks)
        self.tail_blocks = int(tail_blocks)
        self.uplink = 0
        self.downlink = 0
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def before_training(self, run: LocalRun) -> None:
        model, split = run.model, (self.head_blocks, self.tail_blocks)
        if self.local_loss_epochs:
            settings = dataclasses.replace(run.settings, epochs=self.local_loss_epochs)
            with without_body(model, *split):
                train_local(model, run.data, settings, generator=run.generator)
        if self.keep_fraction < 1.0:
            with without_body(model, *split):
                scores = el2n_scores(model, *run.data)
            run.select(kept_indices(scores, self.keep_fraction))
        # A run that raised never reached finish(): its counters must not stay
        # on the pooled model.
        for stale in getattr(model, STALE_HANDLES, ()):
            stale.remove()
        _, body, _ = split_blocks(model, *split)
        if body:
            self.handles = [
                body[0].register_forward_pre_hook(self._smashed),
                body[-1].register_forward_hook(self._returned),
            ]
        setattr(model, STALE_HANDLES, self.handles)

    def _smashed(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        s = args[0]
        if torch.is_grad_enabled():
            # s up; dL/ds down only if something before the body trains.
            self.uplink += s.numel() * s.element_size()
            if s.requires_grad:
                self.downlink += s.numel() * s.element_size()

    def _returned(self, _module: nn.Module, _args: Any, out: Any) -> None:
        h = out[0] if isinstance(out, tuple) else out
        if torch.is_grad_enabled():
            self.downlink += h.numel() * h.element_size()  # h down
            if h.requires_grad:
                self.uplink += h.numel() * h.element_size()  # dL/dh up

    def finish(self, run: LocalRun) -> None:
        for handle in self.handles:
            handle.remove()
        setattr(run.model, STALE_HANDLES, ())
        run.metrics[UPLINK_BYTES] = float(self.uplink)
        run.metrics[DOWNLINK_BYTES] = float(self.downlink)
        run.metrics[KEPT] = float(run.num_examples)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the local-loss update, pruning and the split's byte count."""
    return [
        SplitPhases(
            keep_fraction=KEEP_FRACTION.read(config),
            local_loss_epochs=LOCAL_LOSS_EPOCHS.read(config),
            head_blocks=HEAD_BLOCKS.read(config),
            tail_blocks=TAIL_BLOCKS.read(config),
        )
    ]
