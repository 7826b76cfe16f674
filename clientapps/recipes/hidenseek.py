"""HideNseek client: train a sign supermask over frozen magnitudes.

Vallapuram et al., "HideNseek: Federated Lottery Ticket via Server-side
Pruning and Sign Supermask", arXiv 2022, https://arxiv.org/abs/2206.04385.
See ``strategies/hidenseek.py``.

:class:`SignSupermask` takes over the loop's step: after the forward and
backward pass, every sign-masked weight ``w = |w_0| sign(s)`` moves its
score by the straight-through estimator, ``s <- s - lr |w_0| grad_w``, and
is reset to ``|w_0| sign(s)`` (pruned weights, ``w_0 = 0``, stay 0); other
entries are restored to the received values at the end (frozen). The reply
is ``sign(s)`` over the kept weights, one bit each; ``|s|`` stays in
``Context.state`` (``hidenseek.scores``). Config keys read:
``hidenseek.score-init``, ``hidenseek.mask``.

With ``hidenseek.mask = "binary"`` (the {0,1} supermask baseline) the weight
is ``theta_0 [s >= 0]`` over the pruned initial weights ``theta_0 P`` that
the message carries (record ``hidenseek.init``: a dropped weight is 0 in the
model), the step is ``s <- s - lr theta_0 grad_w`` (the same estimator with
``d[s >= 0]/ds := 1``), scores start positive where the received model keeps
the weight, and the reply bit is 1 for a kept weight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from bouquet.clientapps.bounds import RATE_MAX, Bound, ConfigError
from bouquet.clientapps.hooks import Hook, parameter_names
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.state import array_record, load_arrays, save_arrays
from bouquet.tasks import wire

NAMESPACE = "hidenseek"
SCORE_INIT = Bound(
    wire.algorithm_key(NAMESPACE, "score-init"), 1e-4, 0.0, RATE_MAX, low_open=True
)
MASK = Bound(wire.algorithm_key(NAMESPACE, "mask"), "sign", choices=("sign", "binary"))
INIT = wire.algorithm_key(NAMESPACE, "init")
BOUNDS = (SCORE_INIT, MASK)


class SignSupermask(Hook):
    """Scores by the straight-through estimator; reply with their signs."""

    fixed_optimizer = True

    def __init__(self, score_init: float, binary: bool = False) -> None:
        self.score_init = float(score_init)
        self.binary = bool(binary)
        self.reads = (INIT,) if self.binary else ()

    def setup(self, run: LocalRun) -> None:
        names = parameter_names(run)
        state = run.model.state_dict()
        self.start = {k: v.detach().clone() for k, v in state.items()}
        self.masked = [
            (name, p)
            for name, p in zip(names, run.parameters, strict=True)
            if name not in run.personal and p.dim() >= 2 and p.is_floating_point()
        ]
        if self.binary:  # w = theta_0 [s >= 0]: the "magnitude" keeps its sign
            if INIT not in run.incoming:
                raise ConfigError(INIT, None, "present with binary masks")
            init = run.incoming[INIT]
            self.magnitude = {
                name: torch.as_tensor(init[name].numpy(), dtype=p.dtype).clone()
                for name, p in self.masked
            }
        else:
            self.magnitude = {name: p.detach().abs().clone() for name, p in self.masked}
        flat = torch.cat([self.magnitude[n].reshape(-1) for n, _ in self.masked])
        saved = (load_arrays(run.state, NAMESPACE, "scores") or {}).get("scores")
        size = int(flat.numel())
        if saved is None or saved.shape != (size,):
            saved = np.full(size, self.score_init)
        scores, offset = {}, 0
        for name, p in self.masked:
            n = p.numel()
            part = torch.as_tensor(saved[offset : offset + n], dtype=torch.float64)
            off = p.detach() == 0 if self.binary else p.detach() < 0
            scores[name] = part.reshape(p.shape) * torch.where(off, -1.0, 1.0).to(
                torch.float64
            )
            offset += n
        self.scores = scores

    def step(
        self,
        run: LocalRun,
        closure: Callable[[], torch.Tensor],
        default_step: Callable[[], None],
    ) -> torch.Tensor | None:
        loss = closure()
        lr = run.settings.lr
        with torch.no_grad():
            for name, p in self.masked:
                if p.grad is None:
                    continue
                a = self.magnitude[name]
                self.scores[name] -= lr * (a * p.grad).to(torch.float64)
                p.copy_(a * self.mask_of(self.scores[name]).to(p.dtype))
        return loss

    def mask_of(self, scores: torch.Tensor) -> torch.Tensor:
        """``sign(s)`` in {-1, +1}, or ``[s >= 0]`` in {0, 1} for binary masks."""
        low = 0.0 if self.binary else -1.0
        return torch.where(scores < 0, low, 1.0)

    def finish(self, run: LocalRun) -> None:
        masked = {name for name, _ in self.masked}
        with torch.no_grad():
            for key, value in run.model.state_dict().items():
                if key not in masked and key not in run.personal:
                    value.copy_(self.start[key])  # frozen
        kept = torch.cat(
            [
                self.scores[n].reshape(-1)[self.magnitude[n].reshape(-1) != 0]
                for n, _ in self.masked
            ]
        )
        magnitudes = torch.cat(
            [self.scores[n].reshape(-1).abs() for n, _ in self.masked]
        )
        save_arrays(run.state, NAMESPACE, "scores", {"scores": magnitudes.numpy()})
        signs = np.packbits(kept.numpy() >= 0)
        run.reply_records[wire.ARRAYS] = array_record({"signs": signs})


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the sign supermask."""
    return [SignSupermask(SCORE_INIT.read(config), MASK.read(config) == "binary")]
