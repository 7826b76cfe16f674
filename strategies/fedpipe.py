"""FedPipe: importance-selected LoRA, ranks and batches solved per node, NF4.

Fang, Lin, Chen, Chen, Gao, Fang, "Automated Federated Pipeline for
Parameter-Efficient Fine-Tuning of Large Language Models", arXiv 2024,
https://arxiv.org/abs/2404.06448 (no public code).

- **Selection**: candidate weights are the LoRA-adapted layers
  (``lora-targets``). Clients score every adapter they train with AdaLoRA's
  sensitivity (``|theta grad|``, smoothed by an EMA ``importance-beta1``
  and weighted by its uncertainty, EMA ``importance-beta2``: the score is
  ``mean(I_bar U_bar)`` over the adapter's entries) and return the scores as
  shares of their total. The server keeps each adapter's latest score (the
  weighted mean over the replies that trained it). For ``warmup-rounds``
  every adapter is trained; after them, and every ``reselect-every`` rounds
  after that, the top
  ``select-share`` of the adapters by score are kept, with hysteresis
  (:func:`strategies.fedpipe_plan.select`). A dropped adapter is pruned:
  its ``B`` is set to zero (``Delta W = 0``, AdaLoRA's pruning) and it is
  sent to nobody; ``A`` is kept, so a re-selected adapter trains again.
- **Resources and solver**: each node has simulated resources by tier
  (nodes take tiers in node-id order, cyclically): memory
  ``memory-tiers`` times what the smallest configuration needs, compute
  ``speed-tiers`` GFLOP/s, bandwidth ``bandwidth-tiers`` MB/s. Every round
  the rank ``r_k`` (of ``ranks``) and batch size ``b_k`` (of
  ``batch-sizes``) of each sampled node come from the cost model and the
  two-stage solver of :mod:`strategies.fedpipe_plan`; the simulated round
  time is the train metric ``fedpipe.round-time``.
- **Wire and server**: the global adapters live at ``r_max = max(ranks)``.
  Node ``k`` is sent only the selected adapters, cut to its rank (``A[:r_k]``,
  ``B[:, :r_k]``), and the head; it replies in the same shapes. Rank slice
  ``i`` of every ``A`` row / ``B`` column is the weighted mean (``n_k``)
  over the replies that carry it and stays as it was when none does ("partial
  weights aggregation"); the head is FedAvg's mean.
- **Client** (routine ``fedpipe``): LoRA on the backbone with its frozen
  weight matrices NormalFloat-quantised to ``quant-bits`` (QLoRA's code,
  simulated, :mod:`tasks.normalfloat`) for the round's training; what was
  not sent is zero and stays zero; it returns the importance scores.

Wire protocol: each train message's ``arrays`` is the node's part
(``clientapps/partial.py``: absent entries are zero, cut entries are the
leading slices) and its ``config`` carries ``fedpipe.rank``,
``fedpipe.quant-bits``, ``fedpipe.importance-beta1/2`` and the node's
``batch-size``; the reply's ``arrays`` has the shapes sent, plus the record
``fedpipe.importance`` (``scores``: one float per candidate adapter, in
model order; 0 for one not trained). Evaluation sends the whole global
model. State: ``importance`` (adapter -> score) and ``selected`` (None
before the first selection).

Decisions where the spec was open (no public code; the paper body was not
retrieved, its reviews describe an MILP over ranks and batch sizes that
minimises the training loss within the servers' resources):

- The cost model and the solver's objective are the ones of
  :mod:`strategies.fedpipe_plan`: the slowest node's round time at its
  minimum, then the largest rank each other node can afford by that
  deadline. Enumeration solves it exactly (it separates over nodes), so no
  MILP solver is needed. Node resources are simulated tiers; the defaults
  (memory 1 / 2 / 4, speeds 1 / 1.1 / 1.3) give ranks 2 / 4 / 8 on the
  stand-in's ViT.
- Scores are shares of each node's total (AdaLoRA ranks within one model;
  raw ``|theta grad|`` differs across nodes by their loss scale, and a
  diverging node would outvote the rest). An adapter not trained keeps its
  last score; a re-selected one restarts with ``B = 0``, so its first score
  is low: a bias towards the kept set, on top of the hysteresis.
- The sensitivity is AdaLoRA's official ``RankAllocator`` (``update_ipt``,
  ``calculate_score``): ``I = |p grad|``, the uncertainty EMA taken against
  the already-updated ``I_bar``, element score ``I_bar U_bar``. AdaLoRA then
  scores each singular triplet by the means over its ``A`` row and ``B``
  column; here an adapter's score is the mean over all its entries within
  the node's rank. FedPipe itself has no public code (searched again).
- Selection is per adapted weight matrix, not per singular direction (the
  adapters are LoRA's ``B A``, not AdaLoRA's ``P Lambda Q``); the same set
  for every node (the spec's first stage is global).
- The quantisation bits are one setting, not chosen per node: the
  simulated NF quantisation saves no memory on CPU.
- LoRA's scale ``alpha / r`` is ``lora-scale`` for every node (``lora-alpha
  = lora-scale * r_max``), so a rank-``r_k`` adapter is exactly the leading
  slices of the padded one; 1/4 is QLoRA's (alpha 16 at r 64).
- Quantisation applies to the round's training only; the server evaluates
  the full-precision backbone with the merged adapters (``W + B A``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from bouquet.strategies import fedpipe_plan as plan
from bouquet.strategies import pieces
from bouquet.strategies.aggregation import to_record
from bouquet.strategies.base import Record
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.pieces import Replies, State, Updated
from bouquet.strategies.registry import register
from bouquet.strategies.validation import ClientReply, array_spec
from bouquet.tasks import wire
from bouquet.tasks.params import Param

RANK_KEY = "fedpipe.rank"
BITS_KEY = "fedpipe.quant-bits"
IMPORTANCE = "fedpipe.importance"
SCORES = "scores"
ROUND_TIME = "fedpipe.round-time"


def parse_numbers(key: str, text: str, kind: type = int) -> tuple:
    """``"2,4,8"`` -> ``(2, 4, 8)`` (positive; ``ValueError`` naming the key)."""
    try:
        values = tuple(kind(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        values = ()
    if not values or any(not 0 < v <= 1e12 for v in values):
        raise ValueError(
            f"fedpipe.{key}={text!r}: expected positive numbers, e.g. '2,4,8'"
        )
    return values


def rank_axis(key: str) -> int | None:
    """The axis of a LoRA factor that indexes the rank (A: 0, B: 1), else None."""
    if ".lora_A." in key:
        return 0
    if ".lora_B." in key:
        return 1
    return None


def node_part(
    arrays: Mapping[str, np.ndarray], rank: int, selected: Sequence[str]
) -> NDArrays:
    """What a node of ``rank`` gets: the head, the selected adapters cut to it."""
    keep = {k for a in selected for k in plan.adapters(list(arrays)).get(a, ())}
    part = {}
    for key, value in arrays.items():
        axis = rank_axis(key)
        if axis is None:
            part[key] = value
        elif key in keep:
            part[key] = value[:rank] if axis == 0 else value[:, :rank]
    return part


class RankSlicedMean(pieces.Combine):
    """Each entry and rank slice averaged over the replies that carry it."""

    def update(
        self, replies: Replies, weights: np.ndarray, state: State, ctx: RoundContext
    ) -> Updated:
        delta: dict[str, np.ndarray] = {}
        for key in ctx.shared:
            start = np.asarray(ctx.arrays[key], dtype=np.float64)
            having = [
                (w, r.arrays[key])
                for w, r in zip(weights, replies, strict=True)
                if key in r.arrays
            ]
            axis = rank_axis(key)
            new = start.copy()
            if axis is None and having:
                new = _mean(having)
            elif axis is not None:
                for i in range(start.shape[axis]):
                    carry = [
                        (w, np.take(a, i, axis)) for w, a in having if a.shape[axis] > i
                    ]
                    if carry:  # else the slice stays as it was
                        index = [slice(None)] * start.ndim
                        index[axis] = i
                        new[tuple(index)] = _mean(carry)
            delta[key] = new - start
        return delta, state


def _mean(weighted: list[tuple[float, np.ndarray]]) -> np.ndarray:
    w = np.array([p[0] for p in weighted], dtype=np.float64)
    values = np.stack([np.asarray(p[1], dtype=np.float64) for p in weighted])
    return np.tensordot(w / w.sum(), values, axes=1)


@register
class FedPipe(FedAvg):
    """FedPipe (see the module docstring)."""

    name = "fedpipe"
    routine = "fedpipe"
    paper = "Fang et al., arXiv 2024, https://arxiv.org/abs/2404.06448"
    tagline = "Importance-selected LoRA, per-node rank/batch solver, NF4, sliced mean"
    family = "foundation models"
    broadcasts_global_model = False  # each node gets its own part
    reply_records = (IMPORTANCE,)
    params = (
        *FedAvg.params,
        Param("ranks", "2,4,8", help="candidate LoRA ranks (r_max: the largest)"),
        Param("batch-sizes", "16,32", help="candidate batch sizes"),
        Param(
            "memory-tiers",
            "1,2,4",
            help="node memory, in units of the smallest configuration's need",
        ),
        Param("speed-tiers", "1,1.1,1.3", help="node compute, GFLOP/s"),
        Param("bandwidth-tiers", "10", help="node bandwidth each way, MB/s"),
        Param("tokens", 1, ">= 1", "positions per example through an adapted layer"),
        Param("round-examples", 256, ">= 1", "examples a node trains per round (cost)"),
        Param("select-share", 0.5, "(0, 1]", "share of the adapters kept"),
        Param("warmup-rounds", 1, ">= 1", "rounds training every adapter first"),
        Param("reselect-every", 5, ">= 1", "rounds between selections"),
        Param("hysteresis", 0.1, ">= 0", "factor a newcomer's score must beat"),
        Param("importance-beta1", 0.85, "[0, 1)", "EMA of the sensitivity", send=True),
        Param("importance-beta2", 0.85, "[0, 1)", "EMA of its uncertainty", send=True),
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
        """The lists parse; ``quant-bits`` is 0 or 2..8."""
        parse_numbers("ranks", self.ranks)
        parse_numbers("batch-sizes", self.batch_sizes)
        for key in ("memory-tiers", "speed-tiers", "bandwidth-tiers"):
            parse_numbers(key, getattr(self, key.replace("-", "_")), float)
        if self.quant_bits == 1:
            raise ValueError("fedpipe.quant-bits=1: expected 0 (off) or 2..8")

    def init_state(self) -> dict[str, Any]:
        """No scores, no selection yet (every adapter is trained)."""
        return {"importance": {}, "selected": None}

    def run_settings(self) -> dict[str, object]:
        """LoRA at the largest candidate rank (the global adapters' shape)."""
        rank = max(parse_numbers("ranks", self.ranks))
        return {"peft": "lora", "lora-rank": rank, "lora-alpha": self.lora_scale * rank}

    def profiles(
        self, nodes: Sequence[int], cost: plan.CostModel
    ) -> dict[int, plan.Profile]:
        """Each node's simulated resources (tiers in node-id order, cyclically)."""
        memory = parse_numbers("memory-tiers", self.memory_tiers, float)
        speed = parse_numbers("speed-tiers", self.speed_tiers, float)
        bandwidth = parse_numbers("bandwidth-tiers", self.bandwidth_tiers, float)
        need = cost.memory(
            min(parse_numbers("ranks", self.ranks)),
            min(parse_numbers("batch-sizes", self.batch_sizes)),
        )
        return {
            node: plan.Profile(
                memory[i % len(memory)] * need,
                speed[i % len(speed)] * 1e9,
                bandwidth[i % len(bandwidth)] * 1e6,
            )
            for i, node in enumerate(sorted(nodes))
        }

    def selected(self, arrays: Mapping[str, np.ndarray]) -> list[str]:
        """The adapters trained this round (all of them before the first selection)."""
        names = list(plan.adapters(list(arrays)))
        chosen = self.state.get("selected")
        return names if chosen is None else [a for a in names if a in chosen]

    def cost_model(
        self, arrays: Mapping[str, np.ndarray], selected: Sequence[str]
    ) -> plan.CostModel:
        """The cost model of training ``selected`` (dims read from the arrays)."""
        found = plan.adapters(list(arrays))
        dims = tuple(
            plan.adapter_dims(arrays[found[a][0]], arrays[found[a][1]])
            for a in selected
        )
        head = sum(int(v.size) for k, v in arrays.items() if rank_axis(k) is None)
        return plan.CostModel(
            dims, head, self.tokens, self.round_examples, self.quant_bits
        )

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        """The default sample, each node sent its part and told its rank and batch."""
        sampled = self.sample(ctx, self.fraction_train, self.min_train_nodes)
        selected = self.selected(ctx.arrays)
        cost = self.cost_model(ctx.arrays, selected)
        profiles = self.profiles(ctx.nodes, cost)
        solution = plan.solve(
            {n: profiles[n] for n in sampled},
            cost,
            parse_numbers("ranks", self.ranks),
            parse_numbers("batch-sizes", self.batch_sizes),
        )
        messages: dict[int, dict[str, Record]] = {}
        for node in sampled:
            rank, batch, seconds = solution[node]
            part = node_part(ctx.arrays, rank, selected)
            ctx.per_node[node] = {
                "rank": rank,
                "time": seconds,
                "spec": array_spec(part),
            }
            config = {**ctx.config, RANK_KEY: rank, BITS_KEY: self.quant_bits}
            config[wire.BATCH_SIZE] = batch
            messages[node] = {
                wire.ARRAYS: to_record(part),
                wire.CONFIG: ConfigRecord(config),
            }
        return messages

    def node_reply_specs(self, ctx: RoundContext) -> dict[int, Any]:
        """Each node replies in the shapes it was sent."""
        return {n: info["spec"] for n, info in ctx.per_node.items() if "spec" in info}

    def record_specs(
        self, ctx: RoundContext, model_spec: Mapping[str, Any]
    ) -> dict[str, Mapping[str, Any]]:
        """``fedpipe.importance``: one float32 score per candidate adapter."""
        count = len(plan.adapters(list(ctx.arrays)))
        return {IMPORTANCE: {SCORES: ((count,), "float32")}}

    def make_aggregator(self) -> pieces.Aggregator:
        """Weighting as FedAvg's, the rank-sliced mean, step 1."""
        weighting = (
            pieces.ByExamples()
            if self.weighting == "num-examples"
            else pieces.Uniform()
        )
        return pieces.Aggregator(weighting, RankSlicedMean(), pieces.ServerSGD())

    def aggregate(self, replies: Sequence[ClientReply], ctx: RoundContext) -> NDArrays:
        """The sliced mean, the scores; every ``reselect-every`` rounds a selection."""
        arrays = dict(super().aggregate(replies, ctx))
        names = list(plan.adapters(list(ctx.arrays)))
        trained = self.selected(ctx.arrays)
        weights = np.array([r.num_examples for r in replies], dtype=np.float64)
        scores = np.stack(
            [np.asarray(r.records[IMPORTANCE][SCORES], np.float64) for r in replies]
        )
        importance = dict(self.state["importance"])
        mean = np.tensordot(weights / weights.sum(), scores, axes=1)
        for i, name in enumerate(names):
            if name in trained:
                importance[name] = float(mean[i])
        self.state["importance"] = importance
        since = ctx.server_round - self.warmup_rounds
        if since >= 0 and since % self.reselect_every == 0 and names:
            count = max(1, round(self.select_share * len(names)))
            scored = {a: importance.get(a, 0.0) for a in names}
            chosen = plan.select(scored, self.state["selected"], count, self.hysteresis)
            found = plan.adapters(list(ctx.arrays))
            for name in names:
                if name not in chosen:  # pruned: Delta W = B A = 0
                    b = found[name][1]
                    arrays[b] = np.zeros_like(arrays[b])
            self.state["selected"] = chosen
        return arrays

    def train_metrics(
        self, replies: Sequence[ClientReply], ctx: RoundContext
    ) -> dict[str, float]:
        """The cost model's round time (the slowest node's), the share trained."""
        times = [ctx.per_node[n]["time"] for n in ctx.sampled if n in ctx.per_node]
        names = plan.adapters(list(ctx.arrays))
        sent = next(iter(ctx.per_node.values()), {}).get("spec", {})
        share = len(plan.adapters(list(sent))) / len(names) if names else 1.0
        return {ROUND_TIME: max(times, default=0.0), "fedpipe.adapter-share": share}
