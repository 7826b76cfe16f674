"""FedIns: instance-adaptive inference with pools of SSF parameters.

Feng, Yu, Zhang, Liu, Zhu, Fu, Lin, Goh, Li, "Towards Instance-adaptive
Inference for Federated Learning", ICCV 2023, https://arxiv.org/abs/2308.06051
(official code: https://github.com/chunmeifeng/FedIns).

The backbone is frozen; every SSF site (``h * gamma + beta`` after each
linear, convolution and LayerNorm) holds a pool of ``P`` entries, the
classifier is a pool of ``P`` linear heads, and ``P`` keys route each
instance: its query is the frozen backbone's classifier input, its entries
the ``k`` keys of highest cosine similarity, its model the mean of those
entries at every site and the mean of their heads' logits (:mod:`tasks.ssf`,
vectorised over the batch).

- **Server**: the mean of the pools, keys and head pools with uniform weights
  ``1/m`` (``weighting = "uniform"``, the official ``communication``; the
  FedAvg chain), broadcast to every node.
- **Client** (routine ``fedins``): SGD on
  ``(1 - lam) CE + lam mean_x (1 - sum_{p in S(x)} cos(q(x), K_p))`` for the
  local epochs, which trains the selected entries and pulls their keys toward
  the queries (official ``pool_train``).

Wire protocol: FedAvg's on the trainable entries only (``peft="ssf"`` with
``ssf-pool-size = pool-size``, ``ssf-top-k = top-k``, fixed by
:meth:`run_settings`): ``arrays`` are every site's ``ssf_scale`` /
``ssf_shift`` (``P x D``), ``ssf_keys`` (``P x D_q``), ``ssf_head_weight``
(``P x C x D_q``) and ``ssf_head_bias``; the frozen backbone never travels and
``frozen-digest`` guards it. ``config`` carries ``fedins.lam``. Replies add
the metric ``fedins.top-entry-share`` (the selection histogram's peak, to
watch for key collapse), reported as ``train-fedins.top-entry-share`` but
not declared: the server never reads it. No state beyond the global pools;
no client state.

Decisions where the spec was open (checked against the official code,
``models/vision_transformer.py`` and ``utils/public_utils.py``):

- Sites: every ``Linear`` / ``Conv`` / ``LayerNorm`` of the backbone but the
  classifier. On the tiny ViT these are the official sites (patch embedding,
  both block LayerNorms, the attention projections, whose separate q/k/v
  Linears equal the official fused ``qkv``, both MLP layers, the final
  norm); on the MLP its two hidden layers (before the ReLU).
- Selection is per instance and batched (the official code trains and tests
  with one instance per step, and its mean over the batch would mix
  instances at larger batches); the batch size is the shared ``batch-size``.
- The head pool starts as ``P`` copies of the backbone's (pretrained) head,
  which is then frozen: the official code draws it with Kaiming's normal
  because its ImageNet head does not fit the target classes; here the source
  task has the target's classes, and ``pool-size = 1`` is then exactly plain
  SSF with the head trained (the spec's baseline (a)).
- The query is the classifier input of the same frozen backbone with every
  SSF site off (the official second, unmodified model: identical weights, so
  one copy and a second forward pass without gradients).
- The key term is the batch mean of ``1 - sum`` of the ``k`` selected
  cosines (the official ``reduced_sim`` divides the sum by the batch size).
- Local optimiser: the shared one (the official is SGD, lr 0.01, no momentum,
  built afresh each round: ``optimizer = "sgd"``, ``momentum = 0``).
"""

from __future__ import annotations

from typing import Any

from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param


@register
class FedIns(FedAvg):
    """FedIns (see the module docstring)."""

    name = "fedins"
    routine = "fedins"
    paper = "Feng et al., ICCV 2023, https://arxiv.org/abs/2308.06051"
    tagline = "Pools of SSF parameters on a frozen backbone, top-k per instance"
    family = "foundation models"
    params = (
        Param(
            "weighting",
            "uniform",
            choices=("num-examples", "uniform"),
            help="weight of a client's pools: 1/m (official) or its share of examples",
        ),
        Param("pool-size", 25, ">= 1", "P: entries per SSF pool (and keys)"),
        Param("top-k", 3, ">= 1", "k: entries each instance averages"),
        Param(
            "lam",
            0.1,
            "[0, 1]",
            "weight of the key-matching term (training_loss_weight)",
            send=True,
        ),
    )

    def validate(self) -> None:
        """``top-k`` cannot exceed ``pool-size``."""
        if self.top_k > self.pool_size:
            raise ValueError(
                f"fedins.top-k={self.top_k}: expected <= pool-size={self.pool_size}"
            )

    def run_settings(self) -> dict[str, Any]:
        """``peft = "ssf"`` with this run's pool size and top-k."""
        return {
            "peft": "ssf",
            "ssf-pool-size": self.pool_size,
            "ssf-top-k": self.top_k,
        }
