"""FedPEFT: FedAvg on a parameter-efficient module of a frozen pretrained backbone.

Sun, Khalid, Mendieta, Yang, Wang, Lee, Chen, "Exploring Parameter-Efficient
Fine-Tuning to Enable Foundation Models in Federated Learning", arXiv 2022
(later "Conquering the Communication Constraints to Enable Large Pre-Trained
Models in Federated Learning"), https://arxiv.org/abs/2210.01708.

- **Server**: ``phi <- sum_k (n_k / n) phi_k``: FedAvg over the trainable
  entries ``phi`` only; the backbone ``theta_0`` is never sent.
- **Client**: build ``theta_0 + phi``, freeze ``theta_0``, train ``phi`` for
  the local epochs (routine ``plain``), return ``phi``.
- **Variants** (``variant``): ``bias`` (BitFit: every bias plus the head),
  ``adapter`` (a zero-initialised bottleneck after each transformer block's
  MLP, plus the head), ``prompt`` (visual prompt tokens, plus the head). The
  two references the paper compares against are the shared settings with
  ``algorithm=fedavg``: ``peft=none`` (full fine-tuning) and ``peft=head``.

Wire protocol: FedAvg's, on ``phi``: ``arrays`` holds the trainable entries
only, and ``config`` carries ``frozen-digest`` (the backbone's SHA-256) so a
node with another backbone refuses the round instead of averaging into it.
No state beyond the global ``phi``.

This module is only the declaration: the mechanics are shared
(:mod:`tasks.finetune`: which entries train and travel, pretraining on the
source task, the digest; :mod:`tasks.foundation`: the tiny ViT, adapters,
prompts), so every algorithm fine-tunes the same way. ``variant`` fixes the
shared ``peft`` (:meth:`run_settings`); the backbone is the run's ``model``
and ``pretrained`` (the reproduction config: ``vit-tiny`` pretrained on the
source half of digits, fine-tuned on ``digits-shift``).

Decisions where the spec was open (no public code exists: the paper's
repository holds only a README):

- Adapters sit after the MLP sub-layer (the spec's first placement), bottleneck
  GELU, residual, up-projection initialised to zero; width ``adapter-dim`` = 8.
- Prompts are shallow (input only), ``prompt-length`` = 4, inserted after the
  class token without position embeddings, VPT's uniform initialisation.
- BitFit's scope is every bias of the backbone: attention q/k/v/o, MLP,
  LayerNorm and the patch embedding's (listed by
  ``tasks.finetune.frozen_names``' complement), plus the head.
- The head is trained and sent in every variant (the spec: "count it").
"""

from __future__ import annotations

from typing import Any

from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param

VARIANTS = ("bias", "adapter", "prompt")


@register
class FedPEFT(FedAvg):
    """FedPEFT (see the module docstring)."""

    name = "fedpeft"
    paper = "Sun et al., arXiv 2022, https://arxiv.org/abs/2210.01708"
    tagline = "FedAvg on a PEFT module (bias, adapter, prompt) of a frozen backbone"
    family = "foundation models"
    params = (
        *FedAvg.params,
        Param(
            "variant",
            "bias",
            choices=VARIANTS,
            help="the PEFT module trained and sent (sets the shared 'peft')",
        ),
    )

    def run_settings(self) -> dict[str, Any]:
        """``peft`` = the variant: the model is built with that module trainable."""
        return {"peft": self.variant}
