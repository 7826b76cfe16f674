"""FRL: Federated Rank Learning, a vote over supermask rankings (robust).

Paper: Mozaffari, Shejwalkar, Houmansadr. "Every Vote Counts: Ranking-Based
Training of Federated Learning to Resist Poisoning Attacks", USENIX Security
2023 (arXiv 2110.04350, "FRL: Federated Rank Learning").
https://arxiv.org/abs/2110.04350. Official code: github.com/SPIN-UMass/FRL
(``FL_train.py::FRL_train``, ``utils.py::FRL_Vote``), read for the decisions.

- **Client** (recipe ``frl``, ``clientapps/recipes/frl.py``): weights frozen at
  a seeded signed constant ``W``; train the edge scores ``s`` (edge-popup,
  straight-through), the model being ``W * M(s)`` with ``M`` the top ``k``
  fraction of scores; reply the positions of the edges in the ascending
  order of the scores.
- **Server** (:class:`RankVote`, a combine rule), per masked entry: the
  reputation of edge ``e`` is the sum of its positions over the replies;
  sorting the edges by reputation gives the new global ranking, and the edge
  at position ``j`` gets ``v[j]``, the ``j``-th smallest initial score. The
  global model is ``W * M(s)``. Every client has one bounded vote per edge.

Wire protocol: ``arrays`` (the masked model), the record ``frl.scores`` (the
global scores, model-shaped, zeros for unmasked entries) and ``frl.k`` in the
config; replies carry ``arrays`` and the record ``frl.ranks`` (positions as
float32). Server state: the combine piece's ``scores``. ``W`` and the initial
scores derive from ``(seed, entry name)`` on both sides (``tasks/supermask.py``)
and never travel.

Decisions where the spec was open:

- The mask keeps the top ``k`` by *raw* score, the quantity ranked and voted
  on (the official ``MaskConv`` masks by ``|score|``, inconsistent with its
  vote, see the spec's pitfalls).
- A reply's positions are re-ranked on the server (``positions`` of what was
  sent), so any vector counts as the permutation it orders to: a forged
  reply cannot cast more than one vote per edge.
- Masked entries are the float entries with ndim >= 2 (Linear / Conv
  weights). The models here have biases and BatchNorm, which FRL's have not:
  clients never train them (they keep their initial values), and the
  unmasked entries (BatchNorm statistics) take the replies' coordinate
  median, so that a few clients cannot move them.
- Votes are unweighted (one per client), as the official code.
- The score optimizer is the shared local SGD (``lr``, ``momentum``,
  ``weight-decay``; the paper: 0.4, 0.9, 1e-4, with ``lr * 0.999^t``).
- Golden fixture: the official ``Find_rank``, ``FRL_Vote`` and ``GetSubnet``
  run on CPU (``tests/strategies/data/frl_official.json``, @4cf2550): our
  positions, vote and mask of the raw scores match; the ``|score|`` mask
  differs, as said above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bouquet.strategies.aggregation import cast_like, coordinate_median, to_record
from bouquet.strategies.base import BouquetStrategy, Record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedhyper import trainable_keys
from bouquet.strategies.pieces import (
    Aggregator,
    Combine,
    Replies,
    ServerSGD,
    State,
    Uniform,
    Updated,
)
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param
from bouquet.tasks.supermask import (
    frozen_weight,
    initial_scores,
    is_masked,
    positions,
    top_k_mask,
)
from bouquet.tasks.wire import algorithm_key

SCORES = algorithm_key("frl", "scores")
RANKS = algorithm_key("frl", "ranks")


def vote(rankings: Sequence[np.ndarray], values: np.ndarray) -> np.ndarray:
    """New scores: edges sorted by summed positions get the sorted ``values``."""
    reputation = np.sum([positions(r).ravel() for r in rankings], axis=0)
    order = np.argsort(reputation, kind="stable")
    scores = np.empty(values.size, dtype=np.float64)
    scores[order] = np.sort(values.ravel())
    return scores.reshape(np.shape(rankings[0]))


def global_scores(
    state: State, arrays: dict[str, np.ndarray], seed: int
) -> dict[str, np.ndarray]:
    """The scores of every masked entry: the state's, else the initial ones."""
    saved = (state or {}).get("scores") or {}
    return {
        k: saved[k] if k in saved else initial_scores(k, v.shape, seed).astype(v.dtype)
        for k, v in arrays.items()
        if is_masked(v)
    }


@dataclass(frozen=True)
class RankVote(Combine):
    """FRL's vote on the masked entries, the median elsewhere (see the module)."""

    k: float = 0.5

    def init(self) -> State:
        return {"scores": {}}

    def update(
        self, replies: Replies, weights: np.ndarray, state: State, ctx: RoundContext
    ) -> Updated:
        shared = {k: ctx.arrays[k] for k in ctx.shared}
        scores = {}
        delta = {}
        for key, x in shared.items():
            if is_masked(x):
                values = initial_scores(key, x.shape, ctx.seed)
                ranks = [r.records[RANKS][key] for r in replies]
                scores[key] = cast_like(vote(ranks, values), x)
                mask = top_k_mask(scores[key], self.k)
                model = frozen_weight(key, x.shape, ctx.seed) * mask
            else:
                model = coordinate_median([r.arrays[key] for r in replies])
            delta[key] = np.subtract(model, x, dtype=np.float64)
        return delta, {"scores": scores}


@register
class FRL(BouquetStrategy):
    """FRL (see the module docstring)."""

    name = "frl"
    routine = "frl"
    paper = "Mozaffari et al., USENIX Security 2023, https://arxiv.org/abs/2110.04350"
    tagline = "Supermask scores trained locally; server votes on edge rankings"
    family = "robustness"
    params = (Param("k", 0.5, "(0, 1]", "share of edges kept (sparsity)", send=True),)
    reply_records = (RANKS,)

    def make_aggregator(self) -> Aggregator:
        """Uniform weights (unused), the vote, a step of 1."""
        return Aggregator(Uniform(), RankVote(self.k), ServerSGD())

    def outgoing_records(self, ctx: RoundContext) -> dict[str, Record]:
        """``frl.scores``: the global scores, zeros for the other parameters."""
        shared = {k: ctx.arrays[k] for k in ctx.shared}
        scores = global_scores(self.state["aggregator"]["combine"], shared, ctx.seed)
        return {
            SCORES: to_record(
                {
                    k: scores[k] if k in scores else np.zeros_like(shared[k])
                    for k in trainable_keys(shared)
                }
            )
        }
