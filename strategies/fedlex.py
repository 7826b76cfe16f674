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

from collections.abc import Iterable, Mapping, Sequence
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.supercore import log

from strategies import keys
from strategies.aggregation import to_numpy, to_record
from strategies.base import BouquetStrategy
from strategies.registry import AlgorithmEntry, register

PHASE = keys.algorithm_key("fedlex", "phase")
PATIENCE = keys.algorithm_key("fedlex", "patience")
MAX_GRAD_NORM = keys.algorithm_key("fedlex", "max-grad-norm")
BASE = keys.algorithm_key("fedlex", "base")
"""Reply ArrayRecord of the exploration round: the model after one epoch."""
GUIDANCE = keys.algorithm_key("fedlex", "guidance")
"""ArrayRecord sent in guided rounds: the guidance matrix G, per entry."""
EXPLORE_EPOCHS = keys.algorithm_key("fedlex", "explore-epochs")
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


class FedLEx(BouquetStrategy, flwr_strategy.FedAvg):
    """FedLEx's server: an exploration round, then FedAvg with guidance ``G``.

    Parameters
    ----------
    explore_epochs : int
        ``E_x``; 0 skips exploration (plain FedAvg).
    patience : int
        ``P``, early-stopping patience of the scouts, in epochs.
    perc_clients_for_mask : float
        Fraction of nodes that explore (1.0: ``G`` per round from the sampled).
    guidance_normalization : str
        ``"minmax"`` or ``"robust"``.
    guidance_floor : float
        Lower bound on ``G`` (0: none, as in the paper).
    max_grad_norm : float
        Client gradient clipping after the mask (0: none).

    """

    state_attributes = ("deviations",)

    def __init__(
        self,
        *args: Any,
        explore_epochs: int = 150,
        patience: int = 40,
        perc_clients_for_mask: float = 1.0,
        guidance_normalization: str = "minmax",
        guidance_floor: float = 0.0,
        max_grad_norm: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if guidance_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"fedlex.guidance-normalization must be one of {NORMALIZATIONS}; "
                f"got {guidance_normalization!r}."
            )
        if not 0.0 < perc_clients_for_mask <= 1.0:
            raise ValueError(
                "fedlex.perc-clients-for-mask must be in (0, 1]; "
                f"got {perc_clients_for_mask}."
            )
        if explore_epochs < 0 or patience < 1 or max_grad_norm < 0:
            raise ValueError(
                "fedlex: need explore-epochs >= 0, patience >= 1, max-grad-norm >= 0."
            )
        self.explore_epochs = int(explore_epochs)
        self.patience = int(patience)
        self.perc_clients_for_mask = float(perc_clients_for_mask)
        self.guidance_normalization = guidance_normalization
        self.guidance_floor = float(guidance_floor)
        self.max_grad_norm = float(max_grad_norm)
        self.deviations: dict[str, dict[str, np.ndarray]] = {}
        self.exploring = False

    def round_config(self, server_round: int) -> dict[str, Any]:
        return {
            PHASE: "explore" if self.exploring else "train",
            PATIENCE: self.patience,
            MAX_GRAD_NORM: self.max_grad_norm,
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Round 1: explorers and their settings; later: attach ``G``."""
        self.exploring = server_round == 1 and self.explore_epochs > 0
        self.extra_train_records = (BASE,) if self.exploring else ()
        if not self.exploring:
            messages = list(super().configure_train(server_round, arrays, config, grid))
            guidance = self.round_guidance(messages)
            if guidance is not None:
                record = to_record(guidance)
                for msg in messages:
                    msg.content[GUIDANCE] = record
            return messages
        # A copy: Flower reuses one train config for every round.
        config = ConfigRecord(dict(config))
        config[keys.LOCAL_EPOCHS] = self.explore_epochs
        config[keys.LOCAL_STEPS] = 0
        fraction, self.fraction_train = self.fraction_train, self.perc_clients_for_mask
        try:
            return list(super().configure_train(server_round, arrays, config, grid))
        finally:
            self.fraction_train = fraction

    def round_guidance(
        self, messages: Sequence[Message]
    ) -> dict[str, np.ndarray] | None:
        """``G`` for the nodes of ``messages`` (None before any exploration)."""
        if not self.deviations:
            return None
        chosen = list(self.deviations.values())
        if self.perc_clients_for_mask == 1.0:
            sampled = [str(m.metadata.dst_node_id) for m in messages]
            chosen = [self.deviations[n] for n in sampled if n in self.deviations]
            if not chosen:
                log(WARNING, "fedlex: no sampled node explored; G uses every explorer.")
                chosen = list(self.deviations.values())
        return guidance_matrix(chosen, self.guidance_normalization, self.guidance_floor)

    def aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not self.exploring:
            return super().aggregate_valid(server_round, replies)
        self.absorb_exploration(replies)
        metrics = self.train_metrics_aggr_fn(
            [r.content for r in replies], self.weighted_by_key
        )
        return to_record(self.global_arrays), metrics

    def absorb_exploration(self, replies: Sequence[Message]) -> None:
        """Store each explorer's squared deviation from the first explorer's base."""
        base = to_numpy(replies[0].content[BASE])
        self.deviations = {
            str(r.metadata.src_node_id): squared_deviation(
                to_numpy(r.content[keys.ARRAYS]), base
            )
            for r in replies
        }


def _build(common: Mapping[str, Any], hp: Mapping[str, Any]) -> FedLEx:
    return FedLEx(
        **common,
        explore_epochs=hp["explore-epochs"],
        patience=hp["patience"],
        perc_clients_for_mask=hp["perc-clients-for-mask"],
        guidance_normalization=hp["guidance-normalization"],
        guidance_floor=hp["guidance-floor"],
        max_grad_norm=hp["max-grad-norm"],
    )


register(
    AlgorithmEntry(
        "fedlex",
        _build,
        client="fedlex",
        hyperparameters={
            "explore-epochs": 150,
            "patience": 40,
            "perc-clients-for-mask": 1.0,
            "guidance-normalization": "minmax",
            "guidance-floor": 0.0,
            "max-grad-norm": 0.0,
        },
        paper="Internò et al., IJCNN 2024, https://arxiv.org/abs/2506.18640",
        summary="Loss-exploration round builds guidance G; local gradients * G",
        family="optimization",
    )
)
