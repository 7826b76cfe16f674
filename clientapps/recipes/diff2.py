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
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F  # noqa: N812

from bouquet.clientapps.bounds import NORM_MAX, RATE_MAX, Bound, ConfigError
from bouquet.clientapps.hooks import (
    FreezeBatchNorm,
    Hook,
    model_shaped_record,
    parameter_names,
)
from bouquet.clientapps.loop import LocalRun
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


Term = tuple[str, torch.Tensor, torch.Tensor | None, tuple[int, ...]]
"""One parameter's per-example gradients: ``("dense", T, None, shape)`` with
``T[i]`` example ``i``'s gradient, or ``("outer", G, A, shape)`` with example
``i``'s gradient ``G_i^T A_i`` (``G``: ``(B, L, O)``, ``A``: ``(B, L, I)``),
never materialised."""


def per_example_terms(
    run: LocalRun, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> dict[str, Term]:
    """``grad l(params; z_i)`` for every example of ``(x, y)``, by parameter.

    Models made of Linear, Conv2d and (eval-mode) BatchNorm layers take the
    fast path (:func:`_layer_terms`, one backward pass, weight gradients kept
    as factors); any other model ``torch.func.vmap`` (exact for every model,
    slow for convolutions on a CPU).
    """
    if _layered(run.model):
        return _layer_terms(run, params, x, y)
    buffers = dict(run.model.named_buffers())

    def loss(
        p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
    ) -> torch.Tensor:
        logits = functional_call(run.model, (p, buffers), (xi[None],))
        return run.loss_fn(logits, yi[None], run)

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {k: ("dense", g, None, tuple(g.shape[1:])) for k, g in grads.items()}


def inner(a: Term, b: Term) -> torch.Tensor:
    """Per example, the inner product of two terms' gradients (``(B,)``).

    For factors, ``<G^T A, G'^T A'> = sum_lm (G G'^T)_lm (A A'^T)_lm``.
    """
    if a[0] == "dense":
        return (a[1] * b[1]).flatten(1).sum(1)
    grams = torch.einsum("blo,bmo->blm", a[1], b[1])
    return (grams * torch.einsum("bli,bmi->blm", a[2], b[2])).sum((1, 2))


def weighted(term: Term, factors: torch.Tensor) -> torch.Tensor:
    """``sum_i f_i g_i``, shaped like the parameter."""
    kind, first, second, shape = term
    if kind == "dense":
        return torch.einsum("b,b...->...", factors, first)
    return torch.einsum("b,blo,bli->oi", factors, first, second).reshape(shape)


def clipped_sum(
    now: dict[str, Term], before: dict[str, Term] | None, clip: float
) -> dict[str, torch.Tensor]:
    """``sum_i min(1, clip / ||d_i||) d_i``, ``d_i = g_i(now) - g_i(before)``.

    The norm is over every parameter of example ``i``; ``before`` None: the
    gradients themselves.
    """
    squares = sum(inner(t, t) for t in now.values())
    if before is not None:
        for key, t in now.items():
            squares = (
                squares + inner(before[key], before[key]) - 2 * inner(t, before[key])
            )
    norms = squares.clamp_min(0).sqrt()
    factors = torch.where(
        norms > clip, clip / norms.clamp_min(1e-30), torch.ones_like(norms)
    )
    total = {k: weighted(t, factors) for k, t in now.items()}
    if before is not None:
        total = {k: v - weighted(before[k], factors) for k, v in total.items()}
    return total


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _layered(model: nn.Module) -> bool:
    """Every parameter belongs to a layer :func:`_layer_terms` handles."""
    for module in model.modules():
        if not list(module.parameters(recurse=False)):
            continue
        if isinstance(module, nn.Linear):
            continue
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            continue
        if isinstance(module, _BATCH_NORMS) and not module.training:
            if module.track_running_stats:
                continue
        return False
    return True


def _layer_terms(
    run: LocalRun, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> dict[str, Term]:
    """Per-example gradients from each layer's input and output gradient.

    ``sum_i l_i`` is backpropagated once; for example ``i`` a Linear layer's
    weight gradient is ``G_i^T A_i`` (output gradients and inputs over the
    positions ``L``), a convolution's the same over the unfolded input, an
    eval-mode BatchNorm's ``sum g_i x_hat_i`` (the approach of Opacus' grad
    samplers, with the norms of ghost clipping).
    """
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    layers = {
        name: m
        for name, m in run.model.named_modules()
        if list(m.parameters(recurse=False))
    }
    for name, module in layers.items():

        def keep(
            mod: nn.Module, args: Any, out: torch.Tensor, name: str = name
        ) -> None:
            inputs[name] = args[0].detach()
            out.retain_grad()
            outputs[name] = out

        handles.append(module.register_forward_hook(keep))
    try:
        buffers = dict(run.model.named_buffers())
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        logits = functional_call(run.model, (leaves, buffers), (x,))
        losses = vmap(lambda lg, t: run.loss_fn(lg[None], t[None], run))(logits, y)
        losses.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    terms: dict[str, Term] = {}
    for name, module in layers.items():
        a, g = inputs[name], outputs[name].grad
        prefix = f"{name}." if name else ""
        batch = len(g)
        if isinstance(module, nn.Linear):
            factors = g.reshape(batch, -1, g.shape[-1])
            terms[f"{prefix}weight"] = (
                "outer",
                factors,
                a.reshape(batch, -1, a.shape[-1]),
                tuple(module.weight.shape),
            )
            bias = factors.sum(1)
        elif isinstance(module, nn.Conv2d):
            cols = F.unfold(
                a,
                module.kernel_size,
                dilation=module.dilation,
                padding=module.padding,
                stride=module.stride,
            )
            factors = g.reshape(batch, g.shape[1], -1).transpose(1, 2)
            terms[f"{prefix}weight"] = (
                "outer",
                factors,
                cols.transpose(1, 2),
                tuple(module.weight.shape),
            )
            bias = factors.sum(1)
        else:  # eval-mode BatchNorm: x_hat from the running statistics
            shape = (1, -1) + (1,) * (a.dim() - 2)
            mean = module.running_mean.view(shape)
            std = (module.running_var.view(shape) + module.eps).sqrt()
            per = g.reshape(batch, g.shape[1], -1)
            x_hat = ((a - mean) / std).reshape(per.shape)
            weight = (per * x_hat).sum(2)
            terms[f"{prefix}weight"] = ("dense", weight, None, tuple(weight.shape[1:]))
            bias = per.sum(2)
        if module.bias is not None:
            terms[f"{prefix}bias"] = ("dense", bias, None, tuple(bias.shape[1:]))
    return {k: terms[k] for k in params}


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
