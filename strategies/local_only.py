"""Local-only training: every node trains its own model; nothing is aggregated.

The personalised-FL baseline every pFL paper reports (e.g. FedCAC, ICCV 2023,
https://arxiv.org/abs/2309.11103, "Local"): each node starts from the common
initial model and then only ever trains on its own data.

- **Node**: plain local training (``local-epochs`` / ``local-steps``) of its
  own model, kept in its ``Context.state``.
- **Server**: none. It is D-PSGD's relay (:mod:`strategies.gossip`) on the
  graph without edges: every node's mixing row is ``[1]``, so no model is
  relayed and the node's model is only ever its own.

Wire protocol (:mod:`strategies.gossip`): the train and evaluate messages'
``arrays`` is always the initial model (a node that holds its own ignores
it; one that lost its state, a restarted SuperNode, starts again from it);
``gossip.weights = [1.0]``; the reply carries the node's model as
``gossip.model``, used only for the run's metrics. Client state: the whole
model, as personal parameters (``personal = ("*",)``). Server state: the last
model of each node (the relay's).

Metrics: personalised accuracy (``node-accuracy-mean`` /
``node-accuracy-worst10``: each node's own model on its own test split) is the
result; the run's arrays are the average of the node models, evaluated
centrally as ``central-accuracy`` for reference only (no paper's number).

Decisions where the spec was open
---------------------------------
- Reusing the gossip relay rather than a third mechanism: the model stays in
  ``Context.state`` exactly as a decentralized node's, resume included. The
  replies' ``gossip.model`` costs one model upload per node and round that a
  real local-only deployment would not pay (reported as such: the gossip
  bytes per node are 0).
- The initial model goes out with every message (the relay sends an empty
  ``arrays`` to nodes that hold a model, which leaves a node that lost its
  state without neighbours nothing to start from); its bytes are counted.
- Every node trains every round (``fraction-train`` is not used), as in the
  papers' "Local" rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from bouquet.strategies.aggregation import to_record
from bouquet.strategies.base import BouquetStrategy, Record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.gossip import STATE, GossipStrategy
from bouquet.strategies.registry import register
from bouquet.tasks import wire


@register
class LocalOnly(GossipStrategy):
    """Local-only training (see the module docstring)."""

    name = "local-only"
    routine = "dpsgd"  # the gossip recipe with the weights [1]: plain training
    paper = "the pFL papers' Local baseline, e.g. https://arxiv.org/abs/2309.11103"
    tagline = "Baseline: every node trains its own model, nothing is shared"
    family = "personalization"
    params = ()

    def validate(self) -> None:
        """No graph to check: it has no edges."""

    def graph(self, server_round: int, n: int) -> np.ndarray:
        """No edges: no node ever receives another's model."""
        return np.zeros((n, n), dtype=bool)

    def mixing_of(self, adjacency: np.ndarray) -> np.ndarray:
        """The identity: each node keeps its own model."""
        return np.eye(len(adjacency))

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        """Every node, each with the initial model (see the module docstring)."""
        plan = super().recipients(ctx)
        initial = to_record(self.state[STATE]["initial"])
        return {node: {**extra, wire.ARRAYS: initial} for node, extra in plan.items()}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every node evaluates its own model; the initial one is sent along."""
        if initial := self.state[STATE]["initial"]:
            arrays = to_record(initial)
        return BouquetStrategy.configure_evaluate(
            self, server_round, arrays, config, grid
        )
