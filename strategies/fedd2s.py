"""FedD2S: personalised data-free federated distillation, deep-to-shallow dropping.

Atapour, Seyedmohammadi, Abouei, Mohammadi, Plataniotis, "FedD2S: Personalized
Data-Free Federated Knowledge Distillation", 2024 preprint,
https://arxiv.org/abs/2402.10846 (no public code).

- **Server**: one head ``H_c`` per cut point ``c`` of the dropping set (a
  linear softmax classifier on the representation at that cut). Each round it
  trains the current cut's head on every reply's representations ``h`` with
  ``CE(H_c h, y) + beta T^2 KL(softmax(z/T) || softmax(H_c h / T))`` (``z``:
  the node's own logits; client -> server distillation, :func:`train_head`),
  then computes each replying node's soft labels ``s(x) = softmax(H_c h(x)/T)``
  and keeps them until that node is sampled again. No weights are averaged:
  there is no global model.
- **Client** (routine ``fedd2s``): its whole model is personal (kept in
  ``Context.state``); local CE training plus, for the samples it holds soft
  labels for, ``alpha T^2 KL(s(x) || softmax(f(x)/T))`` on a batch of them per
  step, where ``f`` runs the node's layers deeper than the cut with their
  gradient stopped: only the blocks up to the cut learn from the federation,
  the deeper ones stay personal (server -> client distillation). Then it
  uploads, for ``samples`` of its training examples, the representation at the
  cut, the label and its logits.
- **Deep-to-shallow dropping**: the cut ``c`` counts weighted layers (``Linear``
  / ``Conv``) from the output, ``c = 1`` being the classifier's input; it starts
  at ``deepest-cut`` and moves one layer shallower every ``drop-every`` rounds,
  never past ``shallowest-cut`` (:meth:`FedD2S.cut`).

Wire protocol: every train message carries ``config["fedd2s.cut"]``,
``["fedd2s.temperature"]``, ``["fedd2s.alpha"]``, ``["fedd2s.samples"]``; a node
with pending soft labels also gets ``fedd2s.soft-labels``
(``{"<sample id>": C probabilities}``, ``tasks/soft_labels.py``, KnFu's format).
The reply's ``arrays`` is empty (every entry personal); its record
``fedd2s.upload`` holds ``ids`` (int64[n], indices into the node's training
set), ``labels`` (int64[n]), ``features`` (float32[n, d]: the input of the
cut's layer, a conv input averaged over its spatial positions) and ``logits``
(float32[n, C]), ``n = samples``, checked like a model and then for ids and
labels in range. Server state: the heads by cut, the pending soft labels by node.
Sending representations of private data weakens privacy compared with weight
sharing: "data-free" means no public data set here, not no data-derived
messages.

Decisions where the spec was open
---------------------------------
- Loss routing (the spec's phase A and B, both assumed): one client term, the
  KL of its own model's prediction to the soft labels, with the layers deeper
  than the cut frozen for that term, so that dropping a layer from the cut
  really withdraws it from the federation. (Distilling through a downloaded
  copy of ``H_c`` instead gives a zero signal: the soft labels are ``H_c`` of
  the very representations the node sent.) The head is not sent to clients.
- Heads: a linear classifier on the representation at the cut (the spec's
  "smaller MLP" option, the cheapest), zero-initialised, trained by
  ``head-steps`` full-batch gradient steps per round on that round's uploads,
  the step ``head-lr / max(1, mean ||h||^2)`` so one rate fits every cut.
- Dropping set: the contiguous cuts ``deepest-cut .. shallowest-cut``;
  schedule one layer every ``drop-every`` rounds (the spec assumes 10-20% of
  the rounds); ``T = 3``, ``alpha = beta = 1`` (the spec's assumption).
- Uploads: ``samples`` training examples per round, a fresh seeded draw
  (repeated when the node has fewer), evaluated in eval mode after training;
  the soft labels they give are applied next time the node is sampled. A
  node that is not sampled keeps its pending soft labels.
- Central accuracy is the untouched initial model (``global_model = False``):
  the metric is the nodes' own accuracy (``node-accuracy-mean`` / ``-worst10``).
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
from bouquet.tasks.soft_labels import keyed

SOFT_LABELS = "fedd2s.soft-labels"
UPLOAD = "fedd2s.upload"
MAX_SAMPLE_ID = 2**31 - 1


def weighted_layers(spec: Mapping[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """Names of the weights of ``Linear`` / ``Conv`` layers (ndim >= 2), in order."""
    return [
        name
        for name, (shape, _) in spec.items()
        if name.endswith("weight") and len(shape) >= 2
    ]


def cut_shape(
    spec: Mapping[str, tuple[tuple[int, ...], str]], cut: int
) -> tuple[int, int]:
    """``(d, C)``: the representation size at ``cut`` and the number of classes."""
    layers = weighted_layers(spec)
    if not 1 <= cut < len(layers):
        raise ValueError(
            f"FedD2S cut {cut} needs a model with more than {cut} weighted layers; "
            f"this one has {len(layers)}: lower fedd2s.shallowest-cut."
        )
    return spec[layers[-cut]][0][1], spec[layers[-1]][0][0]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def train_head(
    head: Mapping[str, np.ndarray],
    features: np.ndarray,
    labels: np.ndarray,
    logits: np.ndarray,
    *,
    temperature: float,
    beta: float,
    steps: int,
    lr: float,
) -> dict[str, np.ndarray]:
    """Full-batch gradient steps on ``CE + beta T^2 KL(softmax(z/T) || softmax(a/T))``.

    ``a = h w^T + b``. The gradient of the loss in ``a`` is ``softmax(a) -
    onehot(y) + beta T (softmax(a/T) - softmax(z/T))``, averaged over samples;
    the step is ``lr / max(1, mean ||h||^2)``.
    """
    h = np.asarray(features, dtype=np.float64)
    w = np.array(head["w"], dtype=np.float64)
    b = np.array(head["b"], dtype=np.float64)
    onehot = np.eye(w.shape[0])[labels]
    teacher = softmax(np.asarray(logits, dtype=np.float64) / temperature)
    step = lr / max(1.0, float((h**2).sum(axis=1).mean()))
    for _ in range(steps):
        a = h @ w.T + b
        grad = (
            softmax(a)
            - onehot
            + beta * temperature * (softmax(a / temperature) - teacher)
        )
        grad /= len(h)
        w -= step * grad.T @ h
        b -= step * grad.sum(axis=0)
    return {"w": w.astype(np.float32), "b": b.astype(np.float32)}


@register
class FedD2S(BouquetStrategy):
    """FedD2S (see the module docstring)."""

    name = "fedd2s"
    routine = "fedd2s"
    paper = "Atapour et al., 2024, https://arxiv.org/abs/2402.10846"
    tagline = "Server heads distil soft labels; deep layers leave the federation"
    family = "personalized"
    global_model = False
    params = (
        Param("deepest-cut", 1, "[1, 64]", "first cut (1: classifier input)"),
        Param("shallowest-cut", 2, "[1, 64]", "last cut of the dropping set"),
        Param("drop-every", 5, "[1, 100000]", "rounds per layer dropped"),
        Param("temperature", 3.0, "(0, 100]", "distillation temperature T", send=True),
        Param("alpha", 1.0, "[0, 1000]", "client distillation weight", send=True),
        Param("beta", 1.0, "[0, 1000]", "server (head) distillation weight"),
        Param("samples", 64, "[1, 100000]", "representations per reply", send=True),
        Param("head-steps", 100, "[0, 100000]", "server gradient steps per round"),
        Param("head-lr", 0.5, "[0, 1000]", "server head step size"),
    )
    reply_records = (UPLOAD,)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.personal = ("*",)  # models never leave the nodes

    def validate(self) -> None:
        super().validate()
        if self.shallowest_cut < self.deepest_cut:
            raise ValueError(
                f"fedd2s.shallowest-cut ({self.shallowest_cut}) must be >= "
                f"fedd2s.deepest-cut ({self.deepest_cut})."
            )

    def init_state(self) -> dict[str, Any]:
        return {"fedd2s": {"heads": {}, "pending": {}, "head-accuracy": 0.0}}

    def cut(self, server_round: int) -> int:
        """The cut of ``server_round``: one layer shallower every ``drop-every``."""
        step = (max(server_round, 1) - 1) // self.drop_every
        return min(self.deepest_cut + step, self.shallowest_cut)

    def round_config(self, ctx: RoundContext) -> dict[str, Any]:
        return {"fedd2s.cut": self.cut(ctx.server_round)}

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        pending = self.state["fedd2s"]["pending"]
        plan: dict[int, dict[str, Record]] = {}
        for node in self.sample(ctx, self.fraction_train, self.min_train_nodes):
            soft = pending.get(str(node))
            plan[node] = (
                {}
                if soft is None
                else {SOFT_LABELS: to_record(keyed(soft["probs"], soft["ids"]))}
            )
        return plan

    def _model_spec(self, ctx: RoundContext) -> dict[str, Any]:
        return {k: (tuple(a.shape), str(a.dtype)) for k, a in ctx.arrays.items()}

    def record_specs(
        self, ctx: RoundContext, model_spec: Mapping[str, Any]
    ) -> dict[str, Mapping[str, Any]]:
        d, classes = cut_shape(self._model_spec(ctx), self.cut(ctx.server_round))
        n = self.samples
        return {
            UPLOAD: {
                "ids": ((n,), "int64"),
                "labels": ((n,), "int64"),
                "features": ((n, d), "float32"),
                "logits": ((n, classes), "float32"),
            }
        }

    def reply_problem(self, reply: ClientReply, ctx: RoundContext) -> str:
        """Sample ids and labels must be in range."""
        if ctx.phase != "train":
            return ""
        _, classes = cut_shape(self._model_spec(ctx), self.cut(ctx.server_round))
        upload = reply.records[UPLOAD]
        ids, labels = upload["ids"], upload["labels"]
        if ids.min() < 0 or ids.max() > MAX_SAMPLE_ID:
            return f"'{UPLOAD}' has ids outside [0, 2^31)"
        if labels.min() < 0 or labels.max() >= classes:
            return f"'{UPLOAD}' has labels outside [0, {classes})"
        return ""

    def aggregate(self, replies: Sequence[ClientReply], ctx: RoundContext) -> NDArrays:
        """Train the cut's head on the uploads; store each node's soft labels."""
        if not replies:
            return dict(ctx.arrays)
        cut = self.cut(ctx.server_round)
        d, classes = cut_shape(self._model_spec(ctx), cut)
        state = self.state["fedd2s"]
        heads = dict(state["heads"])
        head = heads.get(
            str(cut),
            {
                "w": np.zeros((classes, d), np.float32),
                "b": np.zeros(classes, np.float32),
            },
        )
        uploads = [r.records[UPLOAD] for r in replies]
        features = np.concatenate([u["features"] for u in uploads])
        labels = np.concatenate([u["labels"] for u in uploads])
        head = train_head(
            head,
            features,
            labels,
            np.concatenate([u["logits"] for u in uploads]),
            temperature=self.temperature,
            beta=self.beta,
            steps=self.head_steps,
            lr=self.head_lr,
        )
        heads[str(cut)] = head
        pending = dict(state["pending"])
        for reply, upload in zip(replies, uploads, strict=True):
            a = upload["features"].astype(np.float64) @ head["w"].T + head["b"]
            pending[str(reply.node)] = {
                "ids": np.asarray(upload["ids"], dtype=np.int64),
                "probs": softmax(a / self.temperature).astype(np.float32),
            }
        predicted = features.astype(np.float64) @ head["w"].T + head["b"]
        self.state["fedd2s"] = {
            "heads": heads,
            "pending": pending,
            "head-accuracy": float((predicted.argmax(axis=1) == labels).mean()),
        }
        return dict(ctx.arrays)

    def train_metrics(
        self, replies: Sequence[ClientReply], ctx: RoundContext
    ) -> dict[str, float]:
        """The round's cut and the head's accuracy on the uploads it trained on."""
        return {
            "fedd2s.cut": float(self.cut(ctx.server_round)),
            "fedd2s.head-accuracy": self.state["fedd2s"]["head-accuracy"],
        }
