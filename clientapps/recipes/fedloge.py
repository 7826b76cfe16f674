"""FedLoGe client: backbone on the frozen SSE-C; global and local heads on detached f.

Xiao et al., "FedLoGe: Joint Local and Generic Federated Learning under
Long-tailed Data", ICLR 2024, https://arxiv.org/abs/2401.08977.

Per batch, with ``f`` the classifier's input: ``CE(SSE-C(f), y)`` trains the
backbone (the model's head is the auxiliary global head ``g_aux`` and gets no
gradient from it), ``CE(g_aux(f.detach()), y)`` trains ``g_aux``, and
``CE(l_k(f.detach()), y)`` trains the node's local head ``l_k``, kept in
``Context.state`` with the node's class counts. The three optimisers of the
official code share their settings (SGD, lr, momentum) and touch disjoint
parameters: the model's optimizer over the sum of the first two terms is
the same; ``l_k`` has its own.

Evaluation (:func:`evaluation_model`): local adaptive feature realignment,
personalised logits ``P_k(f) + g_aux(f)`` with ``P_k,c = g_aux_c ||l_k,c||``,
i.e. the head's row ``c`` scaled by ``1 + ||l_k,c||``; classes absent from
the node's training data are masked (bias -1e9).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun, head_module
from bouquet.clientapps.state import load_arrays, save_arrays

SSEC = "fedloge.ssec"
"""Config key: the SSE-C weight, flat (classes x features, row-major)."""
NAMESPACE = "fedloge"
BOUNDS = ()
MASKED = -1e9


def read_ssec(config: Mapping[str, Any], head: nn.Module) -> torch.Tensor:
    """The SSE-C weight from the config, checked against the model's head."""
    value = config.get(SSEC)
    shape = tuple(head.weight.shape)
    if not isinstance(value, list) or len(value) != math.prod(shape):
        size = None if not isinstance(value, list) else len(value)
        raise ConfigError(SSEC, size, f"a list of {math.prod(shape)} floats")
    if not all(isinstance(v, float) for v in value):
        raise ConfigError(SSEC, "non-float", "floats")
    array = np.asarray(value, dtype=np.float64)
    if not np.isfinite(array).all() or np.abs(array).max(initial=0.0) > 1e3:
        raise ConfigError(SSEC, "out of range", "finite, |v| <= 1e3")
    return torch.tensor(array.reshape(shape), dtype=head.weight.dtype)


class LocalGenericHeads(Hook):
    """The three losses of FedLoGe's local training (module docstring)."""

    needs_features = True

    def setup(self, run: LocalRun) -> None:
        head = head_module(run.model)
        device = head.weight.device
        self.ssec = read_ssec(run.config, head).to(device)
        saved = load_arrays(run.state, NAMESPACE, "local-head")
        # A node's first local head starts from the auxiliary head it received.
        start = (
            {k: torch.as_tensor(v) for k, v in saved.items()}
            if saved
            else {"weight": head.weight.detach(), "bias": head.bias.detach()}
        )
        self.local_weight = start["weight"].clone().to(device).requires_grad_(True)
        self.local_bias = start["bias"].clone().to(device).requires_grad_(True)
        self.optimizer = torch.optim.SGD(
            [self.local_weight, self.local_bias],
            lr=run.settings.lr,
            momentum=run.settings.momentum,
        )

    def loss(
        self,
        run: LocalRun,
        loss: torch.Tensor,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        head = head_module(run.model)
        f = run.features
        detached = f.detach()
        return (
            F.cross_entropy(F.linear(f, self.ssec), y)
            + F.cross_entropy(F.linear(detached, head.weight, head.bias), y)
            + F.cross_entropy(F.linear(detached, self.local_weight, self.local_bias), y)
        )

    def after_step(self, run: LocalRun) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    def finish(self, run: LocalRun) -> None:
        head = head_module(run.model)
        counts = torch.bincount(run.data[1].long(), minlength=head.weight.shape[0])
        save_arrays(
            run.state,
            NAMESPACE,
            "local-head",
            {
                "weight": self.local_weight.detach().cpu().numpy(),
                "bias": self.local_bias.detach().cpu().numpy(),
                "counts": counts.cpu().numpy().astype(np.float32),
            },
        )


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the three heads' losses."""
    return [LocalGenericHeads()]


def evaluation_model(
    model: nn.Module, config: Mapping[str, Any], state: MutableMapping
) -> nn.Module:
    """The personalised model: a copy whose head is realigned by ``l_k`` (docstring).

    A node without a local head yet evaluates the model as received.
    """
    saved = load_arrays(state, NAMESPACE, "local-head")
    if not saved:
        return model
    personalised = copy.deepcopy(model)
    head = head_module(personalised)
    norms = torch.as_tensor(saved["weight"]).norm(dim=1).to(head.weight)
    absent = torch.as_tensor(saved["counts"]) == 0
    with torch.no_grad():
        head.weight.mul_((1.0 + norms)[:, None])
        head.bias.masked_fill_(absent.to(head.bias.device), MASKED)
    return personalised
