"""FedIns client: train the SSF pools with the key-matching term.

Feng et al., "Towards Instance-adaptive Inference for Federated Learning",
ICCV 2023, https://arxiv.org/abs/2308.06051 (official ``utils/public_utils.py``,
``pool_train``). The model is built with ``peft="ssf"`` and pools
(:mod:`tasks.ssf`); every forward pass routes each instance to its top-k pool
entries and keeps the sum of their cosine similarities to the query. The loss
of a batch is

``(1 - lam) * CE + lam * mean_x (1 - sum_{p in S(x)} cos(q(x), K_p))``,

``lam`` = config ``fedins.lam`` (the official ``training_loss_weight``).

Metric ``fedins.top-entry-share``: the share of the node's instance
selections that went to its most selected pool entry over the round (1 / P
when selection is spread evenly, 1.0 when every instance picks the same
entry: the collapse the spec warns about).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bouquet.clientapps.bounds import Bound, ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun

NAME = "fedins"
LAM = Bound(f"{NAME}.lam", 0.1, 0.0, 1.0)
BOUNDS = (LAM,)
TOP_ENTRY_SHARE = f"{NAME}.top-entry-share"


class KeyMatching(Hook):
    """``(1 - lam) * loss + lam * mean(1 - selected similarity)``; selection counts."""

    def __init__(self, lam: float) -> None:
        self.lam = float(lam)
        self.counts: torch.Tensor | None = None

    def setup(self, run: LocalRun) -> None:
        if not hasattr(run.model, "_ssf_routing"):
            raise ConfigError("peft", "none", "'ssf' (fedins needs the SSF pools)")
        self.counts = None

    def loss(
        self,
        run: LocalRun,
        loss: torch.Tensor,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        from bouquet.tasks.ssf import selected_entries, selected_similarity

        similarity = selected_similarity(run.model)
        if similarity is None:  # a pool of one entry: plain SSF
            return loss
        chosen = selected_entries(run.model)
        pool = run.model._ssf_routing.pool_size
        counts = torch.bincount(chosen.reshape(-1), minlength=pool)
        self.counts = counts if self.counts is None else self.counts + counts
        return (1.0 - self.lam) * loss + self.lam * (1.0 - similarity).mean()

    def finish(self, run: LocalRun) -> None:
        share = 1.0
        if self.counts is not None and int(self.counts.sum()) > 0:
            share = float(self.counts.max()) / float(self.counts.sum())
        run.metrics[TOP_ENTRY_SHARE] = share


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the key-matching loss (and the selection histogram's peak)."""
    return [KeyMatching(lam=LAM.read(config))]
