"""DIFF2 client: a clipped, noised mean of per-example gradients (or differences).

Murata, Suzuki, DIFF2, ICML 2023, https://arxiv.org/abs/2302.03884. See
``strategies/diff2.py`` for the rules and the accounting.

:class:`PrivateGradientDifference` replaces local training (it stops the loop
before the first step): it computes per-example gradients of the loop's loss
with ``torch.func`` over the whole local set, in chunks of ``batch-size``,
at ``x_{r-1}`` (the model as received) and, in a difference round, at
``x_{r-2}`` (the record ``diff2.previous``); clips each example's gradient
(or difference) to ``C`` (restart) or ``C2 ||x_{r-1} - x_{r-2}||``
(difference), averages them and adds ``N(0, (sigma C / n)^2 I)``. The reply's
``arrays`` is that vector, shaped like the model (zeros for buffers).
Config keys read: ``diff2.restart``, ``diff2.clip``,
``diff2.noise-multiplier``, ``diff2.noise-source``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch

from bouquet.clientapps.bounds import NORM_MAX, RATE_MAX, Bound, ConfigError
from bouquet.clientapps.hooks import (
    FreezeBatchNorm,
    Hook,
    model_shaped_record,
    parameter_names,
)
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.per_example import clipped_sum, per_example_terms
from bouquet.tasks import wire

RESTART = Bound(wire.algorithm_key("diff2", "restart"), True)
CLIP = Bound(wire.algorithm_key("diff2", "clip"), 1.0, 0.0, NORM_MAX, low_open=True)
NOISE = Bound(wire.algorithm_key("diff2", "noise-multiplier"), 1.0, 0.0, RATE_MAX)
NOISE_SOURCE = Bound(
    wire.algorithm_key("diff2", "noise-source"), "os", choices=("seed", "os")
)
BOUNDS = (RESTART, CLIP, NOISE, NOISE_SOURCE)
PREVIOUS = wire.algorithm_key("diff2", "previous")
CHUNK = 128
"""Examples per per-example-gradient pass (bounds memory: CHUNK x model size)."""


class PrivateGradientDifference(Hook):
    """Reply with DIFF2's noisy ``d`` instead of training (see the module doc)."""

    reads = (PREVIOUS,)

    def __init__(
        self, restart: bool, clip: float, noise: float, noise_source: str
    ) -> None:
        self.restart, self.clip, self.noise = bool(restart), float(clip), float(noise)
        self.noise_source = noise_source

    def before_training(self, run: LocalRun) -> None:
        names = parameter_names(run)
        current = {n: p.detach() for n, p in zip(names, run.parameters, strict=True)}
        previous = None
        radius = self.clip
        if not self.restart:
            if PREVIOUS not in run.incoming:
                raise ConfigError(PREVIOUS, None, "present in a difference round")
            record = run.incoming[PREVIOUS]
            previous = {
                n: torch.as_tensor(record[n].numpy(), dtype=p.dtype, device=p.device)
                for n, p in current.items()
            }
            step = math.sqrt(
                sum(float((current[n] - previous[n]).pow(2).sum()) for n in current)
            )
            radius = self.clip * step  # public: from the two broadcast models
        x_all, y_all = run.data
        n = len(x_all)
        total = {k: torch.zeros_like(v) for k, v in current.items()}
        chunk = CHUNK
        if radius > 0:
            for start in range(0, n, chunk):
                x, y = x_all[start : start + chunk], y_all[start : start + chunk]
                now = per_example_terms(run, current, x, y)
                before = None
                if previous is not None:
                    before = per_example_terms(run, previous, x, y)
                for k, v in clipped_sum(now, before, radius).items():
                    total[k] += v
        stdev = self.noise * radius / max(n, 1)
        generator = run.generator
        if self.noise_source == "os":  # noise no seed reproduces
            entropy = int.from_bytes(os.urandom(8), "little") >> 1
            generator = torch.Generator().manual_seed(entropy)
        d = {}
        for k, v in total.items():
            d[k] = v / max(n, 1)
            if stdev > 0:
                noise = torch.randn(v.shape, generator=generator, dtype=v.dtype)
                d[k] = d[k] + stdev * noise.to(v.device)
        run.reply_records[wire.ARRAYS] = model_shaped_record(run, d)
        run.stop = True


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """Frozen BatchNorm, then the private gradient (difference)."""
    return [
        FreezeBatchNorm(),
        PrivateGradientDifference(
            RESTART.read(config),
            CLIP.read(config),
            NOISE.read(config),
            NOISE_SOURCE.read(config),
        ),
    ]
