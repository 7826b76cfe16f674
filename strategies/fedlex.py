"""FedLEx: federated loss exploration, a global gradient-guidance matrix.

Paper: Internò, Olhofer, Jin, Hammer. "Federated Loss Exploration for Improved
Convergence on Non-IID Data", IJCNN (WCCI) 2024,
https://doi.org/10.1109/IJCNN60899.2024.10651455 (arXiv 2506.18640).
Official code: github.com/ChristianInterno/FedLEx (``src/client/fedlexclient.py``,
``src/server/fedlexserver.py``, ``src/GTL_utils.py``).

- **Exploration** (server round 1, once): a fraction ``perc-clients-for-mask`` of
  the nodes each train a *scout* from the common initial model ``theta_0`` for up
  to ``E_x`` epochs, stopping early after ``P`` epochs without a lower last-batch
  loss. The base model ``theta_base`` is ``theta_0`` after one epoch on the first
  explorer's data. Per entry ``l`` the server keeps each explorer's squared
  deviation ``(theta_{i,l}^scout - theta_{base,l})^2``.
- **Guidance**: ``ls_l = mean_i`` of those deviations, normalised per tensor:
  ``minmax`` ``G_l = (ls_l - min) / (max - min)`` (official default) or
  ``robust`` ``G_l = (ls_l - median) / IQR``. With ``perc-clients-for-mask == 1``
  the mean runs over the explorers sampled in the current round, otherwise over
  all explorers.
- **Guided rounds** (rounds >= 2): FedAvg, except that clients multiply every
  local gradient elementwise by ``G`` before the (optionally clipped) step.

Wire protocol: every round's config carries ``fedlex.phase`` (``"explore"`` in
round 1, else ``"train"``), ``fedlex.patience`` and ``fedlex.max-grad-norm``.
The exploration round also sets ``local-epochs = E_x`` and ``local-steps = 0``
in a copy of the round's config; explorers reply with their scout as
``arrays`` and the model after their first epoch as the ArrayRecord
``fedlex.base`` (plus the metric ``fedlex.explore-epochs``). Guided rounds send
``G`` as the ArrayRecord ``fedlex.guidance`` (every floating state-dict entry;
clients apply the entries of trainable parameters) and receive plain FedAvg
replies. Server state: ``deviations`` (node id -> squared deviations, N x d),
so a resumed run rebuilds the same ``G``. Clients keep no state.

Decisions where the spec was open (see ``shared/algorithms/fedlex.md``):

- Exploration is server round 1 and leaves the global model at ``theta_0``;
  the guided rounds start from it. ``explore-epochs = 0`` skips exploration and
  sends no ``G``: the run is FedAvg, round for round.
- Scouts are independent copies of ``theta_0`` (the official code chains them),
  and explorers return their scouts (the latest official version returns an
  all-ones placeholder). Every explorer sends its epoch-1 model, since the base
  must be known before deviations exist; the server keeps the one with the
  lowest ``partition-id`` (replies are ordered by it).
- ``G`` for a round is built from the round's sampled explorers *before* they
  train (the intended rule; the official code rebuilds it after the clients
  trained, so round ``t`` uses round ``t-1``'s sample).
- A tensor whose ``max - min`` (or IQR) is 0, e.g. a one-element tensor, gets
  ``G = 1`` (the official code divides by zero). ``guidance-floor > 0`` raises
  every entry to at least that value (MinMax pins each tensor's least-moving
  entry at exactly 0, freezing it); 0 keeps the official rule, including
  RobustScaler's negative entries (gradient ascent below the median).
- The local optimiser is the loop's SGD (the paper's example uses Adam, whose
  second moment partly undoes the mask); the example's per-round lr decay is
  not applied.
- Defaults ``E_x = 150``, ``P = 40``: the official README's MNIST command.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.supercore import log

from bouquet.strategies.aggregation import to_record
from bouquet.strategies.base import BouquetStrategy, Record, Reduction
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.registry import register
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire
from bouquet.tasks.params import Param

PHASE = "fedlex.phase"
BASE = "fedlex.base"
"""Reply ArrayRecord of the exploration round: the model after one epoch."""
GUIDANCE = "fedlex.guidance"
"""ArrayRecord sent in guided rounds: the guidance matrix G, per entry."""
NORMALIZATIONS = ("minmax", "robust")

Arrays = Mapping[str, np.ndarray]


def squared_deviation(scout: Arrays, base: Arrays) -> dict[str, np.ndarray]:
    """``(scout - base)^2`` for every floating entry (integer buffers skipped)."""
    return {
        k: np.square(scout[k].astype(np.float64) - b.astype(np.float64)).astype(b.dtype)
        for k, b in base.items()
        if b.dtype.kind == "f"
    }


def normalize(ls: np.ndarray, method: str, floor: float = 0.0) -> np.ndarray:
    """One tensor's learning spread ``ls`` -> its guidance (float64)."""
    ls = np.asarray(ls, np.float64)
    if method == "minmax":
        shift = ls.min() if ls.size else 0.0
        spread = ls.max() - shift if ls.size else 0.0
    elif method == "robust":
        # torch.median (official) is the lower middle value; quartiles interpolate.
        shift = np.quantile(ls, 0.5, method="lower") if ls.size else 0.0
        q1, q3 = np.quantile(ls, [0.25, 0.75]) if ls.size else (0.0, 0.0)
        spread = q3 - q1
    else:
        raise ValueError(f"Unknown normalization {method!r}; use {NORMALIZATIONS}.")
    # Only an exactly flat tensor is special-cased (the official code divides by 0).
    g = (ls - shift) / spread if spread > 0 else np.ones_like(ls)
    return np.maximum(g, floor) if floor > 0 else g


