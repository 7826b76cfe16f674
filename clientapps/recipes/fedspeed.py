"""FedSpeed client: SAM-style perturbed gradient plus the prox-correction.

Sun et al., "FedSpeed: Larger Local Interval, Less Communication Round, and
Higher Generalization Accuracy", ICLR 2023, https://arxiv.org/abs/2302.10429.
Each step, following the official code (FL-Simulator, ``client/fedspeed.py``):

1. :class:`~clientapps.hooks.SharpnessAwareStep`: ``g = (1 - alpha) g1 + alpha g2``
   with ``g2`` the gradient at ``y + rho g1 / ||g1||`` on the same batch;
2. :class:`ProxCorrection`: ``g += lambda (h_i - x^t)``;
3. :class:`~clientapps.hooks.ClipGradNorm` at ``max-grad-norm``;
4. SGD with weight decay ``wd + lambda``, which adds ``(wd + lambda) y`` after the
   clip. Steps 2 and 4 together are ``lambda (y - x^t) + lambda h_i + wd y``.

``h_i`` (the sum of this client's past updates ``Delta = y_K - x^t``, zero at
first) lives in ``Context.state`` under ``fedspeed.h``, over the trainable
parameters only. Config keys read: ``fedspeed.rho``, ``fedspeed.lambda``,
``fedspeed.alpha``, ``fedspeed.max-grad-norm``, ``fedspeed.server-rule``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from bouquet.clientapps.bounds import NORM_MAX, RATE_MAX, Bound
from bouquet.clientapps.hooks import ClipGradNorm, Hook, SharpnessAwareStep
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.state import load_arrays, save_arrays
from bouquet.tasks.wire import algorithm_key

NAMESPACE = "fedspeed"
RHO = Bound(algorithm_key(NAMESPACE, "rho"), 0.0, 0.0, RATE_MAX)
ALPHA = Bound(algorithm_key(NAMESPACE, "alpha"), 1.0, 0.0, 1.0)
LAMBDA = Bound(algorithm_key(NAMESPACE, "lambda"), 0.0, 0.0, RATE_MAX)
MAX_GRAD_NORM = Bound(algorithm_key(NAMESPACE, "max-grad-norm"), 0.0, 0.0, NORM_MAX)
SERVER_RULE = Bound(
    algorithm_key(NAMESPACE, "server-rule"),
    "all-clients",
    choices=("all-clients", "sampled"),
)
BOUNDS = (RHO, ALPHA, LAMBDA, MAX_GRAD_NORM, SERVER_RULE)


def _names(run: LocalRun) -> list[str]:
    # run.parameters is model.parameters() filtered on requires_grad, in order.
    return [n for n, p in run.model.named_parameters() if p.requires_grad]


class ProxCorrection(Hook):
    """FedSpeed's prox term and dual correction, with ``h_i`` in client state.

    Parameters
    ----------
    lambda_ : float
        Prox / correction coefficient; 0 turns the whole mechanism off (no
        term, no weight-decay increase, ``h_i`` untouched).
    send_corrected : bool
        Reply with ``y + h_i`` instead of ``y`` (the paper's server rule,
        ``server-rule = "sampled"``).

    """

    fixed_optimizer = True

    def __init__(self, lambda_: float, send_corrected: bool = False) -> None:
        self.lambda_ = float(lambda_)
        self.send_corrected = send_corrected
        self._h: list[torch.Tensor] = []
        self._correction: list[torch.Tensor] = []

    def setup(self, run: LocalRun) -> None:
        if self.lambda_ == 0.0:
            return
        saved = load_arrays(run.state, NAMESPACE, "h") or {}
        self._h = [
            torch.zeros_like(x)
            if name not in saved
            else torch.as_tensor(saved[name]).to(x)
            for name, x in zip(_names(run), run.global_parameters, strict=True)
        ]
        # h_i - x^t: the slope of the linear loss term lambda <y, h_i - x^t>.
        self._correction = [
            h - x for h, x in zip(self._h, run.global_parameters, strict=True)
        ]
        for group in run.optimizer.param_groups:
            # The official code folds lambda (y - x^t)'s "lambda y" into SGD's
            # weight decay, which torch applies after the gradient clip.
            group["weight_decay"] += self.lambda_

    def before_step(self, run: LocalRun) -> None:
        if self.lambda_ == 0.0:
            return
        for p, c in zip(run.parameters, self._correction, strict=True):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(c, alpha=self.lambda_)

    def finish(self, run: LocalRun) -> None:
        if self.lambda_ == 0.0:
            return
        h: dict[str, Any] = {}
        with torch.no_grad():
            for name, p, x, h_old in zip(
                _names(run), run.parameters, run.global_parameters, self._h, strict=True
            ):
                h_new = h_old + (p - x)  # h_i + Delta_i
                h[name] = h_new.detach().cpu().numpy()
                if self.send_corrected:
                    p.add_(h_new)
        save_arrays(run.state, NAMESPACE, "h", h)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """SAM step, prox-correction, then the gradient clip (order matters)."""
    return [
        SharpnessAwareStep(RHO.read(config), ALPHA.read(config)),
        ProxCorrection(
            LAMBDA.read(config),
            send_corrected=SERVER_RULE.read(config) == "sampled",
        ),
        ClipGradNorm(MAX_GRAD_NORM.read(config)),
    ]
