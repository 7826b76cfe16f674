"""Per-example gradients, and their clipped sums, for differential privacy.

Shared by DIFF2's client (:mod:`clientapps.recipes.diff2`) and DP-SGD
(:mod:`clientapps.privacy`). Models made of Linear, Conv2d and eval-mode
BatchNorm layers take a fast path: one backward pass of ``sum_i l_i`` with
each layer's inputs and output gradients kept, a weight's per-example
gradient kept as the factors ``G_i^T A_i`` and never materialised (Opacus'
grad samplers, with the norms of ghost clipping); any other model goes
through ``torch.func.vmap`` (exact for every model, slow for convolutions on
a CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F  # noqa: N812

from bouquet.clientapps.loop import LocalRun

ExampleLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(logits, x, y) -> loss`` of one example (each a batch of one)."""


def _loop_loss(run: LocalRun) -> ExampleLoss:
    return lambda logits, _x, y: run.loss_fn(logits, y, run)


Term = tuple[str, torch.Tensor, torch.Tensor | None, tuple[int, ...]]
"""One parameter's per-example gradients: ``("dense", T, None, shape)`` with
``T[i]`` example ``i``'s gradient, or ``("outer", G, A, shape)`` with example
``i``'s gradient ``G_i^T A_i`` (``G``: ``(B, L, O)``, ``A``: ``(B, L, I)``),
never materialised."""


def per_example_terms(
    run: LocalRun,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss: ExampleLoss | None = None,
) -> dict[str, Term]:
    """``grad l(params; z_i)`` for every example of ``(x, y)``, by parameter.

    ``loss(logits_i, x_i, y_i)`` is one example's loss, each argument a
    batch of one (default: the loop's loss, ``run.loss_fn``); it must be a
    function of the logits (and data) only, as it is ``vmap``-ed.

    Models made of Linear, Conv2d and (eval-mode) BatchNorm layers take the
    fast path (:func:`_layer_terms`, one backward pass, weight gradients kept
    as factors); any other model ``torch.func.vmap`` (exact for every model,
    slow for convolutions on a CPU).
    """
    one = loss or _loop_loss(run)
    if layered(run.model):
        return _layer_terms(run, params, x, y, one)
    buffers = dict(run.model.named_buffers())

    def example_loss(
        p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
    ) -> torch.Tensor:
        logits = functional_call(run.model, (p, buffers), (xi[None],))
        return one(logits, xi[None], yi[None])

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
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


def layered(model: nn.Module) -> bool:
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
    run: LocalRun,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss: ExampleLoss | None = None,
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
        one = loss or _loop_loss(run)
        losses = vmap(lambda lg, xi, t: one(lg[None], xi[None], t[None]))(logits, x, y)
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
