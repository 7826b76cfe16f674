"""Curriculum client: score, rank, and train on the paced front of the ranking.

Vahidian et al., "When Do Curricula Work in Federated Learning?", ICCV 2023,
https://arxiv.org/abs/2212.12712 (see :mod:`strategies.curriculum`).

The hook scores every local example with the global model just received
(per-example cross-entropy, eval mode), ranks them by ``curriculum.ordering``
and gives the loop an epoch order whose batches come only from the first
``ceil(curriculum.fraction * N)`` ranked examples. Scores are cached in
``Context.state`` and reused for ``curriculum.rescore-every`` rounds; the
``random`` ranking is drawn once per client and kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from bouquet.clientapps.bounds import INT63_MAX, SERVER_ROUND, Bound
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.state import load_arrays, load_values, save_arrays, save_values
from bouquet.tasks import wire

NAMESPACE = "curriculum"
SCORING_BATCH = 1024
ORDERING = Bound(
    f"{NAMESPACE}.ordering", "curriculum", choices=("curriculum", "anti", "random")
)
FRACTION = Bound(f"{NAMESPACE}.fraction", 1.0, 0.0, 1.0)
RESCORE_EVERY = Bound(f"{NAMESPACE}.rescore-every", 1, 1, INT63_MAX)
"""Rounds, like ``server-round``."""
BOUNDS = (ORDERING, FRACTION, RESCORE_EVERY)


def example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy of ``model`` in eval mode (no statistics update)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            losses = [
                nn.functional.cross_entropy(
                    model(x[i : i + SCORING_BATCH].to(device)),
                    y[i : i + SCORING_BATCH].to(device),
                    reduction="none",
                ).cpu()
                for i in range(0, len(x), SCORING_BATCH)
            ]
    finally:
        model.train(was_training)
    return torch.cat(losses)


def ranking(scores: torch.Tensor, ordering: str) -> torch.Tensor:
    """Indices easy-first (``curriculum``/``random``) or hard-first (``anti``).

    Ties keep index order (a stable sort), so the ranking is deterministic.
    """
    if ordering == "anti":
        return torch.argsort(-scores, stable=True)
    return torch.argsort(scores, stable=True)


def paced_order(
    rank: torch.Tensor, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """An epoch of ``len(rank)`` indices drawn from the first ``fraction`` ranked.

    The first pass is the loop's own seeded permutation restricted to the
    subset, so ``fraction = 1`` returns exactly the permutation FedAvg uses;
    further passes are fresh shuffles of the subset until the epoch is full.
    """
    n = len(rank)
    count = min(n, max(1, math.ceil(round(fraction * n, 9))))  # .6000000000000001
    member = torch.zeros(n, dtype=torch.bool)
    member[rank[:count]] = True
    perm = torch.randperm(n, generator=generator)
    passes = [perm[member[perm]]]
    subset = rank[:count]
    while sum(len(p) for p in passes) < n:
        passes.append(subset[torch.randperm(count, generator=generator)])
    return torch.cat(passes)[:n]


class OrderedData(Hook):
    """Data ordering with pacing (curriculum, anti-curriculum, random).

    Parameters
    ----------
    ordering : str
        ``"curriculum"``, ``"anti"`` or ``"random"``.
    fraction : float
        This round's ``g(t)``: the share of the ranked data in use.
    rescore_every : int
        Rounds a cached scoring stays valid.

    """

    def __init__(self, ordering: str, fraction: float, rescore_every: int = 1) -> None:
        self.ordering = ordering
        self.fraction = float(fraction)
        self.rescore_every = max(1, int(rescore_every))
        self.rank: torch.Tensor | None = None

    def _scores(self, run: LocalRun) -> tuple[torch.Tensor, float]:
        server_round = SERVER_ROUND.read(run.config)
        cached = load_values(run.state, NAMESPACE, "scored")
        arrays = load_arrays(run.state, NAMESPACE, "scores")
        fresh = (
            cached is None
            or arrays is None
            or len(arrays["loss"]) != run.num_examples
            or server_round - int(cached["round"]) >= self.rescore_every
        )
        if fresh:
            x, y = run.data
            loss = example_losses(run.model, x, y).numpy()
            save_arrays(run.state, NAMESPACE, "scores", {"loss": loss})
            save_values(run.state, NAMESPACE, "scored", {"round": server_round})
        else:
            loss = arrays["loss"]
        return torch.from_numpy(np.array(loss)), float(np.mean(loss))

    def _random_keys(self, run: LocalRun) -> torch.Tensor:
        saved = load_arrays(run.state, NAMESPACE, "random")
        if saved is not None and len(saved["keys"]) == run.num_examples:
            return torch.from_numpy(np.array(saved["keys"]))
        # Own stream, seeded from the round's: the loop's stream stays untouched.
        own = torch.Generator().manual_seed(run.generator.initial_seed() + 1)
        drawn = torch.rand(run.num_examples, generator=own, dtype=torch.float64)
        save_arrays(run.state, NAMESPACE, "random", {"keys": drawn.numpy()})
        return drawn

    def setup(self, run: LocalRun) -> None:
        if run.data is None:
            raise ValueError("The curriculum hook needs run.data (the local set).")
        loss, mean = self._scores(run)
        run.metrics[wire.algorithm_key(NAMESPACE, "mean-score")] = mean
        scores = self._random_keys(run) if self.ordering == "random" else loss
        self.rank = ranking(scores, self.ordering)

    def order(self, run: LocalRun, num_examples: int) -> torch.Tensor:
        assert self.rank is not None, "setup() runs first"
        return paced_order(self.rank, self.fraction, run.generator)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the paced ordering, configured by the round's message config."""
    return [
        OrderedData(
            ordering=ORDERING.read(config),
            fraction=FRACTION.read(config),
            rescore_every=RESCORE_EVERY.read(config),
        )
    ]
