"""FedD2S client: distil the server's soft labels into the layers up to the cut.

Atapour et al., "FedD2S: Personalized Data-Free Federated Knowledge
Distillation", 2024, https://arxiv.org/abs/2402.10846. The node's whole model
is personal (kept in ``Context.state`` by ``train_client``); the message
carries the cut (``fedd2s.cut``: weighted layers counted from the output) and,
once the server has them, soft labels for some of the node's training samples
keyed by sample id (``fedd2s.soft-labels``).

- ``setup``: the cut must leave at least one weighted layer before it; the soft
  labels are checked (ids of training samples, probabilities over the model's
  classes) before anything trains: a refusal is a :class:`ConfigError`.
- ``loss``: with soft labels, add ``alpha T^2 KL(s(x) || softmax(f(x)/T))`` on
  a batch of ``batch-size`` soft-labelled samples drawn from the loop's seeded
  generator, where ``f`` runs the layers from the cut on with their gradient
  stopped (they stay personal).
- ``finish``: for ``samples`` training examples (a seeded draw), the input of
  the cut's layer (a conv input averaged over positions), the label and the
  logits, in eval mode, as the reply record ``fedd2s.upload``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from bouquet.clientapps.bounds import RATE_MAX, Bound, ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.losses import soft_label_distillation
from bouquet.clientapps.state import array_record
from bouquet.tasks.soft_labels import distribution_problem

if TYPE_CHECKING:
    from bouquet.clientapps.loop import LocalRun

CUT = Bound("fedd2s.cut", 1, 1, 64)
TEMPERATURE = Bound("fedd2s.temperature", 3.0, 0.0, 100.0, low_open=True)
ALPHA = Bound("fedd2s.alpha", 1.0, 0.0, RATE_MAX)
SAMPLES = Bound("fedd2s.samples", 64, 1, 100_000)
BOUNDS = (CUT, TEMPERATURE, ALPHA, SAMPLES)

SOFT_LABELS = "fedd2s.soft-labels"
UPLOAD = "fedd2s.upload"


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    """The model's ``Linear`` / ``Conv`` layers (a weight of ndim >= 2), in order."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim >= 2
    ]


def soft_labels_of(
    incoming: Mapping[str, Any], count: int, classes: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(ids, probabilities)`` of the soft labels, checked; None if absent."""
    record = incoming.get(SOFT_LABELS)
    if record is None:
        return None
    keys = list(record.keys())
    if not keys or not all(k.isdigit() and int(k) < count for k in keys):
        raise ConfigError(
            SOFT_LABELS, f"{len(keys)} keys", f"training sample ids < {count}", "record"
        )
    rows = {k: record[k].numpy() for k in keys}
    if problem := distribution_problem(rows, classes):
        raise ConfigError(SOFT_LABELS, problem, f"float[{classes}] probabilities")
    ids = torch.tensor([int(k) for k in keys], dtype=torch.long)
    probs = np.stack(list(rows.values())).astype(np.float32)
    return ids, torch.as_tensor(probs)


class LayerDroppingDistillation(Hook):
    """Distil below the cut; upload representations (see the module docstring)."""

    def __init__(
        self, cut: int, temperature: float, alpha: float, samples: int
    ) -> None:
        self.cut = int(cut)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.samples = int(samples)

    def setup(self, run: LocalRun) -> None:
        layers = weighted_layers(run.model)
        if self.cut >= len(layers):
            raise ConfigError(
                CUT.key, self.cut, f"below {len(layers)} (the model's weighted layers)"
            )
        self.layer = layers[-self.cut]
        first = next(
            n for n, p in run.model.named_parameters() if p is self.layer.weight
        )
        names = [n for n, _ in run.model.named_parameters()]
        # Parameters are in forward order in the pack's models: from the cut's
        # layer on, every parameter is deeper than the cut.
        self.deep = names[names.index(first) :]
        classes = layers[-1].weight.shape[0]
        self.soft = soft_labels_of(run.incoming, len(run.data[0]), classes)

    def loss(
        self,
        run: LocalRun,
        loss: torch.Tensor,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        if self.soft is None or self.alpha == 0.0:
            return loss
        ids, probs = self.soft
        size = min(run.settings.batch_size, len(ids))
        pick = torch.randint(len(ids), (size,), generator=run.generator)
        inputs = run.data[0][ids[pick]].to(x.device)
        params = dict(run.model.named_parameters())
        frozen = {n: params[n].detach() for n in self.deep}
        out = functional_call(run.model, frozen, (inputs,), strict=False)
        return loss + self.alpha * soft_label_distillation(
            out, probs[pick].to(x.device), self.temperature
        )

    def finish(self, run: LocalRun) -> None:
        x_all, y_all = run.data
        count = len(x_all)
        rounds = -(-self.samples // count)  # permutations needed to fill the draw
        ids = torch.cat(
            [torch.randperm(count, generator=run.generator) for _ in range(rounds)]
        )[: self.samples]
        captured: list[torch.Tensor] = []

        def keep(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            h = inputs[0]
            captured.append(h.flatten(2).mean(dim=2) if h.ndim > 2 else h)

        device = next(run.model.parameters()).device
        handle = self.layer.register_forward_pre_hook(keep)
        run.model.eval()
        try:
            with torch.no_grad():
                logits = run.model(x_all[ids].to(device))
        finally:
            handle.remove()
            run.model.train()
        run.reply_records[UPLOAD] = array_record(
            {
                "ids": ids.numpy().astype(np.int64),
                "labels": y_all[ids].numpy().astype(np.int64),
                "features": captured[0].flatten(1).cpu().numpy().astype(np.float32),
                "logits": logits.cpu().numpy().astype(np.float32),
            }
        )


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: distillation below the cut, upload at the cut."""
    return [
        LayerDroppingDistillation(
            CUT.read(config),
            TEMPERATURE.read(config),
            ALPHA.read(config),
            SAMPLES.read(config),
        )
    ]
