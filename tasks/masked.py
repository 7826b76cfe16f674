"""FED-PUB's ``masked`` wrapper: every linear weight times a learnable mask.

Baek et al., "Personalized Subgraph Federated Learning", ICML 2023,
https://arxiv.org/abs/2206.10206. Each ``nn.Linear`` of the run's model
becomes a :class:`MaskedLinear` in place (same names, so ``head`` and the
model's own methods are unchanged) with two more state-dict entries:

- ``<layer>.mask``: a parameter shaped like the weight, all ones at first
  (the released scripts' ``laye_mask_one`` / ``clsf_mask_one``); the layer
  uses ``weight * mask``;
- ``<layer>.prune_below``: a 0-d buffer; in eval mode mask entries with
  ``|m| < prune_below`` count as 0 (the official ``l1`` threshold). 0, the
  server's copy, prunes nothing.

Both are the node's own (FED-PUB makes them personal parameters).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

MASK_ENTRIES = ("*.mask", "*.prune_below")
"""State-dict patterns of the masks and their thresholds."""


class MaskedLinear(nn.Linear):
    """``nn.Linear`` with ``weight * mask`` (pruned below a threshold in eval)."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__(
            layer.in_features, layer.out_features, bias=layer.bias is not None
        )
        with torch.no_grad():
            self.weight.copy_(layer.weight)
            if layer.bias is not None:
                self.bias.copy_(layer.bias)
        self.mask = nn.Parameter(torch.ones_like(layer.weight))
        self.register_buffer("prune_below", torch.zeros(()))

    def effective_mask(self) -> torch.Tensor:
        """The mask the forward pass uses: pruned in eval mode only."""
        if self.training:
            return self.mask
        return self.mask.masked_fill(self.mask.abs() < self.prune_below, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, self.weight * self.effective_mask(), self.bias)


def mask_linears(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.Linear`` replaced by a :class:`MaskedLinear`."""
    for name, child in list(model.named_children()):
        if type(child) is nn.Linear:
            setattr(model, name, MaskedLinear(child))
        else:
            mask_linears(child)
    return model


def masked_layers(model: nn.Module) -> list[MaskedLinear]:
    """The model's masked layers, in module order."""
    return [m for m in model.modules() if isinstance(m, MaskedLinear)]
