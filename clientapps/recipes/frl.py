"""FRL client: train supermask scores (edge-popup), reply with their ranking.

Mozaffari, Shejwalkar, Houmansadr, "Every Vote Counts: Ranking-Based Training
of Federated Learning to Resist Poisoning Attacks", USENIX Security 2023
(arXiv 2110.04350, "FRL"). Every masked entry (a weight with ndim >= 2, see
:mod:`tasks.supermask`) is ``W * M(s)``: ``W`` frozen at the seeded signed
constant, ``M`` the top ``k`` fraction of the scores ``s``. The client:

1. reads the global scores from the record ``frl.scores`` and sets each
   masked weight to ``W * M(s)``;
2. every step: the loop's closure gives ``dL/dw`` at ``w = W * M(s)``; the
   straight-through estimator gives ``dL/ds = dL/dw * W``; SGD on the scores
   (the shared ``lr``, ``momentum``, ``weight-decay``); ``w <- W * M(s)``.
   Nothing else is trained (biases and norm parameters stay as sent);
3. replies with the positions of its edges in the ascending order of its
   scores (record ``frl.ranks``, float32, exact below 2^24 edges per entry)
   and its masked model as ``arrays``.

Config keys read: ``frl.k``, ``seed`` (the run seed ``W`` derives from).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from bouquet.clientapps.bounds import SEED, Bound, ConfigError
from bouquet.clientapps.hooks import Hook, model_shaped_record, parameter_names
from bouquet.clientapps.loop import LocalRun
from bouquet.tasks.supermask import frozen_weight, positions, top_k_mask
from bouquet.tasks.wire import algorithm_key

NAMESPACE = "frl"
SCORES = algorithm_key(NAMESPACE, "scores")
RANKS = algorithm_key(NAMESPACE, "ranks")
K = Bound(algorithm_key(NAMESPACE, "k"), 0.5, 0.0, 1.0)
BOUNDS = (K,)


class EdgePopup(Hook):
    """Score training on frozen weights (see the module docstring)."""

    fixed_optimizer = True
    reads = (SCORES,)

    def __init__(self, k: float, seed: int) -> None:
        self.k, self.seed = float(k), int(seed)

    def setup(self, run: LocalRun) -> None:
        if SCORES not in run.incoming:
            raise ConfigError(SCORES, None, "present", "record")
        record = run.incoming[SCORES]
        self.entries: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for name, p in zip(parameter_names(run), run.parameters, strict=True):
                if p.ndim < 2:
                    continue
                frozen = frozen_weight(name, tuple(p.shape), self.seed)
                weight = torch.as_tensor(frozen, dtype=p.dtype, device=p.device)
                scores = torch.as_tensor(
                    record[name].numpy(), dtype=p.dtype, device=p.device
                ).clone()
                self.entries.append((name, p, weight, scores))
                self._apply(p, weight, scores)
        settings = run.settings
        self.optimizer = torch.optim.SGD(
            [s for *_, s in self.entries],
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )

    def _apply(
        self, p: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor
    ) -> None:
        mask = top_k_mask(scores.detach().cpu().numpy(), self.k)
        p.copy_(weight * torch.as_tensor(mask, dtype=p.dtype, device=p.device))

    def step(
        self,
        run: LocalRun,
        closure: Callable[[], torch.Tensor],
        default_step: Callable[[], None],
    ) -> torch.Tensor:
        loss = closure()
        for _, p, weight, scores in self.entries:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            scores.grad = grad * weight  # straight-through: dM/ds = 1
        self.optimizer.step()
        with torch.no_grad():
            for _, p, weight, scores in self.entries:
                self._apply(p, weight, scores)
        return loss

    def finish(self, run: LocalRun) -> None:
        ranks = {
            name: positions(scores.detach().cpu().numpy()).astype(np.float32)
            for name, _, _, scores in self.entries
        }
        run.reply_records[RANKS] = model_shaped_record(run, ranks)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """Edge-popup on the scores the server sent."""
    return [EdgePopup(K.read(config), SEED.read(config))]
