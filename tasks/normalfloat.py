"""NormalFloat (NF) quantisation of frozen weights, simulated in float32.

QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient
Finetuning of Quantized LLMs", NeurIPS 2023, https://arxiv.org/abs/2305.14314,
section 3) stores a frozen weight in blocks of ``block`` values: each block is
divided by its absolute maximum and every value is replaced by the nearest
level of a ``2^bits``-level code whose levels are quantiles of N(0, 1),
scaled to ``[-1, 1]``, with an exact zero. The code is asymmetric: ``2^(b-1)``
positive levels from the quantiles ``linspace(delta, 1/2, 2^(b-1) + 1)``
(the last, 1/2, dropped), ``2^(b-1) - 1`` negative ones from
``linspace(delta, 1/2, 2^(b-1))``, and zero, where ``delta = 0.9677``
is QLoRA's outermost quantile ``1 - (1/30 + 1/32) / 2``.

Here the code is applied and undone at once (:func:`quantize_dequantize`):
the weights the model computes with are the NF ones, the memory is not
saved (there are no low-bit kernels on a CPU), as the FedPipe spec says.
"""

from __future__ import annotations

import functools

import torch

NF_OFFSET = 0.9677083
"""QLoRA's outermost quantile (``create_normal_map``'s default offset)."""
NF_BLOCK = 64
"""Values per absmax block (QLoRA's block size for the weights)."""


@functools.cache
def normal_float_code(bits: int) -> torch.Tensor:
    """The ``2^bits`` NF levels in ``[-1, 1]``, sorted (NF4: ``bits = 4``)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: expected 2..8")
    half = 2 ** (bits - 1)
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(
        torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1]
    )
    negative = -normal.icdf(
        torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1]
    )
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    levels = levels / levels.abs().max()
    return levels.sort().values.to(torch.float32)


def quantize_dequantize(
    weight: torch.Tensor, bits: int, block: int = NF_BLOCK
) -> torch.Tensor:
    """``weight`` through ``bits``-bit NF with blockwise absmax scaling."""
    code = normal_float_code(bits)
    flat = weight.detach().reshape(-1).to(torch.float32)
    pad = (-len(flat)) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block)
    scale = blocks.abs().amax(dim=1, keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    normalised = blocks / safe
    # Nearest level: the code is sorted, so search the midpoints.
    midpoints = (code[1:] + code[:-1]) / 2
    index = torch.bucketize(normalised, midpoints)
    restored = code[index] * scale
    return restored.reshape(-1)[: len(flat)].view_as(weight).to(weight.dtype)
