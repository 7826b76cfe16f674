"""MoDeST: decentralized sampling, a per-round sample trains, one member aggregates.

de Vos, Dhasade, Kermarrec, Lavoie, Pouwelse, Sharma, "MoDeST: Bridging the
Gap between Federated and Decentralized Learning with Decentralized
Sampling", arXiv 2302.13837 v1 (2023), https://arxiv.org/abs/2302.13837;
the system is Plexus in "Practical Federated Learning without a Server"
(EuroMLSys 2025). This module implements the Plexus core (one aggregator
per round, plain mean, success fraction), not MoDeST v1's churn protocol.

- **Sampler** (run identically by every node): ``Sample(k, s)`` sorts the
  node ids of the view by ``sha256(seed | id | k)`` and keeps the first ``s``
  alive; ``Aggregator(k)`` is the first member of ``Sample(k, s)`` (in that
  order) whose trained model arrived.
- **Trainer**: local steps from the model the last aggregator sent
  (``clientapps/recipes/dpsgd.py``, the gossip recipe with one "neighbour",
  the aggregator), reply the trained model.
- **Aggregator**: the plain mean of the first ``ceil(sf |Sample(k)|)``
  trained models of round ``k`` (sample order; later ones are dropped), sent
  to ``Sample(k + 1)``.
- **Server**: none in the algorithm. Flower's server relays the models as
  the peers would send them (:mod:`strategies.gossip`'s relay) and never
  averages them itself.

Every model transfer is one server round (one hop): MoDeST round ``k`` is
two server rounds. Server round ``2k - 1`` is the aggregation hop: the
aggregator of round ``k - 1`` gets the kept models of its sample as
``gossip.neighbor-<i>`` records with ``gossip.weights = [0, 1/m, ...]`` and
``gossip.train = false``, and replies their mean (in round 1, the aggregator
of "round 0" forwards the shared initial model: every node could build it
from the seed). Server round ``2k`` is the training hop: ``Sample(k)`` gets
that mean as ``arrays`` (the aggregator's ``train(k, theta)``) and replies
its trained model as ``gossip.model`` (and ``arrays``).

Metrics: the run's arrays are the aggregator's model after an aggregation
hop, and the mean of the kept trained models (what the aggregator will
compute) after a training hop; ``consensus-distance`` of the trained models;
``gossip-bytes-per-node``: model bytes received per node of the view in the
hop, as if peer to peer (``modest-transfers`` models in all; a trainer's
reply counts once although the simulation also carries it as ``arrays``).
Nodes evaluate the current model (there is no per-node model to keep).

Decisions where the spec was open
---------------------------------
- The hash includes the run seed (``sha256("seed|id|k")``), so that seeds
  draw different samples; all nodes know the seed.
- Plexus picks the aggregator by bandwidth (time only, not accuracy); here
  it is the sample's first member in hash order whose model arrived.
- Failures (MoDeST's timeouts): a node whose reply to a message is missing,
  an error or refused, or that is no longer connected, is dropped from the
  view for the rest of the run (a refused reply counts as missing),
  so the walk of ``Sample`` skips it. A training hop with fewer than
  ``ceil(sf |Sample|)`` replies aggregates what arrived (the round goes on
  rather than stalls); a failed aggregator's hop is lost: the next sample
  trains from the last aggregate that arrived.
- ``min-train-nodes`` applies to the training hop; an aggregation hop needs
  its one reply.
- ``success-fraction`` cuts by sample order, not by arrival time (the
  simulation has no arrival order; this keeps runs replayable).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from bouquet.strategies.aggregation import to_record
from bouquet.strategies.base import BouquetStrategy, Record
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.gossip import STATE, GossipStrategy, average_model, flatten
from bouquet.strategies.registry import register
from bouquet.strategies.topology import consensus_distance
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire
from bouquet.tasks.params import Param

OWN = "modest"


def sample_order(nodes: Iterable[int], seed: int, k: int) -> list[int]:
    """``nodes`` sorted by ``sha256("seed|id|k")`` (MoDeST's sampler)."""

    def key(node: int) -> bytes:
        return hashlib.sha256(f"{seed}|{node}|{k}".encode()).digest()

    return sorted(nodes, key=key)


@register
class MoDeST(GossipStrategy):
    """MoDeST / Plexus (see the module docstring)."""

    name = "modest"
    routine = "dpsgd"
    broadcasts_global_model = False  # nodes get relayed models
    paper = "de Vos et al., arXiv 2023, https://arxiv.org/abs/2302.13837"
    tagline = "Hash-sampled trainers, one sampled node aggregates and forwards"
    family = "decentralized"
    params = (
        Param("sample-size", 10, ">= 1", "s: nodes that train per round"),
        Param("success-fraction", 0.8, "(0, 1]", "sf: models the aggregator waits for"),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The model is the one the aggregator sends: nodes keep none.
        self.personal = ()
        self.accepted: set[int] = set()

    def validate(self) -> None:
        """No graph to check."""

    def init_state(self) -> dict[str, Any]:
        own = {"failed": [], "kept": [], "model": {}, "aggregator": -1}
        return {**super().init_state(), OWN: own}

    # ---------------------------------------------------- the sampler --
    def view(self, ctx: RoundContext) -> list[int]:
        """The connected nodes that have not failed to reply."""
        failed = set(self.state[OWN]["failed"])
        return [n for n in ctx.nodes if n not in failed]

    def sample_of(self, ctx: RoundContext) -> list[int]:
        """``Sample(k, s)`` in a training hop (``k = server_round / 2``)."""
        k = ctx.server_round // 2
        return sample_order(self.view(ctx), self.seed, k)[: self.sample_size]

    def kept_count(self, sampled: int) -> int:
        """``ceil(sf |Sample|)``: the trained models the aggregator uses."""
        return max(1, math.ceil(self.success_fraction * sampled - 1e-9))

    # ------------------------------------------------------ the relay --
    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        own = self.state[OWN]
        if not own["model"]:
            own = {**own, "model": {k: np.array(a) for k, a in ctx.arrays.items()}}
        if ctx.server_round % 2 == 0:  # training hop
            sampled = self.sample_of(ctx)
            config = ConfigRecord({**ctx.config, wire.GOSSIP_WEIGHTS: [1.0]})
            model = to_record(own["model"])
            plan = {n: {wire.ARRAYS: model, wire.CONFIG: config} for n in sampled}
            for n in sampled:
                ctx.per_node[n] = {"role": "trainer", "received": 1}
            self.state[OWN] = own
            return plan
        # Aggregation hop: the first kept trainer (or, in round 1 or after a
        # training hop where none arrived, any node of the view) forwards.
        kept = [n for n in own["kept"] if n in set(self.view(ctx))]
        if kept:
            aggregator = kept[0]
            models = self.state[STATE]["models"]
            weights = [0.0] + [1.0 / len(kept)] * len(kept)
            extra = {
                wire.gossip_neighbor(i): to_record(models[str(n)])
                for i, n in enumerate(kept)
            }
            received = len(kept) - 1  # its own model it holds already
        else:
            order = sample_order(self.view(ctx), self.seed, ctx.server_round // 2)
            aggregator, weights, extra, received = order[0], [1.0], {}, 0
        config = {**ctx.config, wire.GOSSIP_WEIGHTS: weights, wire.GOSSIP_TRAIN: False}
        extra[wire.ARRAYS] = to_record(own["model"])
        extra[wire.CONFIG] = ConfigRecord(config)
        ctx.per_node[aggregator] = {"role": "aggregator", "received": received}
        self.state[OWN] = {**own, "aggregator": aggregator}
        return {aggregator: extra}

    def aggregate(self, replies: list[ClientReply], ctx: RoundContext) -> NDArrays:
        """Keep the trained models (or the aggregate) the peers would pass on."""
        own = self.state[OWN]
        answered = {r.node for r in replies}
        failed = sorted(set(own["failed"]) | (set(ctx.per_node) - answered))
        by_node = {r.node: r.records[wire.GOSSIP_MODEL] for r in replies}
        models = {
            str(n): {k: np.array(a) for k, a in m.items()} for n, m in by_node.items()
        }
        self.state[STATE] = {**self.state[STATE], "models": models, "silent": []}
        if ctx.server_round % 2 == 0:
            order = [n for n in ctx.per_node if n in by_node]  # sample order
            kept = order[: self.kept_count(len(ctx.per_node))]
            self.state[OWN] = {**own, "failed": failed, "kept": kept}
            return average_model([by_node[n] for n in kept], ctx.arrays)
        (model,) = by_node.values()
        model = {k: np.array(a) for k, a in model.items()}
        self.state[OWN] = {**own, "failed": failed, "kept": [], "model": model}
        return model

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """An aggregation hop has one reply by design (``min-train-nodes`` is 1)."""
        if server_round % 2 == 0:
            return super().aggregate_train(server_round, replies)
        minimum, self.min_train_nodes = self.min_train_nodes, 1
        try:
            return super().aggregate_train(server_round, replies)
        finally:
            self.min_train_nodes = minimum

    def accept(
        self, replies: Iterable[Message], ctx: RoundContext
    ) -> list[ClientReply]:
        """The base's checks; the nodes of the accepted replies are noted."""
        good = super().accept(replies, ctx)
        self.accepted = {r.node for r in good}
        return good

    def skipped(self, ctx: RoundContext) -> None:
        own = self.state[OWN]
        failed = sorted(set(own["failed"]) | (set(ctx.per_node) - self.accepted))
        self.state[OWN] = {**own, "failed": failed, "kept": []}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Nodes evaluate the current model (MoDeST keeps no model per node)."""
        return BouquetStrategy.configure_evaluate(
            self, server_round, arrays, config, grid
        )

    def train_metrics(self, replies: list[ClientReply], ctx: RoundContext) -> dict:
        """Consensus distance of the replies, the hop's model transfers and bytes."""
        models = [r.records[wire.GOSSIP_MODEL] for r in replies]
        floats = [k for k, a in ctx.arrays.items() if a.dtype.kind == "f"]
        model_bytes = sum(a.nbytes for a in ctx.arrays.values())
        transfers = sum(info["received"] for info in ctx.per_node.values())
        return {
            "consensus-distance": consensus_distance(
                np.stack([flatten(m, floats) for m in models])
            ),
            "gossip-bytes-per-node": transfers * model_bytes / max(1, len(ctx.nodes)),
            "modest-transfers": float(transfers),
            "modest-view": float(len(self.view(ctx))),
        }
