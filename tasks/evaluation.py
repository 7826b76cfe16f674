"""Evaluation of a model on in-memory tensors, shared by clients and the server."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def evaluate_model(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``.

    Per target: a sequence model's logits ``(N, C, T)`` against targets
    ``(N, T)`` (next-token prediction) average over the ``N * T`` tokens, so
    ``exp(loss)`` is the perplexity.
    """
    if len(x) == 0:
        raise ValueError("Cannot evaluate on an empty set.")
    device = next(model.parameters()).device
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
        count += yb.numel()
    return loss_sum / count, correct / count
