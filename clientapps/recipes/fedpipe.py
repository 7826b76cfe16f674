"""FedPipe client: LoRA at this node's rank on an NF-quantised frozen backbone.

Fang et al., "Automated Federated Pipeline for Parameter-Efficient
Fine-Tuning of Large Language Models", arXiv 2404.06448. The model is built
with ``peft="lora"`` at the run's largest rank ``r_max``; the message
carries only the adapters this node trains, cut to its rank, and the reply
goes back in those shapes (``PARTIAL_ARRAYS``, :mod:`clientapps.partial`:
what was not sent is zero here). This node trains the leading
``fedpipe.rank`` slices only:

- at the start, ``A[r:, :]`` and ``B[:, r:]`` of every adapter are zero, and
  their gradients are zeroed before every step, so they stay zero; an
  adapter not sent is zero in both factors, so it has no gradient;
- before every step, each adapter's AdaLoRA sensitivity ``I = |theta grad|``
  (per entry, over its ``A`` and ``B``) updates ``I_bar <- beta1 I_bar +
  (1 - beta1) I`` and ``U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|``;
  the reply's record ``fedpipe.importance`` holds, per adapter in model
  order, the mean of ``I_bar U_bar`` over its entries within the rank, as a
  share of the node's total (bounded, comparable across nodes);
- with ``fedpipe.quant-bits`` > 0 every frozen weight matrix (2-D or more:
  linear and convolution weights; biases and norms stay full precision, as in
  QLoRA) is replaced by its NormalFloat quantisation
  (:mod:`tasks.normalfloat`) for the round's training and restored at the
  end, so the node's backbone (and its ``frozen-digest``) stays the server's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bouquet.clientapps.bounds import Bound, ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun
from bouquet.tasks.arrays import array_record

NAME = "fedpipe"
RANK = Bound(f"{NAME}.rank", 8, 1, 4096)
QUANT_BITS = Bound(f"{NAME}.quant-bits", 4, 0, 8)
BETA1 = Bound(f"{NAME}.importance-beta1", 0.85, 0.0, 1.0, high_open=True)
BETA2 = Bound(f"{NAME}.importance-beta2", 0.85, 0.0, 1.0, high_open=True)
BOUNDS = (RANK, QUANT_BITS, BETA1, BETA2)
PARTIAL_ARRAYS = True
IMPORTANCE = f"{NAME}.importance"
SCORES = "scores"


def rank_slices(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, int]]:
    """Every LoRA factor with the dimension that indexes its rank (A: 0, B: 1)."""
    found = []
    for name, parameter in model.named_parameters():
        if ".lora_A." in name:
            found.append((parameter, 0))
        elif ".lora_B." in name:
            found.append((parameter, 1))
    return found


class RankAndQuantisation(Hook):
    """Train the leading ``rank`` LoRA slices on an NF-quantised backbone."""

    def __init__(self, rank: int, bits: int) -> None:
        if bits == 1:
            raise ConfigError(QUANT_BITS.key, bits, "0 (off) or 2..8")
        self.rank, self.bits = int(rank), int(bits)
        self.factors: list[tuple[torch.nn.Parameter, int]] = []
        self.originals: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, run: LocalRun) -> None:
        from bouquet.tasks.normalfloat import quantize_dequantize

        self.factors = rank_slices(run.model)
        if not self.factors:
            raise ConfigError("peft", "none", "'lora' (fedpipe trains LoRA factors)")
        with torch.no_grad():
            for parameter, dim in self.factors:
                extra = parameter.shape[dim] - self.rank
                if extra > 0:
                    parameter.narrow(dim, self.rank, extra).zero_()
            self.originals = []
            if self.bits:
                for parameter in run.model.parameters():
                    if not parameter.requires_grad and parameter.dim() >= 2:
                        self.originals.append((parameter, parameter.detach().clone()))
                        parameter.copy_(quantize_dequantize(parameter, self.bits))

    def before_step(self, run: LocalRun) -> None:
        for parameter, dim in self.factors:
            extra = parameter.shape[dim] - self.rank
            if parameter.grad is not None and extra > 0:
                parameter.grad.narrow(dim, self.rank, extra).zero_()

    def finish(self, run: LocalRun) -> None:
        with torch.no_grad():
            for parameter, original in self.originals:
                parameter.copy_(original)
        self.originals = []


class Importance(Hook):
    """AdaLoRA's smoothed sensitivity of every adapter, returned as a record."""

    def __init__(self, rank: int, beta1: float, beta2: float) -> None:
        self.rank, self.beta1, self.beta2 = int(rank), float(beta1), float(beta2)
        self.adapters: list[list[tuple[torch.nn.Parameter, int]]] = []
        self.smooth: dict[int, torch.Tensor] = {}
        self.uncertain: dict[int, torch.Tensor] = {}

    def setup(self, run: LocalRun) -> None:
        found: dict[str, list[tuple[torch.nn.Parameter, int]]] = {}
        for name, parameter in run.model.named_parameters():
            for factor, dim in ((".lora_A.", 0), (".lora_B.", 1)):  # the rank's axis
                if factor in name:
                    adapter = name.split(factor)[0]
                    found.setdefault(adapter, []).append((parameter, dim))
        self.adapters = list(found.values())
        self.smooth, self.uncertain = {}, {}

    def before_step(self, run: LocalRun) -> None:
        with torch.no_grad():
            for factors in self.adapters:
                for p, _ in factors:
                    if p.grad is None:
                        continue
                    sensitivity = (p * p.grad).abs()
                    smooth = self.smooth.get(id(p), torch.zeros_like(p))
                    smooth = self.beta1 * smooth + (1 - self.beta1) * sensitivity
                    spread = (sensitivity - smooth).abs()
                    uncertain = self.uncertain.get(id(p), torch.zeros_like(p))
                    self.uncertain[id(p)] = (
                        self.beta2 * uncertain + (1 - self.beta2) * spread
                    )
                    self.smooth[id(p)] = smooth

    def finish(self, run: LocalRun) -> None:
        scores = np.zeros(len(self.adapters), dtype=np.float32)
        for i, factors in enumerate(self.adapters):
            total, count = 0.0, 0
            for p, dim in factors:
                if id(p) not in self.smooth:
                    continue
                score = self.smooth[id(p)] * self.uncertain[id(p)]
                score = score.narrow(dim, 0, min(self.rank, p.shape[dim]))
                total += float(score.sum())
                count += score.numel()
            scores[i] = total / count if count else 0.0
        # Shares of this node's total: bounded, and comparable across nodes
        # whose losses (so gradients) differ in scale.
        scores = np.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
        if scores.sum() > 0:
            scores = (scores / scores.sum()).astype(np.float32)
        run.reply_records[IMPORTANCE] = array_record({SCORES: scores})


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """Rank masking with the simulated NF quantisation; the importance scores."""
    rank = RANK.read(config)
    return [
        RankAndQuantisation(rank, QUANT_BITS.read(config)),
        Importance(rank, BETA1.read(config), BETA2.read(config)),
    ]
