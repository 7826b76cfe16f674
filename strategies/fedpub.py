"""FED-PUB: personalised subgraph FL, similarity-weighted per-node aggregation.

Baek, Jeong, Jin, Yoon, Hwang, "Personalized Subgraph Federated Learning",
ICML 2023, https://arxiv.org/abs/2206.10206 (official code:
github.com/JinheonBaek/FED-PUB, read at commit bb551334).

- **Client** (``clientapps/recipes/fedpub.py``, model wrapper ``masked``:
  ``tasks/masked.py``): every linear weight ``W`` is used as ``W * M`` with
  a learnable personal mask ``M`` (ones at first; entries ``|m| < l1`` are
  pruned in eval mode). Load the received weights (never the masks), keep
  them as ``theta_bar``, train with
  ``CE + l1 sum ||M||_1 + loc-l2 sum_W ||W - theta_bar||_2`` (unsquared L2 per
  tensor over the non-mask parameters, from round 2 on), then compute the
  functional embedding ``e``: in eval mode, the mean over the proxy graph's
  nodes of the second GCN layer's output before its ReLU (for a model
  without ``embed``, the classifier's input over a Gaussian proxy batch).
- **Server**, over the round's replies: ``S_ij = cos(e_i, e_j)``;
  ``alpha_ij = exp(tau S_ij) / sum_k exp(tau S_ik)`` (``agg-norm = exp``) or
  ``S_ij / sum_k S_ik`` (``cosine``); node ``i``'s next model is
  ``theta_bar_i = sum_j alpha_ij theta_j`` over every shared tensor; the
  global model is the sample-weighted mean (FedAvg's), used for nodes that
  never replied and for the central accuracy.

Wire protocol: a train or evaluate message's ``arrays`` is the node's
``theta_bar`` where the server holds one, else the global model; config
``fedpub.l1``, ``fedpub.loc-l2``, ``fedpub.n-proxy``, ``fedpub.proxy-seed``
(the proxy graph is rebuilt from the seed on every node) and
``model-wrapper = "masked"``. The train reply carries ``arrays`` (the local
weights, masks left out: they are personal), ``num_examples`` (training
nodes) and the record ``fedpub.embedding`` (entry ``e``, float32, the width of
the classifier's input: 128 for the GCN). Server state
(``state["fedpub"]``): each node's ``theta_bar`` by node id, O(nodes x
model) as in the paper's server, and the last round's similarity matrix
(O(participants^2)). Client state: the masks and their pruning thresholds
(personal parameters ``*.mask``, ``*.prune_below`` in ``Context.state``).
Train metrics: ``fedpub-self-weight`` (mean ``alpha_ii``; ``1/m`` is no
personalisation) and ``fedpub-similarity`` (mean off-diagonal ``S_ij``).

Decisions where the spec was open
---------------------------------
- The proxy graph is generated on every node from ``proxy-seed`` (the
  official server builds it once and ships it): the same networkx SBM and a
  seeded NumPy ``N(0, 1)`` for its features, so every node agrees.
- The official client adds the L1 and proximal terms computed on
  ``model.state_dict()``, whose tensors are detached: they change the logged
  loss, not the gradients (the masks move by cross-entropy and Adam's weight
  decay only). Here the terms have gradients, as the paper writes them;
  ``l1 = loc-l2 = 0`` trains as the official code does, but then nothing is
  pruned either (``l1`` is also the pruning threshold).
- The proximal term is skipped in round 1 (the official ``curr_rnd == 0``),
  read from the message's ``server-round``; it covers weights and biases.
- No Adam state across rounds: the loop builds its optimizer per message
  (the official client keeps it); the reproduction uses ``optimizer = adam``.
- Similarities among the round's participants only; a node that did not
  take part keeps its last ``theta_bar``. Cosine of a zero embedding is 0.
  With ``agg-norm = cosine`` and a row summing to <= 0 (possible with
  negative cosines), the row falls back to uniform weights.
- Any model works (conformance runs a CNN on digits): masks wrap its linear
  layers, and a model without ``embed`` is described by the mean classifier
  input over ``100 n-proxy`` Gaussian inputs shaped like its data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from bouquet.strategies.aggregation import cast_like, to_record
from bouquet.strategies.base import BouquetStrategy
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.pieces import Aggregator, ByExamples, ServerSGD, WeightedMean
from bouquet.strategies.registry import register
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire
from bouquet.tasks.masked import MASK_ENTRIES
from bouquet.tasks.params import Param

STATE = "fedpub"
EMBEDDING = "fedpub.embedding"
EMBEDDING_KEY = "e"
AGG_NORMS = ("exp", "cosine")


def cosine_similarity(embeddings: np.ndarray) -> np.ndarray:
    """``S_ij = cos(e_i, e_j)`` of the rows; a zero row has similarity 0."""
    e = np.asarray(embeddings, np.float64)
    norms = np.linalg.norm(e, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = e / safe[:, None]
    return np.where((norms[:, None] > 0) & (norms[None, :] > 0), unit @ unit.T, 0.0)


def aggregation_weights(
    similarity: np.ndarray, norm_scale: float, agg_norm: str = "exp"
) -> np.ndarray:
    """Row-stochastic ``alpha`` from similarities (``exp``: softmax of ``tau S``)."""
    s = np.asarray(similarity, np.float64)
    if agg_norm == "exp":
        logits = norm_scale * s
        w = np.exp(logits - logits.max(axis=1, keepdims=True))  # stable softmax
    else:
        w = s.copy()
    sums = w.sum(axis=1, keepdims=True)
    uniform = np.full_like(w, 1.0 / len(w))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sums > 0, w / sums, uniform)


def head_width(arrays: Mapping[str, np.ndarray]) -> int:
    """Width of the classifier's input: the embedding's dimension."""
    head = wire.resolve_personal([wire.HEAD], list(arrays))
    weights = [k for k in head if np.asarray(arrays[k]).ndim == 2]
    if not weights:
        raise ValueError(f"no 2-D classifier weight among {head}")
    return int(np.asarray(arrays[weights[0]]).shape[1])


@register
class FedPub(BouquetStrategy):
    """FED-PUB (see the module docstring)."""

    name = "fedpub"
    routine = "fedpub"
    broadcasts_global_model = False  # each node gets its own model
    model_wrapper = "masked"
    paper = "Baek et al., ICML 2023, https://arxiv.org/abs/2206.10206"
    tagline = "Per-node models weighted by functional similarity on a proxy graph"
    family = "personalization"
    params = (
        Param("norm-scale", 10.0, ">= 0", "tau, softmax temperature on similarities"),
        Param("agg-norm", "exp", help="similarity normalisation", choices=AGG_NORMS),
        Param(
            "l1",
            1e-3,
            "[0, 1]",
            "lambda_1: mask L1 weight and pruning threshold",
            send=True,
        ),
        Param("loc-l2", 1e-3, ">= 0", "lambda_2: unsquared proximal weight", send=True),
        Param("n-proxy", 5, "[1, 20]", "proxy graph blocks of 100 nodes", send=True),
        Param("proxy-seed", 1234, ">= 0", "seed of the shared proxy graph", send=True),
    )
    reply_records = (EMBEDDING,)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.personal = tuple(dict.fromkeys((*self.personal, *MASK_ENTRIES)))

    def make_aggregator(self) -> Aggregator:
        """The global model: the sample-weighted mean of the replied models."""
        return Aggregator(ByExamples(), WeightedMean(of="models"), ServerSGD())

    def init_state(self) -> dict[str, Any]:
        return {STATE: {"models": {}, "similarity": np.zeros((0, 0))}}

    def dp_problem(self) -> str:
        return "each node's model is a similarity-weighted mix of raw client models"

    def record_specs(
        self, ctx: RoundContext, model_spec: Mapping[str, Any]
    ) -> dict[str, Mapping[str, Any]]:
        """``fedpub.embedding``: one float32 vector, the classifier's input width."""
        return {EMBEDDING: {EMBEDDING_KEY: ((head_width(ctx.arrays),), "float32")}}

    def node_arrays(self, node: int) -> ArrayRecord | None:
        """Its ``theta_bar`` once it has one (trained from, evaluated on)."""
        model = self.state[STATE]["models"].get(str(node))
        return None if model is None else to_record(model)

    def aggregate(self, replies: Sequence[ClientReply], ctx: RoundContext) -> NDArrays:
        """The global model by the chain; each replying node's ``theta_bar``."""
        global_arrays = super().aggregate(replies, ctx)
        embeddings = np.stack(
            [np.asarray(r.records[EMBEDDING][EMBEDDING_KEY]) for r in replies]
        )
        similarity = cosine_similarity(embeddings)
        alpha = aggregation_weights(similarity, self.norm_scale, self.agg_norm)
        keys = [
            k
            for k in global_arrays
            if k not in ctx.personal and ctx.arrays[k].dtype.kind == "f"
        ]
        models = dict(self.state[STATE]["models"])
        for i, reply in enumerate(replies):
            mine = {k: np.array(v) for k, v in global_arrays.items()}
            for key in keys:
                mixed = sum(
                    alpha[i, j] * np.asarray(r.arrays[key], np.float64)
                    for j, r in enumerate(replies)
                )
                mine[key] = cast_like(mixed, ctx.arrays[key])
            models[str(reply.node)] = mine
        self.state[STATE] = {"models": models, "similarity": similarity}
        for i, reply in enumerate(replies):
            ctx.per_node[reply.node] = {"self-weight": float(alpha[i, i])}
        return global_arrays

    def train_metrics(
        self, replies: Sequence[ClientReply], ctx: RoundContext
    ) -> dict[str, float]:
        """Mean ``alpha_ii`` and mean off-diagonal similarity of the round."""
        metrics = {
            "fedpub-self-weight": float(
                np.mean([ctx.per_node[r.node]["self-weight"] for r in replies])
            )
        }
        s = self.state[STATE]["similarity"]
        if len(s) > 1:
            metrics["fedpub-similarity"] = float(s[~np.eye(len(s), dtype=bool)].mean())
        return metrics
