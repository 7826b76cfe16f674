"""FedPipe: LoRA of heterogeneous ranks on NF-quantised backbones, padded averaging.

Fang, Lin, Chen, Chen, Gao, Fang, "Automated Federated Pipeline for
Parameter-Efficient Fine-Tuning of Large Language Models", arXiv 2024,
https://arxiv.org/abs/2404.06448 (no public code).

- **Resources**: every node has a memory tier; tier ``t`` allows LoRA rank
  ``rank-tiers[t]``. Nodes are assigned to tiers in the order of their ids,
  cyclically (a simulated profile: the spec's stand-in has budgets allowing
  ranks {2, 4, 8}). The frozen base weights are quantised to
  ``quant-bits``-bit NormalFloat on every node (NF4 by default, QLoRA's code,
  simulated: :mod:`tasks.normalfloat`).
- **Server**: the adapters live at the largest rank ``r_max`` (zero-padded);
  node ``k`` of rank ``r_k`` trains the leading ``r_k`` slices. Rank slice
  ``i`` of every ``A`` (row ``i``) and ``B`` (column ``i``) is the weighted
  mean (``n_k``) over the replies whose rank exceeds ``i``, and stays as it
  was when none has it ("partial weights aggregation", the spec's padded
  average); every other trainable entry (the head) is FedAvg's mean.
- **Client** (routine ``fedpipe``): LoRA on the quantised backbone; the slices
  beyond its rank are zeroed and stay zero.

Wire protocol: FedAvg's on the trainable entries (``peft="lora"``,
``lora-rank = r_max``, fixed by :meth:`run_settings`; frozen entries never
travel). Each train message's ``config`` carries this node's
``fedpipe.rank`` and ``fedpipe.quant-bits``. State: none beyond the global
adapters (the node's rank is recomputed from the node list each round and
kept in the round context for aggregation).

Decisions where the spec was open (no public code; the spec's (A) items):

- The wire carries the padded ``r_max`` shapes (zeros beyond ``r_k``), not
  the truncated slices: one model shape keeps every shared piece
  (acceptance, compressors) unchanged; the bytes saved by truncation would be
  ``(r_max - r_k) (d_in + d_out)`` floats per adapter.
- LoRA's scale ``alpha / r`` is ``lora-scale`` (``lora-alpha`` is set to
  ``lora-scale * r_max``) for every node, so a rank-``r_k`` adapter is exactly
  the leading slices of the padded one. Its default 1/4 is QLoRA's (alpha 16
  at r 64; the paper's values were not retrieved); the shared LoRA default
  (alpha 16 at r 8, scale 2) diverged on the conformance CNN at lr 0.1.
- Quantisation applies to the round's training only; the server evaluates
  the full-precision backbone with the merged adapters (FedPipe's final
  merge ``W + B A``).
- Not implemented: the importance-based selection of the adapted weights
  (AdaLoRA-style ``|theta grad|`` scores) and the MILP over ranks and batch
  sizes; ranks come from the tiers and the targets from ``lora-targets``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ConfigRecord

from bouquet.strategies import pieces
from bouquet.strategies.base import Record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.pieces import Replies, State, Updated
from bouquet.strategies.registry import register
from bouquet.tasks import wire
from bouquet.tasks.params import Param

RANK_KEY = "fedpipe.rank"
BITS_KEY = "fedpipe.quant-bits"


def parse_tiers(text: str) -> tuple[int, ...]:
    """``"2,4,8"`` -> ``(2, 4, 8)`` (``ValueError`` naming the key)."""
    try:
        tiers = tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        tiers = ()
    if not tiers or any(not 1 <= t <= 4096 for t in tiers):
        raise ValueError(
            f"fedpipe.rank-tiers={text!r}: expected ranks in [1, 4096], e.g. '2,4,8'"
        )
    return tiers


def rank_axis(key: str) -> int | None:
    """The axis of a LoRA factor that indexes the rank (A: 0, B: 1), else None."""
    if ".lora_A." in key:
        return 0
    if ".lora_B." in key:
        return 1
    return None


class RankSlicedMean(pieces.Combine):
    """Each rank slice averaged over the replies that train it (others: mean)."""

    def update(
        self, replies: Replies, weights: np.ndarray, state: State, ctx: RoundContext
    ) -> Updated:
        delta: dict[str, np.ndarray] = {}
        for key in ctx.shared:
            start = np.asarray(ctx.arrays[key], dtype=np.float64)
            stacked = np.stack([np.asarray(r.arrays[key], np.float64) for r in replies])
            axis = rank_axis(key)
            if axis is None:
                mean = np.tensordot(weights / weights.sum(), stacked, axes=1)
                delta[key] = mean - start
                continue
            new = start.copy()
            ranks = np.array([_rank(r.node, ctx, start.shape[axis]) for r in replies])
            for i in range(start.shape[axis]):
                having = ranks > i
                if not having.any():
                    continue
                w = weights[having] / weights[having].sum()
                chosen = np.take(stacked[having], i, axis=axis + 1)
                index = [slice(None)] * start.ndim
                index[axis] = i
                new[tuple(index)] = np.tensordot(w, chosen, axes=1)
            delta[key] = new - start
        return delta, state


def _rank(node: int, ctx: RoundContext, full: int) -> int:
    return int(ctx.per_node.get(node, {}).get("rank", full))


@register
class FedPipe(FedAvg):
    """FedPipe (see the module docstring)."""

    name = "fedpipe"
    routine = "fedpipe"
    paper = "Fang et al., arXiv 2024, https://arxiv.org/abs/2404.06448"
    tagline = "LoRA of per-node ranks on NF-quantised backbones, rank-sliced mean"
    family = "foundation models"
    params = (
        *FedAvg.params,
        Param(
            "rank-tiers",
            "2,4,8",
            help="LoRA rank each memory tier allows; nodes take tiers in turn",
        ),
        Param(
            "quant-bits", 4, "[0, 8]", "NormalFloat bits of the frozen weights (0: off)"
        ),
        Param(
            "lora-scale",
            0.25,
            "> 0",
            "alpha / r of every adapter (sets lora-alpha = lora-scale * r_max)",
        ),
    )

    def validate(self) -> None:
        """The tiers parse; ``quant-bits`` is 0 or 2..8."""
        parse_tiers(self.rank_tiers)
        if self.quant_bits == 1:
            raise ValueError("fedpipe.quant-bits=1: expected 0 (off) or 2..8")

    @property
    def tiers(self) -> tuple[int, ...]:
        """The parsed ``rank-tiers``."""
        return parse_tiers(self.rank_tiers)

    def run_settings(self) -> dict[str, object]:
        """LoRA at the largest tier's rank (the padded shape every node holds)."""
        rank = max(self.tiers)
        return {"peft": "lora", "lora-rank": rank, "lora-alpha": self.lora_scale * rank}

    def node_rank(self, node: int, nodes: Sequence[int]) -> int:
        """The rank of ``node``'s tier (tiers assigned in node-id order, cyclically)."""
        order = sorted(nodes)
        position = order.index(node) if node in order else 0
        return self.tiers[position % len(self.tiers)]

    def make_aggregator(self) -> pieces.Aggregator:
        """Weighting as FedAvg's, the rank-sliced mean, step 1."""
        weighting = (
            pieces.ByExamples()
            if self.weighting == "num-examples"
            else pieces.Uniform()
        )
        return pieces.Aggregator(weighting, RankSlicedMean(), pieces.ServerSGD())

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        """The default sample, each node told its rank and the quantisation."""
        plan: dict[int, dict[str, Record]] = {}
        for node in self.sample(ctx, self.fraction_train, self.min_train_nodes):
            rank = self.node_rank(node, ctx.nodes)
            ctx.per_node[node] = {"rank": rank}
            plan[node] = {
                wire.CONFIG: ConfigRecord(
                    {**ctx.config, RANK_KEY: rank, BITS_KEY: self.quant_bits}
                )
            }
        return plan
