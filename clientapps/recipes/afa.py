"""AFA worker (AFA-CD and AFA-CS): its own number of steps, an averaged gradient.

Yang et al., "Anarchic Federated Learning", ICML 2022,
https://arxiv.org/abs/2108.09875. The worker draws ``K_i`` uniformly in
``[afa.k-min, afa.k]`` from a stream derived from its own round seed (so the
batch order is the same as a plain client's), runs ``K_i`` steps and replies
with ``G_i = (1/K_i) sum_k g_k`` (or, with ``afa.normalize = false``, the model
change ``x - y_K``) in place of its model, reporting ``afa.local-steps``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bouquet.clientapps.bounds import STEPS_MAX, Bound, ConfigError
from bouquet.clientapps.hooks import (
    FreezeBatchNorm,
    Hook,
    model_shaped_record,
    parameter_names,
)
from bouquet.clientapps.loop import LocalRun
from bouquet.tasks import wire
from bouquet.tasks.wire import derive_seed

K = Bound("afa.k", 1, 1, STEPS_MAX)
K_MIN = Bound("afa.k-min", 1, 1, STEPS_MAX)
NORMALIZE = Bound("afa.normalize", True)
BOUNDS = (K, K_MIN, NORMALIZE)


def draw_local_steps(seed: int, k_min: int, k: int) -> int:
    """``K_i ~ U{k_min..k}`` from ``seed`` (a worker's round seed)."""
    rng = np.random.default_rng(derive_seed(seed, "afa-local-steps"))
    return int(rng.integers(k_min, k + 1))


class AnarchicSteps(Hook):
    """Stops after a self-chosen ``K_i`` steps and replies with ``G_i``."""

    def __init__(self, k: int, k_min: int = 1, normalize: bool = True) -> None:
        if not 1 <= k_min <= k:
            raise ValueError(f"AFA needs 1 <= k-min <= k; got {k_min}, {k}.")
        self.k, self.k_min, self.normalize = int(k), int(k_min), bool(normalize)

    def setup(self, run: LocalRun) -> None:
        self.steps = draw_local_steps(run.generator.initial_seed(), self.k_min, self.k)
        self.total = [torch.zeros_like(p) for p in run.parameters]

    def before_step(self, run: LocalRun) -> None:
        for acc, p in zip(self.total, run.parameters, strict=True):
            if p.grad is not None:
                acc.add_(p.grad)

    def after_step(self, run: LocalRun) -> None:
        run.stop = run.steps + 1 >= self.steps  # run.steps counts earlier steps

    def finish(self, run: LocalRun) -> None:
        taken = max(run.steps, 1)
        names = parameter_names(run)
        if self.normalize:
            update = {n: acc / taken for n, acc in zip(names, self.total, strict=True)}
        else:
            update = {
                n: g - p.detach()
                for n, p, g in zip(
                    names, run.parameters, run.global_parameters, strict=True
                )
            }
        run.reply_records[wire.ARRAYS] = model_shaped_record(run, update)
        run.metrics[wire.algorithm_key("afa", "local-steps")] = float(run.steps)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """Frozen BatchNorm and the anarchic worker, from the ``afa.*`` config keys."""
    k, k_min = K.read(config), K_MIN.read(config)
    if k_min > k:
        raise ConfigError(K_MIN.key, k_min, f"an integer in [1, {K.key} = {k}]")
    return [
        FreezeBatchNorm(),
        AnarchicSteps(k=k, k_min=k_min, normalize=NORMALIZE.read(config)),
    ]
