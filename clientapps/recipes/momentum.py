"""Clients of SCAFFOLD, FedAvg-M, SCAFFOLD-M and the -VR variants.

See :mod:`strategies.momentum` for the papers and the server rule. Three hooks,
composed in this order (the order matters: the momentum weight beta scales the
already corrected gradient, as in SCAFFOLD-M):

- :class:`ControlVariate` (``momentum.scaffold``): ``grad += c - c_i``; at the
  end ``c_i+ = c_i - c + (x - y_K) / (K eta)`` is saved in ``Context.state``
  and ``dc = c_i+ - c_i`` is sent back as record ``momentum.dc``.
- :class:`GlobalMomentum` (beta < 1, not -VR):
  ``grad <- beta * grad + (1 - beta) * g``.
- :class:`StormMomentum` (``momentum.vr``): each step also evaluates the
  gradient at ``x^{r-1}`` on the same batch and uses
  ``grad + (1 - beta) * (g - grad(x^{r-1}))``.

Without ``momentum.g`` (round 1) the momentum hooks leave the gradient as is.
Every hook reports ``momentum.eta-k`` (eta times the steps taken) so that the
server can put g in gradient units.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from bouquet.clientapps.bounds import Bound
from bouquet.clientapps.hooks import Hook, model_shaped_record, parameter_names
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.state import load_arrays, save_arrays

NAMESPACE = "momentum"
BETA = f"{NAMESPACE}.beta"
USE_SCAFFOLD = f"{NAMESPACE}.scaffold"
USE_VR = f"{NAMESPACE}.vr"
C_RECORD = f"{NAMESPACE}.c"
G_RECORD = f"{NAMESPACE}.g"
X_PREV_RECORD = f"{NAMESPACE}.x-prev"
DC_RECORD = f"{NAMESPACE}.dc"
ETA_K = f"{NAMESPACE}.eta-k"
BETA_BOUND = Bound(BETA, 1.0, 0.0, 1.0, low_open=True)
SCAFFOLD_BOUND = Bound(USE_SCAFFOLD, False)
VR_BOUND = Bound(USE_VR, False)
BOUNDS = (BETA_BOUND, SCAFFOLD_BOUND, VR_BOUND)


def _tensors(run: LocalRun, name: str) -> list[torch.Tensor] | None:
    """Record ``name`` of the message as tensors aligned with the parameters."""
    record = run.incoming.get(name)
    if record is None:
        return None
    arrays = {k: v.numpy() for k, v in record.items()}
    return [
        torch.as_tensor(arrays[n], dtype=p.dtype, device=p.device)
        for n, p in zip(parameter_names(run), run.parameters, strict=True)
    ]


def _report_eta_k(run: LocalRun) -> None:
    run.metrics[ETA_K] = run.settings.lr * run.steps


class EtaK(Hook):
    """Only reports ``momentum.eta-k`` (plain FedAvg client: beta = 1)."""

    fixed_optimizer = True

    def finish(self, run: LocalRun) -> None:
        _report_eta_k(run)


class ControlVariate(Hook):
    """SCAFFOLD's drift correction with the client control variate c_i."""

    fixed_optimizer = True

    reads = (C_RECORD,)

    def setup(self, run: LocalRun) -> None:
        names = parameter_names(run)
        zeros = [torch.zeros_like(p) for p in run.parameters]
        self.c = _tensors(run, C_RECORD) or zeros
        saved = load_arrays(run.state, NAMESPACE, "c-i") or {}
        self.c_i = [
            torch.as_tensor(saved[n], dtype=p.dtype, device=p.device)
            if n in saved
            else torch.zeros_like(p)
            for n, p in zip(names, run.parameters, strict=True)
        ]
        self.shift = [c - ci for c, ci in zip(self.c, self.c_i, strict=True)]

    def before_step(self, run: LocalRun) -> None:
        for p, shift in zip(run.parameters, self.shift, strict=True):
            if p.grad is not None:
                p.grad.add_(shift)

    def finish(self, run: LocalRun) -> None:
        _report_eta_k(run)
        names = parameter_names(run)
        new_c_i = list(self.c_i)
        # Option II divides by K lr: with no step, or lr 0, c_i stays.
        if run.steps and run.settings.lr > 0:
            scale = 1.0 / (run.steps * run.settings.lr)
            new_c_i = [
                ci - c + scale * (x - p.detach())
                for ci, c, x, p in zip(
                    self.c_i, self.c, run.global_parameters, run.parameters, strict=True
                )
            ]
        save_arrays(
            run.state,
            NAMESPACE,
            "c-i",
            {n: t.cpu().numpy() for n, t in zip(names, new_c_i, strict=True)},
        )
        dc = {
            n: (new - old).cpu().numpy()
            for n, new, old in zip(names, new_c_i, self.c_i, strict=True)
        }
        # Every state-dict entry, buffers as zeros, so that dc validates like
        # the model arrays on the server.
        run.reply_records[DC_RECORD] = model_shaped_record(run, dc)


