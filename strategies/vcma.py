"""VCMA: gossip averaging that rescales each averaged layer back to a target variance.

Tian, Al-Ars, Kitsak, Hofstee, "Vanishing Variance Problem in Fully
Decentralized Neural-Network Systems", 2024, https://arxiv.org/abs/2404.04616.

Averaging ``n`` models whose weights are uncorrelated (independently
initialised gossip nodes) shrinks each layer's variance by about ``1/n``, below
what Xavier initialisation sets, and training stalls on a plateau. VCMA
(Variance-Corrected Model Averaging) rescales every averaged layer back to a
target variance while keeping its mean.

- **Node** ``s`` with received models ``theta_1..theta_n`` (its neighbours'):
  the conservative average ``theta_avg = c theta_s + (1 - c)/n sum_j theta_j``,
  then for every layer ``l`` (the model's parameters, weights and biases, with
  more than one element; BatchNorm running statistics, ``num_batches_tracked``
  and scalars are skipped) with ``mu`` and ``v`` the mean and variance of
  ``theta_avg,l`` over all its elements::

      theta_l <- (theta_avg,l - mu) sqrt((sigma_l^2 + eps) / (v + eps)) + mu

  with the target ``sigma_l^2`` of ``target``: ``follow-others`` (the paper's
  default with VC) ``(1/n) sum_j Var(theta_j,l)``; ``follow-conservative``
  ``c Var(theta_s,l) + (1 - c)(1/n) sum_j Var(theta_j,l)``; ``follow-self``
  ``Var(theta_s,l)``. Then local SGD on its own data
  (``clientapps/recipes/vcma.py``: :class:`~clientapps.recipes.dpsgd.GossipMix`
  with the correction as its post-mix step).
- **Server**: none in the algorithm; the relay of :mod:`strategies.gossip`.
  Its mixing row for node ``s`` is ``[c, (1 - c)/deg, ..., (1 - c)/deg]``
  (``mixing_of``), so the node's mix is the conservative average above.

Wire protocol: :mod:`strategies.gossip`'s, plus ``vcma.variance-correction``,
``vcma.target`` and ``vcma.epsilon`` in every train config, and, with
``independent-init``, ``vcma.init-seed`` in the config of a node that does not
hold a model yet (``derive_seed(seed, vertex, "init")``): it draws its own
initial model from that seed. The node reads ``c`` as its own weight
``gossip.weights[0]``. State: :mod:`strategies.gossip`'s.

Decisions where the spec was open
---------------------------------
- Gossip schedule: the relay's synchronous rounds (all nodes train, then each
  averages the models of all its neighbours), i.e. the spec's ``P = R = 1``
  with ``local-steps`` per round instead of one batch per tick.
- ``Var`` is ``torch.var``'s unbiased variance over all elements of the
  tensor, as the authors' simulator computes it; ``epsilon = 1e-4`` is the
  value hard-coded there (``py_src/model_variance_correct.py`` of
  twoentartian/DFL_torch, read, not copied: it also skips only tensor names
  containing ``running_mean``, ``running_var``, ``num_batches_tracked``, and
  one-element tensors, so BatchNorm weights and biases are corrected).
  Layers here are the model's parameters (buffers are never corrected). A
  layer with ``v = 0`` and ``epsilon = 0`` is left as averaged.
- A node without neighbours this round (round 1, an isolated vertex) neither
  averages nor corrects. A node that lost its model rejoins from its
  neighbours' (own weight 0): its target is then ``follow-others`` whatever
  ``target`` says (it has no own model).
- ``independent-init`` (default true): the paper's nodes start from
  independent initialisations (the spec calls it essential to the
  reproduction); a node without a model re-draws every parameter with its
  modules' ``reset_parameters`` under ``torch.manual_seed(vcma.init-seed)``.
  False: all nodes start from the run's initial model, the spec's control.
  The round-0 central evaluation is of the run's initial model either way.
- ``conservative = 0.5`` (the spec's); ``topology`` defaults to the relay's
  ``ring`` (any graph works; the paper's random 8-regular graph is
  ``topology = "regular"``, ``degree = 8``, the default degree here). On an
  irregular graph the rows ``[c, (1 - c)/deg, ...]`` are not doubly
  stochastic: gossip does not keep the average model, as in the paper.
- Reduction: without the correction, from a shared initialisation and with
  ``c = 1/(deg + 1)`` on a regular graph (the default ring: ``c = 1/3``),
  every row is the uniform ``1/(deg + 1)``: D-PSGD (declared, checked by the
  conformance test).

The variance claim is measured (per-layer variance with and without the
correction, vs. D-PSGD) by ``simulations/vcma_variance.py``; the numbers are
in ``simulations/results/decentral/README.md``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from flwr.app import ConfigRecord

from bouquet.strategies.base import Record, Reduction
from bouquet.strategies.context import RoundContext
from bouquet.strategies.gossip import GOSSIP_PARAMS, STATE, GossipStrategy
from bouquet.strategies.registry import register
from bouquet.tasks import wire
from bouquet.tasks.params import Param

TARGETS = ("follow-others", "follow-conservative", "follow-self")
"""Target variances of VCMA (the simulator's FollowOthers, ...)."""

INIT_SEED = wire.algorithm_key("vcma", "init-seed")
"""Config key: the seed a node without a model draws its own initial model from."""


def conservative_mixing(adjacency: np.ndarray, conservative: float) -> np.ndarray:
    """Rows ``c e_i + (1 - c)/deg_i a_i`` (``e_i`` for an isolated vertex)."""
    adjacency = np.asarray(adjacency, dtype=bool)
    degrees = adjacency.sum(axis=1)
    mixing = np.zeros(adjacency.shape)
    for i, degree in enumerate(degrees):
        if degree == 0:
            mixing[i, i] = 1.0
            continue
        mixing[i, adjacency[i]] = (1.0 - conservative) / degree
        mixing[i, i] = conservative
    return mixing


@register
class VCMA(GossipStrategy):
    """VCMA (see the module docstring)."""

    name = "vcma"
    routine = "vcma"
    paper = "Tian et al., 2024, https://arxiv.org/abs/2404.04616"
    tagline = "Gossip averaging, each layer rescaled back to a target variance"
    family = "decentralized"
    params = (
        *(
            replace(p, default=8) if p.key == "degree" else p
            for p in GOSSIP_PARAMS
            if p.key != "mixing"  # the conservative average is the mixing rule
        ),
        Param("conservative", 0.5, "[0, 1]", "c: weight of the own model"),
        Param(
            "variance-correction", True, help="rescale averaged layers (VC)", send=True
        ),
        Param(
            "target",
            "follow-others",
            help="target variance",
            choices=TARGETS,
            send=True,
        ),
        Param("epsilon", 1e-4, ">= 0", "eps of the rescaling factor", send=True),
        Param("independent-init", True, help="nodes draw their own initial model"),
    )
    reductions = (
        Reduction(
            {
                "variance-correction": False,
                "independent-init": False,
                "conservative": 1.0 / 3.0,
            },
            "dpsgd",
            {"mixing": "uniform"},
        ),
    )

    def mixing_of(self, adjacency: np.ndarray) -> np.ndarray:
        """The conservative average: own weight ``c``, ``(1 - c)/deg`` per neighbour."""
        return conservative_mixing(adjacency, self.conservative)

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        """The relay's messages; with ``independent-init``, a seed per fresh node."""
        plan = super().recipients(ctx)
        if not self.independent_init:
            return plan
        for node, content in plan.items():
            if len(content[wire.ARRAYS]):  # the node holds no model: draw one
                vertex = self.state[STATE]["nodes"].index(node)
                config = content[wire.CONFIG]
                seed = wire.derive_seed(self.seed, vertex, "init")
                content[wire.CONFIG] = ConfigRecord(
                    {**dict(config.items()), INIT_SEED: seed}
                )
        return plan


__all__ = ["INIT_SEED", "TARGETS", "VCMA", "conservative_mixing"]
