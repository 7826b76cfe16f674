"""D-PSGD: decentralized parallel SGD, every node averaging with its neighbours.

Lian, Zhang, Zhang, Hsieh, Zhang, Liu, "Can Decentralized Algorithms Outperform
Centralized Algorithms? A Case Study for Decentralized Parallel Stochastic
Gradient Descent", NeurIPS 2017, https://arxiv.org/abs/1705.09056.

- **Node** (Algorithm 1): ``x_i <- sum_j W_ij x_j`` with the models of its
  neighbours on the graph, then local SGD on its own data (``local-steps`` /
  ``local-epochs``; one step is the paper's iteration). The model never leaves
  the node but to its neighbours.
- **Server**: none in the algorithm. Flower's server relays each node's model
  to its neighbours (:mod:`strategies.gossip`) and computes the average model
  and the consensus distance as metrics only.

Wire protocol (:mod:`strategies.gossip`): the train message carries
``gossip.weights`` in its config and the neighbours' last models as
``gossip.neighbor-<k>`` records (``arrays`` is empty once the node holds a
model); the reply carries the node's model as ``gossip.model`` (and an empty
``arrays``). Client state: the model, as the node's personal parameters.
Server state: the last model of each node (to relay), the node order of the
graph, the initial model.

Decisions where the spec was open
---------------------------------
- Order within a round: gossip, then local steps (the gossip step of the
  models trained in round ``t - 1`` starts round ``t``). The paper computes
  the gradient at ``x_i`` and mixes in the same iteration,
  ``x_i <- sum_j W_ij x_j - gamma g_i(x_i)``; with local steps the
  decentralized FL papers (DFedAvgM, DFedSAM) mix then train, as here.
- On the complete graph with uniform weights every node starts each round
  from the plain mean of the last round's models: FedAvg with uniform
  weighting (a declared reduction, checked by the conformance test).
"""

from __future__ import annotations

from bouquet.strategies.base import Reduction
from bouquet.strategies.gossip import GOSSIP_PARAMS, GossipStrategy
from bouquet.strategies.registry import register


@register
class DPSGD(GossipStrategy):
    """D-PSGD (see the module docstring)."""

    name = "dpsgd"
    routine = "dpsgd"
    paper = "Lian et al., NeurIPS 2017, https://arxiv.org/abs/1705.09056"
    tagline = "Decentralized SGD: local steps, then x_i <- sum_j W_ij x_j on a graph"
    family = "decentralized"
    params = GOSSIP_PARAMS
    reductions = (
        Reduction(
            {"topology": "complete", "mixing": "uniform"},
            "fedavg",
            {"weighting": "uniform"},
        ),
    )
