"""One-Byte SPSA client: ``J`` projected gradients from seeded directions.

Zelikman, Huang, Liang, Haber, Goodman, "Just One Byte (per gradient)",
arXiv 2023, https://arxiv.org/abs/2306.10015. See ``strategies/onebyte.py``.

:class:`SeededSPSA` replaces local training (it stops the loop before the
first step): for ``j = 0..J-1`` it draws a minibatch of ``batch-size``
examples from the node's stream, perturbs the shared float entries by
``+eps z_j`` and ``-eps z_j`` (``z_j`` from ``onebyte.seed`` through
:func:`tasks.compression.seeded_direction`, as the server replays it), and
replies with the coded ``g_j = (L+ - L-) / (2 eps)`` (``J`` bytes, or
``J`` float32). The model is restored exactly from a copy. Config keys
read: ``onebyte.seed``, ``onebyte.eps``, ``onebyte.samples``,
``onebyte.quantize``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bouquet.clientapps.bounds import RATE_MAX, Bound
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.recipes.ef21 import shared_entries
from bouquet.clientapps.state import array_record
from bouquet.tasks import compression, wire

NAMESPACE = "onebyte"
SEED = Bound(wire.algorithm_key(NAMESPACE, "seed"), 0, 0, 2**63 - 1)
EPS = Bound(wire.algorithm_key(NAMESPACE, "eps"), 1e-3, 0.0, RATE_MAX, low_open=True)
SAMPLES = Bound(wire.algorithm_key(NAMESPACE, "samples"), 1, 1, 4096)
QUANTIZE = Bound(
    wire.algorithm_key(NAMESPACE, "quantize"), "byte", choices=("byte", "float32")
)
BOUNDS = (SEED, EPS, SAMPLES, QUANTIZE)


class SeededSPSA(Hook):
    """Reply with ``J`` coded projected gradients instead of training.

    Parameters
    ----------
    seed : int
        This node's seed for the round (from the server).
    eps : float
        Perturbation scale.
    samples : int
        ``J``, the projected gradients to send.
    coder : tasks.compression.Compressor
        How each scalar travels (``LogByte`` or ``Identity``).

    """

    def __init__(
        self, seed: int, eps: float, samples: int, coder: compression.Compressor
    ) -> None:
        self.seed, self.eps, self.samples = int(seed), float(eps), int(samples)
        self.coder = coder

    def _loss(
        self,
        run: LocalRun,
        start: dict[str, torch.Tensor],
        keys: list[str],
        z: np.ndarray,
        sign: float,
        batch: tuple[torch.Tensor, torch.Tensor],
    ) -> float:
        """The loss on ``batch`` at ``start + sign eps z``."""
        offset = 0
        with torch.no_grad():
            state = run.model.state_dict()
            for key in keys:
                tensor = state[key]
                size = tensor.numel()
                step = torch.as_tensor(
                    z[offset : offset + size].reshape(tensor.shape), dtype=tensor.dtype
                )
                tensor.copy_(start[key] + (sign * self.eps) * step.to(tensor.device))
                offset += size
            x, y = batch
            logits = run.model(x)
            return float(run.loss_fn(logits, y, run))

    def before_training(self, run: LocalRun) -> None:
        state = run.model.state_dict()
        keys = compression.compressed_keys(shared_entries(run))
        start = {k: state[k].detach().clone() for k in keys}
        d = sum(start[k].numel() for k in keys)
        x_all, y_all = run.data
        device = next(run.model.parameters()).device
        run.model.eval()
        scalars, losses = [], []
        for j in range(self.samples):
            idx = torch.randperm(len(x_all), generator=run.generator)
            idx = idx[: run.settings.batch_size]
            batch = (x_all[idx].to(device), y_all[idx].to(device))
            z = compression.seeded_direction(self.seed, j, d)
            plus = self._loss(run, start, keys, z, 1.0, batch)
            minus = self._loss(run, start, keys, z, -1.0, batch)
            scalars.append((plus - minus) / (2.0 * self.eps))
            losses.append(0.5 * (plus + minus))
        with torch.no_grad():  # back to x exactly: the reply is not a model
            for key in keys:
                state[key].copy_(start[key])
        run.model.train()
        payload = self.coder.encode(np.array(scalars), np.random.default_rng(0))
        run.reply_records[wire.ARRAYS] = array_record(payload)
        run.metrics[wire.TRAIN_LOSS] = float(np.mean(losses))
        run.stop = True


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the seeded projected gradients."""
    quantize = QUANTIZE.read(config)
    coder = compression.LogByte() if quantize == "byte" else compression.Identity()
    return [
        SeededSPSA(SEED.read(config), EPS.read(config), SAMPLES.read(config), coder)
    ]
