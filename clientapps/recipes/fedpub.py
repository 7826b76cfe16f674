"""FED-PUB client: masked local training, then the functional embedding.

Baek et al., "Personalized Subgraph Federated Learning", ICML 2023,
https://arxiv.org/abs/2206.10206 (``strategies/fedpub.py``). The model is the
run's model with every linear weight masked (``tasks/masked.py``, built with
``config["model-wrapper"] = "masked"``); masks and their thresholds are
personal parameters, so the received arrays never overwrite them.

- ``setup``: the masks' eval-mode pruning threshold is ``l1``; the received
  weights are ``theta_bar`` (``run.global_parameters``).
- ``loss``: ``+ l1 sum ||M||_1 + loc-l2 sum ||W - theta_bar||_2`` (unsquared
  L2 per non-mask tensor, from round 2 on).
- ``finish``: the functional embedding in eval mode, replied as
  ``fedpub.embedding``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from bouquet.clientapps.bounds import (
    INT63_MAX,
    RATE_MAX,
    SERVER_ROUND,
    Bound,
    ConfigError,
)
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.state import array_record
from bouquet.tasks import wire
from bouquet.tasks.masked import masked_layers

if TYPE_CHECKING:
    from bouquet.clientapps.loop import LocalRun

L1 = Bound("fedpub.l1", 1e-3, 0.0, 1.0)
LOC_L2 = Bound("fedpub.loc-l2", 1e-3, 0.0, RATE_MAX)
N_PROXY = Bound("fedpub.n-proxy", 5, 1, 20)
PROXY_SEED = Bound("fedpub.proxy-seed", 1234, 0, INT63_MAX)
BOUNDS = (L1, LOC_L2, N_PROXY, PROXY_SEED)

EMBEDDING = "fedpub.embedding"
EMBEDDING_KEY = "e"
PROXY_NODES = 100
"""Proxy inputs per block (the official proxy graph's block size)."""


def proxy_inputs(
    model: nn.Module, input_shape: tuple[int, ...], n_proxy: int, seed: int
) -> torch.Tensor:
    """The shared proxy input: the SBM proxy graph for a GCN, else Gaussian.

    Every node builds the same tensor from ``(n_proxy, seed)`` and the shape.
    """
    from bouquet.tasks.graph import GCN, proxy_rows

    if isinstance(model, GCN):
        rows = proxy_rows(n_proxy, input_shape[-1] - 1, seed)
    else:
        rng = np.random.default_rng([seed, 11])
        rows = rng.normal(0.0, 1.0, (PROXY_NODES * n_proxy, *input_shape))
    return torch.tensor(rows, dtype=torch.float32)  # a copy: the rows are shared


@torch.no_grad()
def functional_embedding(model: nn.Module, proxy: torch.Tensor) -> np.ndarray:
    """Mean over the proxy of ``model.embed`` (else the classifier's input), eval mode.

    The model's train/eval mode is restored afterwards.
    """
    from bouquet.clientapps.loop import head_module

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        proxy = proxy.to(device)
        if hasattr(model, "embed"):
            out = model.embed(proxy)
        else:
            seen: list[torch.Tensor] = []
            handle = head_module(model).register_forward_pre_hook(
                lambda _m, args: seen.append(args[0])
            )
            try:
                model(proxy)
            finally:
                handle.remove()
            out = seen[0].flatten(1)
        return out.mean(dim=0).float().cpu().numpy()
    finally:
        model.train(was_training)


class MaskedPersonalTraining(Hook):
    """FED-PUB's local objective and functional embedding (module docstring)."""

    def __init__(
        self, l1: float, loc_l2: float, n_proxy: int, proxy_seed: int, server_round: int
    ) -> None:
        self.l1 = float(l1)
        self.loc_l2 = float(loc_l2)
        self.n_proxy = int(n_proxy)
        self.proxy_seed = int(proxy_seed)
        self.server_round = int(server_round)

    def setup(self, run: LocalRun) -> None:
        layers = masked_layers(run.model)
        if not layers:
            raise ConfigError(
                wire.MODEL_WRAPPER,
                type(run.model).__name__,
                "a model with masked linear layers (bouquet.tasks.masked, FED-PUB)",
            )
        with torch.no_grad():
            for layer in layers:
                layer.prune_below.fill_(self.l1)
        masks = {id(layer.mask) for layer in layers}
        self._masks = [p for p in run.parameters if id(p) in masks]
        self._weights = [
            (p, i) for i, p in enumerate(run.parameters) if id(p) not in masks
        ]

    def loss(
        self,
        run: LocalRun,
        loss: torch.Tensor,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        if self.l1 > 0:
            loss = loss + self.l1 * sum(m.abs().sum() for m in self._masks)
        if self.loc_l2 > 0 and self.server_round > 1:
            start = run.global_parameters
            loss = loss + self.loc_l2 * sum(
                torch.linalg.vector_norm(p - start[i].to(p.device))
                for p, i in self._weights
            )
        return loss

    def finish(self, run: LocalRun) -> None:
        proxy = proxy_inputs(
            run.model, tuple(run.data[0].shape[1:]), self.n_proxy, self.proxy_seed
        )
        embedding = functional_embedding(run.model, proxy).astype(np.float32)
        run.reply_records[EMBEDDING] = array_record({EMBEDDING_KEY: embedding})


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: masked training with its penalties, then the embedding."""
    return [
        MaskedPersonalTraining(
            L1.read(config),
            LOC_L2.read(config),
            N_PROXY.read(config),
            PROXY_SEED.read(config),
            SERVER_ROUND.read(config),
        )
    ]