class GlobalMomentum(Hook):
    """FedAvg-M / SCAFFOLD-M: ``grad <- beta * grad + (1 - beta) * g``."""

    fixed_optimizer = True

    reads = (G_RECORD,)

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    def setup(self, run: LocalRun) -> None:
        self.g = _tensors(run, G_RECORD)

    def before_step(self, run: LocalRun) -> None:
        if self.g is None:
            return
        for p, g in zip(run.parameters, self.g, strict=True):
            if p.grad is not None:
                p.grad.mul_(self.beta).add_(g, alpha=1.0 - self.beta)

    def finish(self, run: LocalRun) -> None:
        _report_eta_k(run)


class StormMomentum(Hook):
    """-VR: ``grad + (1 - beta) * (g - grad(x^{r-1}; same batch))``.

    Takes over the step to evaluate the gradient at ``x^{r-1}`` first; the
    model's buffers (BatchNorm statistics) are restored afterwards, so the
    extra forward pass leaves no trace.
    """

    fixed_optimizer = True

    reads = (G_RECORD, X_PREV_RECORD)

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    def setup(self, run: LocalRun) -> None:
        self.g = _tensors(run, G_RECORD)
        self.x_prev = _tensors(run, X_PREV_RECORD)
        self.previous_grads: list[torch.Tensor | None] = []

    def step(
        self,
        run: LocalRun,
        closure: Callable[[], torch.Tensor],
        default_step: Callable[[], None],
    ) -> torch.Tensor | None:
        if self.g is None or self.x_prev is None:
            return None
        current = [p.detach().clone() for p in run.parameters]
        buffers = {k: b.clone() for k, b in run.model.named_buffers()}
        with torch.no_grad():
            for p, x in zip(run.parameters, self.x_prev, strict=True):
                p.copy_(x)
        closure()
        self.previous_grads = [
            None if p.grad is None else p.grad.detach().clone() for p in run.parameters
        ]
        with torch.no_grad():
            for p, y in zip(run.parameters, current, strict=True):
                p.copy_(y)
            for k, b in run.model.named_buffers():
                b.copy_(buffers[k])
        loss = closure()
        default_step()
        return loss

    def before_step(self, run: LocalRun) -> None:
        if self.g is None or not self.previous_grads:
            return
        for p, g, prev in zip(run.parameters, self.g, self.previous_grads, strict=True):
            if p.grad is not None:
                correction = g if prev is None else g - prev
                p.grad.add_(correction, alpha=1.0 - self.beta)

    def finish(self, run: LocalRun) -> None:
        _report_eta_k(run)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """Hooks for the config keys ``momentum.scaffold``, ``.vr`` and ``.beta``."""
    beta = BETA_BOUND.read(config)
    scaffold, vr = SCAFFOLD_BOUND.read(config), VR_BOUND.read(config)
    hooks: list[Hook] = []
    if scaffold:
        hooks.append(ControlVariate())
    if vr:
        hooks.append(StormMomentum(beta))
    elif beta < 1.0:
        hooks.append(GlobalMomentum(beta))
    if not hooks:
        hooks.append(EtaK())
    return hooks
