"""KnFu client: local training with distillation toward its fused target.

Seyedmohammadi et al., "KnFu: Effective Knowledge Fusion", 2024,
https://arxiv.org/abs/2403.11892. The node's whole model is personal (kept in
``Context.state`` by ``train_client``); the message carries the transfer
inputs (``knfu.transfer``) and, once the server has fused one, the node's
target ``Q_k`` keyed by sample id (``knfu.target``).

- ``setup``: the records are checked (shapes against the model, finite,
  probabilities) before anything trains: a refusal is a :class:`ConfigError`.
- ``loss``: with a target, add ``distill-weight * T^2 * KL(Q_k || softmax(f(x)/T))``
  on a transfer batch of ``batch-size`` drawn from the loop's seeded generator.
- ``finish``: the knowledge ``P_k = softmax(f(X_pub)/T)`` (eval mode), keyed by
  sample id, as the reply record ``knfu.knowledge``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional

from bouquet.clientapps.bounds import RATE_MAX, Bound, ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.losses import soft_label_distillation
from bouquet.clientapps.state import array_record
from bouquet.tasks.soft_labels import distribution_problem

if TYPE_CHECKING:
    from bouquet.clientapps.loop import LocalRun

TEMPERATURE = Bound("knfu.temperature", 1.0, 0.0, 100.0, low_open=True)
DISTILL_WEIGHT = Bound("knfu.distill-weight", 1.0, 0.0, RATE_MAX)
BOUNDS = (TEMPERATURE, DISTILL_WEIGHT)

TRANSFER = "knfu.transfer"
TARGET = "knfu.target"
KNOWLEDGE = "knfu.knowledge"
MAX_TRANSFER = 100_000


def _refuse(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(key, value, allowed, "record")


def transfer_of(incoming: Mapping[str, Any]) -> torch.Tensor:
    """The transfer inputs of the message, checked (finite float, at most 1e5)."""
    record = incoming.get(TRANSFER)
    if record is None or list(record.keys()) != ["x"]:
        raise _refuse(
            TRANSFER, None if record is None else list(record.keys()), "['x']"
        )
    x = record["x"].numpy()
    if x.dtype.kind != "f" or x.ndim < 2 or not 0 < len(x) <= MAX_TRANSFER:
        raise _refuse(f"{TRANSFER}['x']", f"{x.dtype}{list(x.shape)}", "N x input")
    if not np.isfinite(x).all():
        raise _refuse(f"{TRANSFER}['x']", "non-finite values", "finite values")
    return torch.as_tensor(np.array(x, dtype=np.float32))


def target_of(incoming: Mapping[str, Any], count: int, classes: int) -> torch.Tensor:
    """The fused target keyed ``"0"`` .. ``"count-1"``, checked, as ``count x C``."""
    record = incoming[TARGET]
    if list(record.keys()) != [str(i) for i in range(count)]:
        raise _refuse(TARGET, f"{len(record.keys())} keys", f"'0' .. '{count - 1}'")
    rows = {str(i): record[str(i)].numpy() for i in range(count)}
    if problem := distribution_problem(rows, classes):
        raise _refuse(TARGET, problem, f"probabilities, float[{classes}] each")
    values = np.stack(list(rows.values())).astype(np.float64)
    return torch.as_tensor(values, dtype=torch.float32)


class KnowledgeDistillation(Hook):
    """Distil toward the fused target; extract the knowledge (module docstring)."""

    def __init__(self, temperature: float, weight: float) -> None:
        self.temperature = float(temperature)
        self.weight = float(weight)

    def setup(self, run: LocalRun) -> None:
        self.x = transfer_of(run.incoming)
        device = next(run.model.parameters()).device
        try:
            with torch.no_grad():
                run.model.eval()
                classes = run.model(self.x[:2].to(device)).shape[1]
        except RuntimeError as err:
            raise _refuse(
                f"{TRANSFER}['x']", list(self.x.shape), "model inputs"
            ) from err
        finally:
            run.model.train()
        self.target = None
        if TARGET in run.incoming:
            self.target = target_of(run.incoming, len(self.x), classes)

    def loss(
        self,
        run: LocalRun,
        loss: torch.Tensor,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        if self.target is None or self.weight == 0.0:
            return loss
        t = self.temperature
        size = min(run.settings.batch_size, len(self.x))
        idx = torch.randint(len(self.x), (size,), generator=run.generator)
        out = run.model(self.x[idx].to(x.device))
        return loss + self.weight * soft_label_distillation(
            out, self.target[idx].to(x.device), t
        )

    def finish(self, run: LocalRun) -> None:
        device = next(run.model.parameters()).device
        run.model.eval()
        with torch.no_grad():
            probs = torch.cat(
                [
                    functional.softmax(
                        run.model(chunk.to(device)) / self.temperature, dim=1
                    )
                    for chunk in self.x.split(512)
                ]
            )
        run.model.train()
        values = probs.cpu().numpy().astype(np.float32)
        run.reply_records[KNOWLEDGE] = array_record(
            {str(i): row for i, row in enumerate(values)}
        )


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: distillation toward the target, extraction of the knowledge."""
    return [
        KnowledgeDistillation(TEMPERATURE.read(config), DISTILL_WEIGHT.read(config))
    ]
