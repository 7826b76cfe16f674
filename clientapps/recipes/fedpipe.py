"""FedPipe client: LoRA at this node's rank on an NF-quantised frozen backbone.

Fang et al., "Automated Federated Pipeline for Parameter-Efficient
Fine-Tuning of Large Language Models", arXiv 2404.06448. The model is built
with ``peft="lora"`` at the run's largest rank ``r_max`` (the padded shape);
this node trains the leading ``fedpipe.rank`` slices only:

- at the start, ``A[r:, :]`` and ``B[:, r:]`` of every adapter are set to
  zero (the server's slices beyond ``r`` are not this node's: FedPipe sends
  each server the slice of its rank), and their gradients are zeroed before
  every step, so they stay zero in the reply;
- with ``fedpipe.quant-bits`` > 0 every frozen weight matrix (2-D or more:
  linear and convolution weights; biases and norms stay full precision, as in
  QLoRA) is replaced by its NormalFloat quantisation
  (:mod:`tasks.normalfloat`) for the round's training and restored at the
  end, so the node's backbone (and its ``frozen-digest``) stays the server's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bouquet.clientapps.bounds import Bound, ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun

NAME = "fedpipe"
RANK = Bound(f"{NAME}.rank", 8, 1, 4096)
QUANT_BITS = Bound(f"{NAME}.quant-bits", 4, 0, 8)
BOUNDS = (RANK, QUANT_BITS)


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


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: rank masking and the simulated NF quantisation."""
    return [RankAndQuantisation(RANK.read(config), QUANT_BITS.read(config))]