def guidance_matrix(
    deviations: Sequence[Arrays], method: str = "minmax", floor: float = 0.0
) -> dict[str, np.ndarray]:
    """``G_l = normalize(mean_i deviations_i[l])`` per entry, in its dtype."""
    if not deviations:
        raise ValueError("guidance_matrix needs at least one explorer.")
    return {
        k: normalize(
            np.mean([d[k].astype(np.float64) for d in deviations], axis=0),
            method,
            floor,
        ).astype(ref.dtype)
        for k, ref in deviations[0].items()
    }


@register
class FedLEx(BouquetStrategy):
    """FedLEx's server: an exploration round, then FedAvg with guidance ``G``."""

    name = "fedlex"
    routine = "fedlex"
    paper = "Internò et al., IJCNN 2024, https://arxiv.org/abs/2506.18640"
    tagline = "Loss-exploration round builds guidance G; local gradients * G"
    family = "optimization"
    params = (
        Param("explore-epochs", 150, ">= 0", "E_x (official command); 0 = FedAvg"),
        Param("patience", 40, ">= 1", "P, scouts' early stopping (epochs)", send=True),
        Param("perc-clients-for-mask", 1.0, "(0, 1]", "share of nodes that explore"),
        Param(
            "guidance-normalization",
            "minmax",
            choices=NORMALIZATIONS,
            help="minmax (official) | robust",
        ),
        Param("guidance-floor", 0.0, ">= 0", "lower bound on G; 0 = none (official)"),
        Param("max-grad-norm", 0.0, ">= 0", "client clip after the mask", send=True),
    )
    reductions = (Reduction({"explore-epochs": 0}, "fedavg"),)

    def init_state(self) -> dict[str, Any]:
        return {"deviations": {}}

    def exploring(self, ctx: RoundContext) -> bool:
        """Round 1 explores (unless ``explore-epochs`` is 0)."""
        return ctx.server_round == 1 and self.explore_epochs > 0

    def round_config(self, ctx: RoundContext) -> dict[str, Any]:
        return {PHASE: "explore" if self.exploring(ctx) else "train"}

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        """Round 1: explorers, with ``E_x`` epochs; later rounds: the base's."""
        if not self.exploring(ctx):
            return super().recipients(ctx)
        config = ConfigRecord(
            {**ctx.config, wire.LOCAL_EPOCHS: self.explore_epochs, wire.LOCAL_STEPS: 0}
        )
        nodes = self.sample(ctx, self.perc_clients_for_mask, self.min_train_nodes)
        return {n: {wire.CONFIG: config} for n in nodes}

    def expected_records(self, ctx: RoundContext) -> tuple[str, ...]:
        """Explorers also send their model after one epoch."""
        return (BASE,) if self.exploring(ctx) else ()

    def outgoing_records(self, ctx: RoundContext) -> dict[str, Record]:
        """``G`` in guided rounds, once exploration has happened."""
        if self.exploring(ctx):
            return {}
        guidance = self.round_guidance(ctx.sampled)
        return {} if guidance is None else {GUIDANCE: to_record(guidance)}

    def round_guidance(self, sampled: Sequence[int]) -> dict[str, np.ndarray] | None:
        """``G`` for the ``sampled`` nodes (None before any exploration)."""
        deviations = self.state["deviations"]
        if not deviations:
            return None
        chosen = list(deviations.values())
        if self.perc_clients_for_mask == 1.0:
            chosen = [deviations[str(n)] for n in sampled if str(n) in deviations]
            if not chosen:
                log(WARNING, "fedlex: no sampled node explored; G uses every explorer.")
                chosen = list(deviations.values())
        return guidance_matrix(chosen, self.guidance_normalization, self.guidance_floor)

    def dp_problem(self) -> str:
        """The exploration round builds the guidance from raw replies."""
        return "its exploration round builds the guidance G from the raw replies"

    def aggregate(self, replies: Sequence[ClientReply], ctx: RoundContext) -> NDArrays:
        """Exploration stores deviations and keeps ``theta_0``; later: FedAvg."""
        if not self.exploring(ctx):
            return super().aggregate(replies, ctx)
        base = replies[0].records[BASE]
        self.state["deviations"] = {
            str(r.node): squared_deviation(r.arrays, base) for r in replies
        }
        return dict(ctx.arrays)
