"""Gossip over Flower: the relay every decentralized algorithm runs on (issue 20).

There is no global model. Every node keeps its own model in its
``Context.state`` (all its entries are personal parameters, so Bouquet's
client keeps them there and evaluates them); the server is the message relay
and the clock, never an aggregator the algorithm reads. A round, for every
connected node ``i`` of the graph (:mod:`strategies.topology`):

1. **Train message** (server -> node ``i``): ``config`` with the round's keys
   and ``gossip.weights = [W_ii, W_ij1, W_ij2, ...]``, and the models its
   neighbours ``j1, j2, ...`` replied last round, one ArrayRecord each
   (``gossip.neighbor-0``, ``gossip.neighbor-1``, ...): exactly what the
   neighbours would have sent it peer to peer. ``arrays`` is empty when the
   node replied last round (it holds its model), else the initial model
   (round 1, or after a failure: a node that kept its model ignores it).
2. **On the node**: ``x_i <- W_ii x_i + sum_j W_ij x_j`` (float entries, in
   float64), then the algorithm's local steps on the one training loop, then
   ``x_i`` is kept in ``Context.state``.
3. **Train reply**: ``gossip.model``, the node's whole model, which the
   server keeps only to relay it next round (``state["gossip"]["models"]``).

So round ``t`` mixes the models trained in round ``t - 1`` and then trains:
over rounds, the alternation "local steps, then one gossip step" of the
decentralized algorithms, with each round's gossip step applied at the start
of the next round. ``W`` is symmetric and doubly stochastic, so gossip keeps
the average of the node models (an algorithm may override ``mixing_of`` with
a row-stochastic rule of its own, as VCMA's conservative average does).

Metrics, not the algorithm: the strategy returns the **average model** of the
nodes that replied as the run's arrays (the driver evaluates it centrally:
``central-accuracy``), and reports per round ``consensus-distance`` (mean
squared distance of those models to their average, over float entries),
``spectral-gap`` of the round's graph (its vertices that mix, failed ones
left out), ``gossip-edges`` and
``gossip-bytes-per-node`` (model bytes a node receives from its neighbours,
equal to what it sends them, as if peer to peer). Node evaluation evaluates
every node's own model (``node-accuracy-mean``, ``node-accuracy-worst10``,
and ``node-accuracy-min``, the worst node).

Node failures: a vertex whose node is no longer connected, or whose last
train reply did not arrive or was refused, is left out of the round's graph
(its neighbours neither receive its model nor give it weight; ``W`` is
rebuilt on the remaining vertices, still doubly stochastic); the run goes
on, and a node that comes back rejoins with the model it holds. A node
that lost its state (a restarted SuperNode) and has neighbours starts from
their models, ``sum_j W_ij x_j / sum_j W_ij``; without neighbours, from the
initial model.

Decisions where the spec was open
---------------------------------
- The graph is over the nodes connected in round 1, in node-id order
  (vertex ``v`` is the ``v``-th); nodes that connect later are not in it.
  Random graphs are seeded by ``derive_seed(seed, "topology")``, the
  time-varying matching by ``derive_seed(seed, round, "topology")``, so a
  resumed run rebuilds the same graphs from the seed alone.
- Every connected vertex trains every round (``fraction-train`` is not used:
  the decentralized papers have all nodes compute each iteration).
- The average model, the consensus distance and the bytes count every float
  entry (BatchNorm statistics included); integer buffers are not mixed.
- A resumed run restores the relay (the node order, every node's last model);
  the graph is rebuilt from the seed. SuperNodes that kept their state go on
  with their models; fresh ones rejoin from their neighbours' (see above).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from bouquet.strategies.aggregation import cast_like, to_record
from bouquet.strategies.base import BouquetStrategy, Record
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.topology import (
    GRAPHS,
    MIXINGS,
    consensus_distance,
    make_graph,
    mixing_matrix,
    parse_edges,
    spectral_gap,
)
from bouquet.strategies.validation import ClientReply, Contract, array_spec
from bouquet.tasks import wire
from bouquet.tasks.params import Param

STATE = "gossip"

GOSSIP_PARAMS = (
    Param("topology", "ring", help="communication graph", choices=GRAPHS),
    Param("mixing", "metropolis-hastings", help="mixing matrix W", choices=MIXINGS),
    Param("degree", 4, ">= 1", "degree of the random regular graph"),
    Param("edge-probability", 0.5, "[0, 1]", "p of the Erdos-Renyi graph"),
    Param("edges", "", help="user graph: vertex pairs '0-1,1-2,...'"),
)
"""The graph every gossip algorithm declares (``<algorithm>.topology``, ...)."""


class GossipStrategy(BouquetStrategy):
    """The relay of decentralized learning (see the module docstring).

    Subclasses declare the algorithm (``name``, ``routine``, ``params``
    including :data:`GOSSIP_PARAMS`); the routine's recipe mixes with
    :class:`clientapps.recipes.dpsgd.GossipMix` before its local steps.
    """

    reply_records: ClassVar[tuple[str, ...]] = (wire.GOSSIP_MODEL,)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The whole model never leaves the node but through gossip.
        self.personal = ("*",)

    def validate(self) -> None:
        """The edge list parses, and topology ``edges`` has one."""
        try:
            edges = parse_edges(self.edges)
        except ValueError as error:
            raise ValueError(f"{self.name}.edges: {error}") from None
        if self.topology == "edges" and not edges:
            raise ValueError(f"{self.name}.edges: topology 'edges' needs an edge list.")

    def init_state(self) -> dict[str, Any]:
        return {STATE: {"nodes": [], "models": {}, "silent": [], "initial": {}}}

    def dp_problem(self) -> str:
        return "it has no global model: nodes exchange their models with neighbours"

    # ------------------------------------------------------- the graph --
    def graph(self, server_round: int, n: int) -> np.ndarray:
        """The adjacency matrix over all ``n`` vertices in ``server_round``."""
        parts: tuple = (self.seed, "topology")
        if self.topology == "matching":
            parts = (self.seed, server_round, "topology")
        rng = np.random.default_rng(wire.derive_seed(*parts))
        return make_graph(
            self.topology,
            n,
            rng,
            degree=self.degree,
            p=self.edge_probability,
            edges=parse_edges(self.edges),
        )

    def round_graph(
        self, ctx: RoundContext
    ) -> tuple[list[int], list[int], np.ndarray, np.ndarray]:
        """``(alive, mixable, adjacency, W)`` of ``ctx``'s round.

        ``alive``: the vertices whose node is connected; ``mixable``: those
        of them whose model the server holds and whose last reply arrived;
        ``adjacency`` and ``W`` are over ``mixable``, in that order.
        """
        own = self.state[STATE]
        nodes, connected = own["nodes"], set(ctx.nodes)
        alive = [v for v, node in enumerate(nodes) if node in connected]
        silent = set(own["silent"])
        mixable = [v for v in alive if str(v) in own["models"] and v not in silent]
        full = self.graph(ctx.server_round, len(nodes))
        adjacency = full[np.ix_(mixable, mixable)]
        return alive, mixable, adjacency, self.mixing_of(adjacency)

    def mixing_of(self, adjacency: np.ndarray) -> np.ndarray:
        """The gossip matrix ``W`` on ``adjacency`` (rows sum to 1).

        The ``mixing`` rule of :mod:`strategies.topology` (symmetric, doubly
        stochastic); an algorithm with its own averaging rule (VCMA's
        conservative average) overrides it.
        """
        return mixing_matrix(adjacency, self.mixing)

    # ----------------------------------------------------- the relay --
    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        """Every connected vertex, with its row of ``W`` and its neighbours' models."""
        if not self.state[STATE]["nodes"]:
            self.state[STATE] = {
                **self.state[STATE],
                "nodes": sorted(ctx.nodes),
                "initial": {k: np.array(a) for k, a in ctx.arrays.items()},
            }
        own = self.state[STATE]
        alive, mixable, adjacency, mixing = self.round_graph(ctx)
        # The gap of the round's graph: its vertices mix from round 2 on.
        used = [v for v in alive if v not in own["silent"]]
        full = self.graph(ctx.server_round, len(own["nodes"]))
        gap = spectral_gap(self.mixing_of(full[np.ix_(used, used)]))
        position = {v: i for i, v in enumerate(mixable)}
        silent = set(own["silent"])
        plan: dict[int, dict[str, Record]] = {}
        for v in alive:
            node = own["nodes"][v]
            weights, extra = [1.0], {}
            if v in position:
                i = position[v]
                weights = [float(mixing[i, i])]
                for k, j in enumerate(np.flatnonzero(adjacency[i])):
                    weights.append(float(mixing[i, j]))
                    extra[wire.gossip_neighbor(k)] = to_record(
                        own["models"][str(mixable[j])]
                    )
            # A node that replied last round holds its model; any other gets
            # the initial one, which a node that holds its model ignores.
            held = str(v) in own["models"] and v not in silent
            extra[wire.ARRAYS] = ArrayRecord() if held else to_record(own["initial"])
            extra[wire.CONFIG] = ConfigRecord(
                {**ctx.config, wire.GOSSIP_WEIGHTS: weights}
            )
            ctx.per_node[node] = {
                "vertex": v,
                "neighbors": len(weights) - 1,
                "gap": gap,
            }
            plan[node] = extra
        return plan

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every node evaluates its own model (not the average model).

        ``arrays`` is empty for the nodes that replied last round; the others
        get the initial model, which a node that holds its own ignores.
        """
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        own = self.state[STATE]
        vertex = {node: v for v, node in enumerate(own["nodes"])}
        held = {
            node
            for node, v in vertex.items()
            if str(v) in own["models"] and v not in own["silent"]
        }
        if not own["nodes"]:
            return messages  # round 0: the arrays are the initial model
        initial = to_record(own["initial"])
        for message in messages:
            content = RecordDict(dict(message.content.items()))
            empty = message.metadata.dst_node_id in held
            content[wire.ARRAYS] = ArrayRecord() if empty else initial
            message.content = content
        return messages

    def contract(self, ctx: RoundContext) -> Contract:
        """The reply's ``arrays`` is empty; ``gossip.model`` is the whole model."""
        contract = super().contract(ctx)
        if ctx.phase != "train":
            return contract
        records = {wire.GOSSIP_MODEL: array_spec(ctx.arrays)}
        return replace(contract, records=records)

    def aggregate(self, replies: list[ClientReply], ctx: RoundContext) -> NDArrays:
        """Keep each reply's model to relay it; return the average model (a metric)."""
        own = self.state[STATE]
        vertex = {node: info["vertex"] for node, info in ctx.per_node.items()}
        models = dict(own["models"])
        for reply in replies:
            models[str(vertex[reply.node])] = {
                k: np.array(a) for k, a in reply.records[wire.GOSSIP_MODEL].items()
            }
        answered = {vertex[r.node] for r in replies}
        silent = sorted(v for v in vertex.values() if v not in answered)
        self.state[STATE] = {**own, "models": models, "silent": silent}
        return average_model(
            [r.records[wire.GOSSIP_MODEL] for r in replies], ctx.arrays
        )

    def skipped(self, ctx: RoundContext) -> None:
        own = self.state[STATE]
        sent = [info["vertex"] for info in ctx.per_node.values()]
        self.state[STATE] = {**own, "silent": sorted(sent)}

    def evaluate_metrics(self, replies: list[ClientReply], ctx: RoundContext) -> dict:
        """``node-accuracy-min``: the worst node model (besides the base's mean)."""
        accuracies = _accuracies(replies)
        return {"node-accuracy-min": min(accuracies)} if accuracies else {}

    def train_metrics(self, replies: list[ClientReply], ctx: RoundContext) -> dict:
        """Consensus distance, spectral gap, edges and bytes per node of the round."""
        models = [r.records[wire.GOSSIP_MODEL] for r in replies]
        floats = [k for k, a in ctx.arrays.items() if a.dtype.kind == "f"]
        model_bytes = sum(a.nbytes for a in ctx.arrays.values())  # as relayed
        degrees = [info["neighbors"] for info in ctx.per_node.values()]
        return {
            "consensus-distance": consensus_distance(
                np.stack([flatten(m, floats) for m in models])
            ),
            "spectral-gap": next(iter(ctx.per_node.values()))["gap"],
            "gossip-edges": sum(degrees) // 2,
            "gossip-bytes-per-node": float(np.mean(degrees)) * model_bytes,
        }


def _accuracies(replies: list[ClientReply]) -> list[float]:
    values = (r.metrics.get(wire.EVAL_ACCURACY) for r in replies)
    return [float(v) for v in values if isinstance(v, int | float)]


def flatten(model: NDArrays, keys: list[str]) -> np.ndarray:
    """The entries ``keys`` of ``model`` as one float64 vector."""
    return np.concatenate([np.asarray(model[k], np.float64).ravel() for k in keys])


def average_model(models: list[NDArrays], like: NDArrays) -> NDArrays:
    """The mean of ``models``, entry by entry in float64, in the dtypes of ``like``."""
    return {
        k: cast_like(np.mean([np.asarray(m[k], np.float64) for m in models], axis=0), a)
        for k, a in like.items()
    }


__all__ = ["GOSSIP_PARAMS", "GossipStrategy", "average_model", "flatten"]
