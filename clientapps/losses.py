"""Loss factories: what local training minimises, chosen by the message config.

``config["loss"]`` names the base term of the loop's objective
(:func:`make_loss`); hooks add their own terms (``Hook.loss``). A loss is a
callable ``(logits, y, run) -> scalar``:

- ``cross-entropy`` (default): supervised classification;
- ``none``: no base term, the recipe's hooks are the whole objective
  (unsupervised, contrastive or distillation-only training).

The helpers :func:`distillation` and :func:`info_nce` are the terms recipes
compose for knowledge distillation and contrastive learning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F  # noqa: N812

if TYPE_CHECKING:
    from bouquet.clientapps.loop import LocalRun

Loss = Callable[[torch.Tensor, torch.Tensor, "LocalRun"], torch.Tensor]


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, run: Any) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def _none(logits: torch.Tensor, y: torch.Tensor, run: Any) -> torch.Tensor:
    return logits.new_zeros(())


LOSSES: dict[str, Loss] = {"cross-entropy": _cross_entropy, "none": _none}


def check_loss(name: str) -> None:
    """Raise ValueError unless ``name`` is a known loss."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}; got {name!r}.")


def make_loss(name: str) -> Loss:
    """The loss ``name`` (see the module docstring)."""
    check_loss(name)
    return LOSSES[name]


def distillation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))``, batch mean (Hinton et al. 2015).

    The ``T^2`` keeps the gradient's scale independent of the temperature.
    """
    t = float(temperature)
    teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    student = F.log_softmax(student_logits / t, dim=1)
    return t * t * F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def soft_label_distillation(
    student_logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T^2 KL(target || softmax(s / T))``, batch mean.

    Distillation towards given class probabilities (soft labels received from
    elsewhere: KnFu's fused knowledge, FedD2S's server head).
    """
    t = float(temperature)
    student = F.log_softmax(student_logits / t, dim=1)
    return t * t * F.kl_div(student, target, reduction="batchmean")


def info_nce(
    anchors: torch.Tensor, positives: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """InfoNCE / NT-Xent of aligned pairs (Oord et al. 2018; SimCLR's one side).

    Row ``i`` of ``positives`` is the positive of row ``i`` of ``anchors``,
    every other row a negative.
    """
    a = F.normalize(anchors, dim=1)
    p = F.normalize(positives, dim=1)
    logits = a @ p.T / float(temperature)
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))
