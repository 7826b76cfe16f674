"""KnFu: personalised fusion of the effective knowledge of semantic neighbours.

Seyedmohammadi, Atapour, Abouei, Mohammadi, "KnFu: Effective Knowledge Fusion",
2024 preprint, https://arxiv.org/abs/2403.11892 (no public code).

- **Server**: keeps each node's latest knowledge ``P_k`` (soft predictions on
  the shared transfer set, ``N x C``); for every node ``k`` it measures
  ``D_kj = mean_x KL(P_k(x) || P_j(x))`` to every other node, keeps the
  semantic neighbours ``N_k = {j != k : D_kj <= mean_j D_kj}`` and fuses
  ``Q_k = sum_{j in N_k} w_kj P_j`` with ``w_kj = softmax_j(-beta D_kj)``
  (:func:`fuse`). No weights are averaged: there is no global model.
- **Client** (routine ``knfu``): its whole model is personal (kept in
  ``Context.state``); local CE training on its data plus, when it has a
  target ``Q_k``, ``distill-weight * T^2 * KL(Q_k || softmax(f(x)/T))`` on a
  transfer batch each step; then it extracts ``P_k = softmax(f(X_pub)/T)``.

Wire protocol: every train message carries the transfer inputs
(``knfu.transfer``: ``{"x": N x input}``) and ``config["knfu.temperature"]``,
``["knfu.distill-weight"]``; a node with a fused target also gets
``knfu.target`` (``{"<sample id>": C probabilities}``). The reply's ``arrays``
is empty (every entry personal) and its record ``knfu.knowledge`` holds
``{"<sample id>": C probabilities}`` for every transfer sample, checked like a
model (keys in order, shapes, dtype, finite) and then as distributions (non-
negative, summing to 1). Server state: ``knowledge`` and ``targets`` by node id.

Decisions where the spec was open
---------------------------------
- The transfer set is a seeded draw of ``transfer-size`` inputs of the run's
  held-out split (``tasks/transfer.py``), sent in the message, so that clients
  need no second data source; labels are never used.
- Divergence direction ``KL(P_k || P_j)`` (k's view), ``eps`` = 1e-8 inside the
  logs; neighbours at or below the mean divergence (``neighbours = "all"``
  keeps every other node: with ``beta = 0`` the uniform average, the FedMD-style
  baseline); ``k`` itself excluded (its own knowledge is in its model);
  ``beta`` = 10 (the paper's).
- Fine-tuning on ``Q_k`` is folded into the next round's local training as a
  loss term on a transfer batch per step (one loop, architecture rule 2),
  instead of separate distillation epochs; the spec's order (train, extract,
  fuse, distil) becomes (distil+train, extract) per round, fuse on the server.
- A node not sampled keeps its last knowledge in the fusion of the others.
- Central accuracy is the untouched initial model (``global_model = False``):
  the metric is the nodes' own accuracy (ALMA = ``node-accuracy-mean``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bouquet.strategies.aggregation import to_record
from bouquet.strategies.base import BouquetStrategy, Record
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.registry import register
from bouquet.strategies.validation import ClientReply
from bouquet.tasks.params import Param
from bouquet.tasks.soft_labels import distribution_problem, keyed

TRANSFER = "knfu.transfer"
TARGET = "knfu.target"
KNOWLEDGE = "knfu.knowledge"
EPS = 1e-8


def divergences(knowledge: np.ndarray) -> np.ndarray:
    """``D[k, j] = mean_x KL(P_k(x) || P_j(x))`` for stacked ``P`` (K x N x C)."""
    p = np.asarray(knowledge, dtype=np.float64)
    logs = np.log(p + EPS)
    own = np.einsum("knc,knc->kn", p, logs)  # sum_c P_k log P_k
    cross = np.einsum("knc,jnc->kjn", p, logs)  # sum_c P_k log P_j
    return (own[:, None, :] - cross).mean(axis=2)


def fuse(
    knowledge: np.ndarray, beta: float, rule: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """Every node's fused target and its fusion weights (K x K, zero diagonal).

    ``rule``: ``"mean"`` keeps the neighbours at or below the mean divergence
    (KnFu), ``"all"`` every other node (with ``beta = 0``: the uniform average
    of FedMD-style distillation). A node with no other node gets no weights:
    its row of the weights is zero and its target is NaN.
    """
    p = np.asarray(knowledge, dtype=np.float64)
    count = len(p)
    d = divergences(p)
    weights = np.zeros((count, count))
    for k in range(count):
        others = [j for j in range(count) if j != k]
        if not others:
            continue
        row = d[k, others]
        chosen = [
            j
            for j, v in zip(others, row, strict=True)
            if rule == "all" or v <= row.mean()
        ]
        logits = -beta * d[k, chosen]
        w = np.exp(logits - logits.max())
        weights[k, chosen] = w / w.sum()
    targets = np.einsum("kj,jnc->knc", weights, p)
    targets[weights.sum(axis=1) == 0] = np.nan
    return targets, weights


@register
class KnFu(BouquetStrategy):
    """KnFu (see the module docstring)."""

    name = "knfu"
    routine = "knfu"
    paper = "Seyedmohammadi et al., 2024, https://arxiv.org/abs/2403.11892"
    tagline = "Soft labels on a transfer set, fused per client from its neighbours"
    family = "personalized"
    global_model = False
    params = (
        Param("beta", 10.0, ">= 0", "fusion sharpness (Eq. 8)"),
        Param(
            "neighbours",
            "mean",
            help="'mean': divergence <= mean (KnFu); 'all': every other node",
            choices=("mean", "all"),
        ),
        Param("temperature", 1.0, "(0, 100]", "softmax temperature T", send=True),
        Param("distill-weight", 1.0, "[0, 1000]", "weight of the KL term", send=True),
        Param("transfer-size", 200, "[1, 100000]", "transfer-set inputs"),
    )
    reply_records = (KNOWLEDGE,)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.personal = ("*",)  # models never leave the nodes
        self.transfer: np.ndarray | None = None
        """The transfer inputs (N x input shape); :meth:`from_run_config` draws
        them (``tasks/transfer.py``), a direct user sets them."""
        self.num_classes: int | None = None

    @classmethod
    def from_run_config(
        cls, common: Mapping[str, Any], run_config: Mapping[str, Any]
    ) -> KnFu:
        """Build, then draw the transfer set of the run's data."""
        from bouquet.tasks import DataSpec, dataset_info
        from bouquet.tasks.transfer import transfer_inputs

        strategy = super().from_run_config(common, run_config)
        assert isinstance(strategy, KnFu)
        spec = DataSpec.from_run_config(run_config, num_partitions=1)
        strategy.transfer = transfer_inputs(run_config, strategy.transfer_size)
        strategy.num_classes = dataset_info(spec).num_classes
        return strategy

    def init_state(self) -> dict[str, Any]:
        return {"knfu": {"knowledge": {}, "targets": {}, "neighbours": 0.0}}

    def _ready(self) -> tuple[np.ndarray, int]:
        if self.transfer is None or self.num_classes is None:
            raise RuntimeError(
                "KnFu needs its transfer set: build it with KnFu.from_run_config, "
                "or set strategy.transfer (inputs) and strategy.num_classes."
            )
        return self.transfer, self.num_classes

    def outgoing_records(self, ctx: RoundContext) -> dict[str, Record]:
        transfer, _ = self._ready()
        return {TRANSFER: to_record({"x": transfer})}

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        targets = self.state["knfu"]["targets"]
        plan: dict[int, dict[str, Record]] = {}
        for node in self.sample(ctx, self.fraction_train, self.min_train_nodes):
            target = targets.get(str(node))
            plan[node] = {} if target is None else {TARGET: to_record(keyed(target))}
        return plan

    def record_specs(
        self, ctx: RoundContext, model_spec: Mapping[str, Any]
    ) -> dict[str, Mapping[str, Any]]:
        transfer, classes = self._ready()
        entry = ((classes,), "float32")
        return {KNOWLEDGE: {str(i): entry for i in range(len(transfer))}}

    def reply_problem(self, reply: ClientReply, ctx: RoundContext) -> str:
        """The knowledge must be distributions."""
        if ctx.phase != "train":
            return ""
        problem = distribution_problem(reply.records[KNOWLEDGE])
        return f"'{KNOWLEDGE}' {problem}" if problem else ""

    def aggregate(self, replies: Sequence[ClientReply], ctx: RoundContext) -> NDArrays:
        """Store the replies' knowledge, fuse every node's target; arrays unchanged."""
        knowledge = dict(self.state["knfu"]["knowledge"])
        for reply in replies:
            rows = reply.records[KNOWLEDGE]
            knowledge[str(reply.node)] = np.stack([rows[k] for k in rows])
        nodes = sorted(knowledge, key=int)
        stacked = np.stack([knowledge[n] for n in nodes])
        targets, weights = fuse(stacked, self.beta, self.neighbours)
        self.state["knfu"] = {
            "knowledge": knowledge,
            "targets": {
                n: targets[i].astype(np.float32)
                for i, n in enumerate(nodes)
                if weights[i].sum() > 0
            },
            "neighbours": float((weights > 0).sum(axis=1).mean()),
        }
        return dict(ctx.arrays)

    def train_metrics(
        self, replies: Sequence[ClientReply], ctx: RoundContext
    ) -> dict[str, float]:
        """The mean number of neighbours a node's target fuses."""
        return {"knfu.neighbours": self.state["knfu"]["neighbours"]}
