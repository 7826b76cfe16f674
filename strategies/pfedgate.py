"""pFedGate: personalised sparse models through a per-client gating layer.

Chen, Li, Zhang, Ding, Li, "Efficient Personalized Federated Learning via Sparse
Model-Adaptation", ICML 2023, https://arxiv.org/abs/2305.02776 (official code:
github.com/yxdyc/pFedGate).

- **Server**: FedAvg's weighted mean over the shared dense model ``theta``
  (``base.*``); the gating layers (``gate.*``) are personal parameters: never
  sent back, never averaged.
- **Client** (routine ``pfedgate``): the run's model wrapped in a gating layer
  (``tasks/gating.py``, built by the model factory with wrapper ``gated``). For
  each batch the gate scores the ``split`` sub-blocks of every parameter
  tensor, a greedy knapsack keeps the best ones within the budget
  ``s = sparse-factor`` of the parameters, and the loss of the sparse,
  rescaled model trains both ``theta`` (only kept blocks) and the gate (the
  official EMNIST example's joint update on the same batch). Gradients of the
  gate and of the model are clipped at ``grad-clip`` apart, and the gate steps
  with ``lr-gating``.

Wire protocol: FedAvg's, plus ``config["pfedgate.sparse-factor"]``,
``["pfedgate.lr-gating"]``, ``["pfedgate.grad-clip"]`` and
``config["model-wrapper"] = "gated"``; the reply omits the gate and reports
the metric ``pfedgate.kept-fraction`` (share of the base model's parameters the
last batch kept; reported, not required). Client state: the gate's weights,
BatchNorm statistics and the node's budget, as personal parameters
(``Context.state``, kept across rounds). Evaluation runs each node's gated
model on its own split (``node-accuracy-mean`` / ``-worst10``); the central
evaluation is the dense shared model (the server's gate is off), the "global
accuracy".

Decisions where the spec was open
---------------------------------
- Joint update (the official ``bi_level_opt=0``): one optimizer over model and
  gate on the same batch; ``lr-gating`` acts by scaling the gate's gradient by
  ``lr-gating / lr`` (exact for SGD with or without momentum and no weight
  decay, the official optimizer). No ReduceLROnPlateau scheduler: rounds are
  few and the server schedules ``lr`` if needed; so no optimizer or scheduler
  state is kept between rounds (plain SGD has none).
- No SwitchNorm on the gate's input (not in torch; the datasets of ``tasks/``
  are already normalised): the gate is Linear -> BatchNorm1d -> sigmoid ->
  batch mean, as the official one after its input normalisation.
- Block-wise knapsack (``block_wise_prune=1``, the README's setting) with
  ``importance_prior_para_num=0`` (the official default); ties in the greedy
  order are broken by layout order (a stable sort), which NumPy's default
  sort leaves to the platform.
- One budget for every node (``sparse-factor``); heterogeneous budgets are a
  per-node config, not implemented here.
- ``split`` = 5 sub-blocks per tensor (the README's value) is part of the
  model (it sizes the gate), fixed by the factory (``tasks.gating.GATE_SPLIT``).
- Global accuracy is the dense ``theta`` (gate off), which pFedGate never trains
  as such: it is reported, not optimised.
- ``lr-gating`` = 0.1 is the official EMNIST example's. The gate starts every
  score at about 0.5 (the batch mean of a sigmoid after BatchNorm), so every
  tensor is halved and learning is slow until the scores rise: with a few
  local steps per round (the digits target) use a larger ``lr-gating``
  (``simulations/results/pfedgate/README.md``: node accuracy 0.27 at 0.1,
  0.78 at 1.0, s = 0.5, 20 rounds).
"""

from __future__ import annotations

from typing import Any

from bouquet.strategies.base import BouquetStrategy
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param

GATE = "gate.*"
"""The gating layer's state-dict entries: personal."""


@register
class PFedGate(BouquetStrategy):
    """pFedGate (see the module docstring)."""

    name = "pfedgate"
    routine = "pfedgate"
    paper = "Chen et al., ICML 2023, https://arxiv.org/abs/2305.02776"
    tagline = "Per-client gating layer picks a sparse, rescaled sub-model (budget s)"
    family = "personalized"
    model_wrapper = "gated"
    params = (
        Param(
            "sparse-factor",
            0.5,
            "(0, 1]",
            "s_k, share of the parameters a client keeps",
            send=True,
        ),
        Param("lr-gating", 0.1, "[0, 1000]", "gate learning rate", send=True),
        Param(
            "grad-clip",
            10.0,
            "[0, 1e6]",
            "max gradient norm, gate and model apart (0: off)",
            send=True,
        ),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.personal = tuple(dict.fromkeys((*self.personal, GATE)))
