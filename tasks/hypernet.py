"""HyperFL's model wrapper: a hypernetwork generates the feature extractor.

Guo, Zeng, Chen, Zhang, Ren, Zhou, Qu, "A New Federated Learning Framework
Against Gradient Inversion Attacks", AAAI 2025, https://arxiv.org/abs/2412.07187
(official code: github.com/Pengxin-Guo/HyperFL).

:class:`HyperModel` holds, in state-dict order, the node's private embedding
``v`` (``embedding``), the shared hypernetwork ``phi`` (``hyper.*``) and the
wrapped model (``base.*``) whose feature-extractor parameters (every parameter
but the classifier's, the module that owns the last state-dict entry) are not
parameters any more: the forward pass uses ``theta = theta_0 + h(v; phi)``,
with ``theta_0`` the base's seeded initial values kept as non-persistent
buffers (never sent, rebuilt from the run seed by both halves). What is left
of ``base.*`` in the state dict is the classifier ``psi`` and the
normalisation statistics: personal, like ``v``.

``h`` is a chunked hypernetwork (von Oswald et al., ICLR 2020): the
feature-extractor entries, flattened in order, are cut into chunks of
``CHUNK`` values; chunk ``c`` is ``W2 relu(W1 [v, e_c] + b1) + b2`` with a
learned chunk embedding ``e_c``. ``phi`` is then the same small size whatever
the model (about 140k values), where the paper's one linear head per target
tensor is larger than the model itself (the spec's pitfall).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

EMBED_DIM = 64
"""Client embedding size (the paper's)."""
HIDDEN_DIM = 128
"""Hypernetwork hidden width (the paper's)."""
CHUNK = 1024
"""Values generated per chunk."""
CHUNK_DIM = 8
"""Chunk embedding size."""


def generated_names(base: nn.Module) -> list[str]:
    """The base's parameters the hypernetwork generates: all but the head's."""
    last = next(reversed(base.state_dict()))
    head = last.rpartition(".")[0]
    prefix = f"{head}." if head else ""
    return [n for n, _ in base.named_parameters() if not n.startswith(prefix)]


class HyperNetwork(nn.Module):
    """``h(v; phi)``: the flat vector of generated values, chunk by chunk."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total = int(total)
        chunks = max(1, math.ceil(self.total / CHUNK))
        self.chunks = nn.Parameter(torch.randn(chunks, CHUNK_DIM))
        self.hidden = nn.Linear(EMBED_DIM + CHUNK_DIM, HIDDEN_DIM)
        self.out = nn.Linear(HIDDEN_DIM, CHUNK)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        rows = torch.cat([v.expand(len(self.chunks), -1), self.chunks], dim=1)
        return self.out(torch.relu(self.hidden(rows))).flatten()[: self.total]


class HyperModel(nn.Module):
    """``base`` whose feature extractor is ``h(v; phi)`` (see the module doc)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        names = generated_names(base)
        shapes = []
        for name in names:
            owner, _, leaf = name.rpartition(".")
            module = base.get_submodule(owner) if owner else base
            value = getattr(module, leaf).detach().clone()
            del module._parameters[leaf]
            module.register_buffer(leaf, value, persistent=False)
            shapes.append(tuple(value.shape))
        self.names, self.shapes = tuple(names), tuple(shapes)
        self.sizes = tuple(math.prod(s) for s in shapes)
        # Registered first: the state dict's last entry stays the classifier's.
        self.embedding = nn.Parameter(torch.randn(EMBED_DIM))
        self.hyper = HyperNetwork(sum(self.sizes))
        self.base = base

    def generated(self) -> dict[str, torch.Tensor]:
        """``theta = h(v; phi)``, by the base's parameter names."""
        flat = self.hyper(self.embedding)
        theta, offset = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes, strict=True):
            theta[name] = flat[offset : offset + size].view(shape)
            offset += size
        return theta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, self.generated(), (x,), strict=False)
