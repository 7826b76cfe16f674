"""DADAO: decoupled accelerated decentralized asynchronous optimization.

Nabli, Oyallon, "DADAO: Decoupled Accelerated Decentralized Asynchronous
Optimization", ICML 2023, https://arxiv.org/abs/2208.00779 (official code:
github.com/AdelNabli/DADAO, ``DADAO_optimizer``).

- **Node** (``clientapps/recipes/dadao.py``): six vectors
  ``(x, xt, y, yt, z, zt)`` that follow a fixed linear ODE between events;
  a gradient event (Poisson, ``gradient-rate`` per node) moves ``x``, ``xt``
  and ``yt`` along ``r = grad f_i(x) - nu x - yt``; an exchange with a
  neighbour ``j`` (Poisson, total rate ``gossip-rate``, edge uniform over the
  graph) moves ``z``, ``zt`` along ``m = (y_i + z_i) - (y_j + z_j)``.
- **Server**: none in the algorithm. Flower's server is the relay of
  :mod:`strategies.gossip` and the virtual clock: it samples both Poisson
  processes from the seed and tells each node when its events happen.

How the asynchronous events map onto rounds (the decision of this module)
---------------------------------------------------------------------------
The exchanges are taken in time order; a server round carries the longest
run of consecutive exchanges in which no node appears twice (a *batch*;
exchanges on disjoint pairs commute, so firing them in one round is exactly
firing them in sequence). In round ``k`` every connected node gets one
message: first the partner's ``y + z`` of its exchange of batch ``k - 1``
(``gossip.neighbor-0``), applied at that exchange's time; then its gradient
events up to its exchange time in batch ``k`` (or, without one, up to the
batch's last exchange time ``T_k``); it replies its ``x`` (``gossip.model``)
and ``y + z`` at that time (``dadao.message``). Every event is therefore
executed at its own virtual time, in the order of the sequential
definition: a node's events before ``T_k`` are its own (local), and its
exchange only needs its partner's ``y + z`` at the same instant. The run
is the sequential DADAO of the sampled events, checked against a NumPy
reference in ``tests/strategies/test_dadao.py``, and the client's events
against numbers of the official ``DADAO_optimizer`` (AdelNabli/DADAO at
eed1ed1, run on CPU on a 3-node triangle, ``data/dadao_official.json``).
The virtual clock (the ``dadao-time`` metric) advances by a batch per round;
events past ``horizon`` are not sampled (the nodes then only reach it).

Wire protocol: config ``dadao.smoothness``, ``dadao.strong-convexity``,
``dadao.chi1``, ``dadao.time`` and ``dadao.gradient-times``;
``gossip.neighbor-0`` with the partner's ``y + z``; replies
``gossip.model`` and ``dadao.message``. Client state: the six vectors and
the time of the node's last event. Server state: the relay's (node order,
last models) plus the next exchange's index, the last batch's pairs and
their messages, each node's clock.

Decisions where the spec was open
---------------------------------
- The clock is DADAO's own, not the asynchronous driver's
  (:mod:`strategies.clocks`): that one orders the *replies* of tasks that
  take simulated compute time, one server update per reply, while DADAO's
  events are instantaneous points of two Poisson processes whose order is
  the algorithm. Sampling them from the seed and cutting them into batches
  keeps the sequential semantics on the synchronous relay every other
  decentralized algorithm uses (one mechanism), and a resumed run
  rebuilds the same events from the seed and the stored cursor.
- ``chi1 = 1 / lambda_min^+(Lambda)`` and ``chi2 = max_(ij in E) R_ij / 2``
  (the code's effective resistance) of the rate-weighted Laplacian
  ``Lambda = (gossip-rate / |E|) L_G`` of the graph of round 1. The default
  ``gossip-rate = 0`` means ``sqrt(2 chi1 chi2)`` with ``chi1, chi2`` of the
  edge-probability Laplacian ``L_G / |E|`` (the official code's
  ``lamb_mix``; its ``chi_1_star = chi_1 / lamb_mix`` is ``chi1`` here). On a
  ring of 16 that is about 40 exchanges per time unit for 16 gradients: a
  run needs many rounds per time unit (about 13 on that ring).
- ``f_i`` is the local loss plus ``mu / 2 ||x||^2`` (the spec: "add L2
  regularisation"); a gradient event uses one mini-batch of the loop
  (``batch-size``; the full local set is the paper's deterministic case).
- DADAO acts on the trainable parameters; buffers (BatchNorm statistics)
  follow the forward passes and are not exchanged (zero in the message).
- Node failures: an exchange with an endpoint that is not connected when its
  batch is formed is dropped; an exchange whose partner did not reply is
  dropped on both sides (neither applies it), which keeps
  ``sum_i (y_i + z_i)`` unchanged. The run goes on.
- ``L`` and ``mu`` are hyperparameters (1 and 0.01 by default), not
  estimated from the data; for the MLP they are a heuristic.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from bouquet.strategies.aggregation import to_record
from bouquet.strategies.base import Record
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.gossip import GOSSIP_PARAMS, STATE, GossipStrategy
from bouquet.strategies.registry import register
from bouquet.strategies.topology import spectral_gap
from bouquet.strategies.validation import ClientReply, Contract
from bouquet.tasks import wire
from bouquet.tasks.params import Param

OWN = "dadao"


def graph_constants(adjacency: np.ndarray, rate: float) -> tuple[float, float]:
    """``(chi1, chi2)`` of ``Lambda = (rate / |E|) L_G`` (1, 0 without edges)."""
    edges = np.argwhere(np.triu(adjacency))
    if not len(edges) or rate <= 0:
        return 1.0, 0.0
    degrees = adjacency.sum(axis=1)
    laplacian = (rate / len(edges)) * (np.diag(degrees) - adjacency.astype(float))
    values = np.linalg.eigvalsh(laplacian)
    positive = values[values > 1e-9 * values.max()]
    inverse = np.linalg.pinv(laplacian)
    resistance = max(
        0.5 * (inverse[i, i] + inverse[j, j] - 2 * inverse[i, j]) for i, j in edges
    )
    return float(1.0 / positive.min()), float(resistance)


def poisson_times(rate: float, horizon: float, seed: int) -> np.ndarray:
    """The sorted event times of a Poisson process of ``rate`` on ``[0, horizon]``."""
    rng = np.random.default_rng(seed)
    count = rng.poisson(rate * horizon) if rate > 0 else 0
    return np.sort(rng.uniform(0.0, horizon, count))


@register
class DADAO(GossipStrategy):
    """DADAO (see the module docstring)."""

    name = "dadao"
    routine = "dadao"
    paper = "Nabli and Oyallon, ICML 2023, https://arxiv.org/abs/2208.00779"
    tagline = "Asynchronous accelerated gossip: Poisson gradient and pairwise events"
    family = "decentralized"
    params = (
        *GOSSIP_PARAMS,
        Param("smoothness", 1.0, "> 0", "L of the local losses", send=True),
        Param("strong-convexity", 0.01, "> 0", "mu (L2 term added)", send=True),
        Param("gradient-rate", 1.0, "> 0", "gradient events per node per time unit"),
        Param("gossip-rate", 0.0, ">= 0", "total exchange rate; 0: sqrt(2 chi1 chi2)"),
        Param("horizon", 200.0, "> 0", "t_max: the events are sampled up to it"),
    )
    reply_records: ClassVar[tuple[str, ...]] = (wire.GOSSIP_MODEL, wire.DADAO_MESSAGE)

    def init_state(self) -> dict[str, Any]:
        own = {"cursor": 0, "pairs": {}, "messages": {}, "clock": {}, "time": 0.0}
        return {**super().init_state(), OWN: own}

    # ------------------------------------------------------ the clock --
    def rate_and_chi1(self, adjacency: np.ndarray) -> tuple[float, float]:
        """The total exchange rate and ``chi1`` at that rate."""
        rate = self.gossip_rate
        if rate <= 0:  # the edge-probability Laplacian L_G / |E| (total rate 1)
            chi1, chi2 = graph_constants(adjacency, 1.0)
            rate = math.sqrt(2 * chi1 * chi2)
        return rate, graph_constants(adjacency, rate)[0]

    def exchanges(self, adjacency: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(times, edges)`` of every exchange up to ``horizon``, in time order."""
        edges = np.argwhere(np.triu(adjacency))
        rate, _ = self.rate_and_chi1(adjacency)
        if not len(edges):
            return np.zeros(0), np.zeros((0, 2), int)
        times = poisson_times(rate, self.horizon, wire.derive_seed(self.seed, OWN))
        rng = np.random.default_rng(wire.derive_seed(self.seed, OWN, "edges"))
        return times, edges[rng.integers(len(edges), size=len(times))]

    def gradient_times(self, vertex: int) -> np.ndarray:
        """The gradient events of ``vertex`` up to ``horizon``."""
        seed = wire.derive_seed(self.seed, vertex, OWN, "gradients")
        return poisson_times(self.gradient_rate, self.horizon, seed)

    def next_batch(
        self, adjacency: np.ndarray, alive: set[int]
    ) -> tuple[list[tuple[float, int, int]], int, float]:
        """The next batch of exchanges, the cursor after it and its end time."""
        times, edges = self.exchanges(adjacency)
        cursor, used, batch = self.state[OWN]["cursor"], set(), []
        while cursor < len(times):
            i, j = (int(v) for v in edges[cursor])
            if i in used or j in used:
                break
            cursor += 1
            if i in alive and j in alive:  # an exchange with a failed node: dropped
                batch.append((float(times[cursor - 1]), i, j))
                used.update((i, j))
        end = batch[-1][0] if batch else float(self.horizon)
        return batch, cursor, max(end, self.state[OWN]["time"])

    # ------------------------------------------------------ the relay --
    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        if not self.state[STATE]["nodes"]:
            self.state[STATE] = {
                **self.state[STATE],
                "nodes": sorted(ctx.nodes),
                "initial": {k: np.array(a) for k, a in ctx.arrays.items()},
            }
        relay, own = self.state[STATE], self.state[OWN]
        nodes, connected = relay["nodes"], set(ctx.nodes)
        alive = [v for v, node in enumerate(nodes) if node in connected]
        full = self.graph(1, len(nodes))
        _, chi1 = self.rate_and_chi1(full)
        gap = spectral_gap(self.mixing_of(full[np.ix_(alive, alive)]))
        batch, cursor, end = self.next_batch(full, set(alive))
        partner_now = {i: (t, j) for t, i, j in batch} | {
            j: (t, i) for t, i, j in batch
        }
        silent, plan = set(relay["silent"]), {}
        for v in alive:
            node = nodes[v]
            until, partner = partner_now.get(v, (end, -1))
            clock = float(own["clock"].get(str(v), 0.0))
            times = [float(t) for t in self.gradient_times(v) if clock < t <= until]
            config = {
                **ctx.config,
                wire.LOCAL_STEPS: 0,
                wire.LOCAL_EPOCHS: 1,
                wire.algorithm_key(OWN, "chi1"): chi1,
                wire.algorithm_key(OWN, "time"): until,
                wire.algorithm_key(OWN, "gradient-times"): times,
            }
            held = str(v) in relay["models"] and v not in silent
            extra: dict[str, Record] = {
                wire.ARRAYS: ArrayRecord() if held else to_record(relay["initial"]),
                wire.CONFIG: ConfigRecord(config),
            }
            # The last batch's exchange, if both halves replied.
            last = own["pairs"].get(str(v))
            if last is not None and {str(v), str(last)} <= set(own["messages"]):
                extra[wire.gossip_neighbor(0)] = to_record(own["messages"][str(last)])
            ctx.per_node[node] = {
                "vertex": v,
                "neighbors": int(partner >= 0),
                "gap": gap,
                "until": until,
                "gradients": len(times),
            }
            plan[node] = extra
        self.state[OWN] = {
            **own,
            "cursor": cursor,
            "time": end,
            "pairs": {str(i): j for _, i, j in batch}
            | {str(j): i for _, i, j in batch},
            "messages": {},
        }
        return plan

    def contract(self, ctx: RoundContext) -> Contract:
        """``dadao.message``: float64, shaped like the model's float entries."""
        contract = super().contract(ctx)
        if ctx.phase != "train":
            return contract
        message = {
            k: (tuple(a.shape), "float64")
            for k, a in ctx.arrays.items()
            if a.dtype.kind == "f"
        }
        return replace(
            contract, records={**contract.records, wire.DADAO_MESSAGE: message}
        )

    def aggregate(self, replies: list[ClientReply], ctx: RoundContext) -> NDArrays:
        """Relay the models and the messages; advance the replying nodes' clocks."""
        average = super().aggregate(replies, ctx)
        own = self.state[OWN]
        vertex = {node: info["vertex"] for node, info in ctx.per_node.items()}
        messages, clock = {}, dict(own["clock"])
        for reply in replies:
            v = str(vertex[reply.node])
            clock[v] = ctx.per_node[reply.node]["until"]
            if v in own["pairs"]:
                messages[v] = {
                    k: np.array(a) for k, a in reply.records[wire.DADAO_MESSAGE].items()
                }
        self.state[OWN] = {**own, "messages": messages, "clock": clock}
        return average

    def skipped(self, ctx: RoundContext) -> None:
        super().skipped(ctx)
        self.state[OWN] = {**self.state[OWN], "messages": {}}

    def train_metrics(self, replies: list[ClientReply], ctx: RoundContext) -> dict:
        """The relay's metrics, the virtual time and the round's events.

        ``gossip-bytes-per-node``: the ``y + z`` bytes (float64) a node sends
        (and receives) in the round's exchanges, as if peer to peer.
        """
        metrics = super().train_metrics(replies, ctx)
        floats = sum(a.size for a in ctx.arrays.values() if a.dtype.kind == "f")
        exchanging = [info["neighbors"] for info in ctx.per_node.values()]
        metrics["gossip-bytes-per-node"] = float(np.mean(exchanging)) * 8 * floats
        metrics["dadao-time"] = float(self.state[OWN]["time"])
        metrics["dadao-gradients"] = float(
            sum(info["gradients"] for info in ctx.per_node.values())
        )
        return metrics
