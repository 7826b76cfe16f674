"""pFedGate's model wrapper: a gating layer that picks a sparse sub-model per batch.

Chen, Li, Zhang, Ding, Li, "Efficient Personalized Federated Learning via Sparse
Model-Adaptation", ICML 2023, https://arxiv.org/abs/2305.02776 (official code:
github.com/yxdyc/pFedGate, ``models/gating_layers.py``, ``pFedGate/gated_learner.py``).

:class:`GatedModel` holds the gating layer first (``gate.*``, the node's personal
entries) and the wrapped model second (``base.*``, shared), so ``"head"`` still
names the wrapped model's classifier. Every parameter tensor of the base model
is cut into at most ``split`` contiguous sub-blocks (:class:`BlockLayout`); for a
batch ``x`` the gate scores every block, ``g = mean_batch sigmoid(BN(W flat(x)))``;
a greedy knapsack keeps the blocks of highest integer value ``round(10 max(g,
s_min))``, ``s_min = min(max(1/split, 0.1), s)``, within ``s`` of the parameters
(:func:`select_blocks`), and the forward pass runs the base model with every
kept block scaled by its score and every dropped block zeroed.

``sparse_factor`` (a buffer, hence personal) is the node's budget ``s``; its
value 0, the server's copy, switches the gate off: the model is then the dense
shared model (what the server evaluates centrally, and what a node that never
trained evaluates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional

GATE_SPLIT = 5
"""Sub-blocks per parameter tensor of the models the factory wraps (the
official README's ``fine_grained_block_split``)."""

SCORE_SCALE = 10
"""Gate scores are ranked as the integers ``round(10 g)`` (official code)."""


@dataclass(frozen=True)
class BlockLayout:
    """Where every sub-block of every parameter tensor lies.

    Attributes
    ----------
    names : tuple of str
        The base model's parameter names, in ``named_parameters`` order.
    sizes : tuple of int
        Element count of every block, parameter after parameter.
    bounds : tuple of (int, int)
        Per parameter, its first block and one past its last.
    linear : tuple of bool
        Per block, whether its parameter belongs to an ``nn.Linear``.
    first : tuple of bool
        Per block, whether it is its parameter's first (never dropped).

    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    bounds: tuple[tuple[int, int], ...]
    linear: tuple[bool, ...]
    first: tuple[bool, ...]

    @classmethod
    def of(cls, model: nn.Module, split: int) -> BlockLayout:
        """Blocks of ``model``: as the official code cuts them (ceil-sized)."""
        if split < 1:
            raise ValueError(f"split must be >= 1; got {split}.")
        linear_params = {
            id(p)
            for m in model.modules()
            if isinstance(m, nn.Linear)
            for p in m.parameters(recurse=False)
        }
        names, sizes, bounds, linear, first = [], [], [], [], []
        for name, param in model.named_parameters():
            n = param.numel()
            size = math.ceil(n / min(split, n))
            count = math.ceil(n / size)
            start = len(sizes)
            sizes += [size] * (count - 1) + [n - (count - 1) * size]
            bounds.append((start, len(sizes)))
            linear += [id(param) in linear_params] * count
            first += [True] + [False] * (count - 1)
            names.append(name)
        return cls(
            tuple(names), tuple(sizes), tuple(bounds), tuple(linear), tuple(first)
        )


def select_blocks(
    scores: np.ndarray, layout: BlockLayout, sparse_factor: float, min_score: float
) -> np.ndarray:
    """The 0/1 mask of kept blocks: pFedGate's greedy block-wise knapsack.

    Separately for the blocks of linear layers and for the others, the blocks
    other than each tensor's first compete for a capacity of
    ``round(their size * (s - s_min))`` elements; taken in decreasing order of
    ``round(10 g)`` (value, not value per element, as the official code), each
    fits or is dropped. First blocks are always kept.
    """
    sizes = np.asarray(layout.sizes, dtype=np.int64)
    values = np.around(np.asarray(scores, dtype=np.float64) * SCORE_SCALE)
    mask = np.ones(len(sizes))
    for group in (True, False):
        idx = np.array(
            [
                i
                for i, (lin, first) in enumerate(
                    zip(layout.linear, layout.first, strict=True)
                )
                if lin == group and not first
            ],
            dtype=np.int64,
        )
        if not idx.size:
            continue
        capacity = round(float(sizes[idx].sum()) * (sparse_factor - min_score))
        taken = 0
        # A stable sort: ties keep the layout's order on every platform.
        for i in idx[np.argsort(-values[idx], kind="stable")]:
            if taken + sizes[i] <= capacity:
                taken += int(sizes[i])
            else:
                mask[i] = 0.0
    return mask


def min_score(sparse_factor: float, split: int) -> float:
    """``s_min = min(max(1/split, 0.1), s)``: the floor of every gate score."""
    return min(max(1.0 / split, 0.1), sparse_factor)


def gated_weights(
    scores: torch.Tensor, layout: BlockLayout, sparse_factor: float, split: int
) -> torch.Tensor:
    """Per block: its score where kept, 0 where dropped (differentiable).

    As the official code: the blocks are scaled by the raw scores ``g``; the
    knapsack ranks the clipped ``c = max(g, s_min)``, and the kept blocks' 0/1
    mask carries the clipped scores' gradient (a straight-through
    ``1 + c - stop_gradient(c)``), so ``d/dg`` reaches the gate twice. With
    ``s = 1`` every block is kept at its raw score.
    """
    if sparse_factor >= 1.0:
        return scores
    floor = min_score(sparse_factor, split)
    clipped = torch.clamp(scores, min=floor)
    kept = select_blocks(clipped.detach().cpu().numpy(), layout, sparse_factor, floor)
    kept_t = torch.as_tensor(kept, dtype=scores.dtype, device=scores.device)
    return scores * (1.0 + clipped - clipped.detach()) * kept_t


class Gate(nn.Module):
    """Scores of the blocks for a batch: ``mean_batch sigmoid(BN(W flat(x)))``."""

    def __init__(self, input_size: int, num_blocks: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_size, num_blocks)
        self.norm = nn.BatchNorm1d(num_blocks)
        self.register_buffer("sparse_factor", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x.flatten(1))
        # BatchNorm cannot normalise one example by its batch: use the running
        # statistics then (a last batch of one, per-example evaluation).
        train = self.training and len(z) > 1
        z = functional.batch_norm(
            z,
            self.norm.running_mean,
            self.norm.running_var,
            self.norm.weight,
            self.norm.bias,
            training=train,
            momentum=self.norm.momentum,
            eps=self.norm.eps,
        )
        if train:
            self.norm.num_batches_tracked.add_(1)
        return torch.sigmoid(z).mean(dim=0)


class GatedModel(nn.Module):
    """``base`` behind a pFedGate gating layer (see the module docstring).

    Parameters
    ----------
    base : nn.Module
        The model to sparsify (its parameters are shared, the gate's personal).
    input_shape : tuple of int
        Shape of one example (the gate reads the flattened raw input).
    split : int
        Sub-blocks per parameter tensor.

    """

    def __init__(
        self, base: nn.Module, input_shape: tuple[int, ...], split: int = GATE_SPLIT
    ) -> None:
        super().__init__()
        self.layout = BlockLayout.of(base, split)
        self.split = split
        # Registered first: the state dict's last entry stays the classifier's.
        self.gate = Gate(math.prod(input_shape), len(self.layout.sizes))
        self.base = base
        self.last_kept = 1.0
        """Share of the base's parameters the last forward pass kept."""

    def block_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per block: its score where kept, 0 where dropped (differentiable)."""
        s = float(self.gate.sparse_factor)
        return gated_weights(self.gate(x), self.layout, s, self.split)

    def adapted_parameters(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """The base's parameters with every block multiplied by its weight."""
        sizes = torch.as_tensor(self.layout.sizes, device=weights.device)
        params = dict(self.base.named_parameters())
        adapted = {}
        for name, (begin, end) in zip(
            self.layout.names, self.layout.bounds, strict=True
        ):
            param = params[name]
            scale = torch.repeat_interleave(weights[begin:end], sizes[begin:end])
            adapted[name] = param * scale.view(param.shape)
        return adapted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(self.gate.sparse_factor) <= 0.0:  # the gate is off: dense model
            return self.base(x)
        weights = self.block_weights(x)
        sizes = torch.as_tensor(self.layout.sizes, dtype=torch.float64)
        kept = weights.detach().cpu() != 0
        self.last_kept = float(sizes[kept].sum() / sizes.sum())
        adapted = self.adapted_parameters(weights)
        return functional_call(self.base, adapted, (x,), strict=False)
