"""DFedSAM and DFedSAM-MGS: decentralized FL with SAM and multiple gossip steps.

Shi, Shen, Wei, Sun, Yuan, Wang, Tao, "Improving the Model Consistency of
Decentralized Federated Learning", ICML 2023, https://arxiv.org/abs/2302.04083.

- **Node**: K local SAM steps from its model, ``z <- z - eta_t grad F_i(z + e)``
  with ``e = rho g / ||g||`` on the same batch (``clientapps/recipes/dfedsam.py``),
  then Q gossip steps ``u_i <- sum_j W_ij u_j`` (DFedSAM: Q = 1; DFedSAM-MGS:
  Q > 1); ``eta_t = lr * lr-decay^(t - 1)``.
- **Server**: none in the algorithm; the relay of :mod:`strategies.gossip`.

Wire protocol: :mod:`strategies.gossip`'s, plus ``dfedsam.rho``, the decayed
``lr`` and ``gossip.train`` in the config. Each gossip step is one exchange
with the neighbours, so DFedSAM-MGS runs Q server rounds per algorithm round:
the first mixes (the last models) and trains, the next Q - 1 only mix
(``gossip.train = false``, no local step) and reply the mixed model. Q gossip
steps therefore cost Q x degree model transfers per node, counted as such.

Decisions where the spec was open
---------------------------------
- ``num-server-rounds`` counts exchanges: T algorithm rounds of DFedSAM-MGS
  are ``T Q`` server rounds (every exchange is a peer-to-peer communication
  round, which is how the paper's communication is compared); evaluation and
  metrics follow the server rounds, so the consensus distance is reported
  after every gossip step.
- The server never applies ``W^Q`` itself (the spec's "Flower fit" suggested
  it would): the nodes mix, the server only relays.
- ``rho = 0.05``, ``lr-decay = 0.998`` (the spec's values); Q = 1 by default.
- With ``rho = 0``, Q = 1 and no decay DFedSAM is D-PSGD (a declared reduction).
- No golden fixture from official code: the paper's repository (probably
  github.com/YMJS-Irfan/DFedSAM) has no snapshot reachable here (the
  author's DP-FedSAM, a different, server-based algorithm, is the only one),
  so the recipe is checked against a step-by-step reference of the paper's
  equations instead (``tests/strategies/test_dfedsam.py``).
"""

from __future__ import annotations

from typing import Any

from bouquet.strategies.base import Reduction
from bouquet.strategies.context import RoundContext
from bouquet.strategies.gossip import GOSSIP_PARAMS, GossipStrategy
from bouquet.strategies.registry import register
from bouquet.tasks import wire
from bouquet.tasks.params import Param


@register
class DFedSAM(GossipStrategy):
    """DFedSAM and DFedSAM-MGS (see the module docstring)."""

    name = "dfedsam"
    routine = "dfedsam"
    paper = "Shi et al., ICML 2023, https://arxiv.org/abs/2302.04083"
    tagline = "Decentralized SAM local steps, then Q gossip steps (MGS: Q > 1)"
    family = "decentralized"
    params = (
        *GOSSIP_PARAMS,
        Param("rho", 0.05, ">= 0", "SAM radius", send=True),
        Param("gossip-steps", 1, ">= 1", "Q: gossip steps per round (MGS: > 1)"),
        Param("lr-decay", 0.998, "> 0", "per-round factor on the local lr"),
    )
    reductions = (Reduction({"rho": 0.0, "gossip-steps": 1, "lr-decay": 1.0}, "dpsgd"),)

    def training_round(self, server_round: int) -> int | None:
        """The algorithm round ``t`` that ``server_round`` trains in, else None."""
        if (server_round - 1) % self.gossip_steps:
            return None
        return (server_round - 1) // self.gossip_steps + 1

    def round_config(self, ctx: RoundContext) -> dict[str, Any]:
        """``gossip.train`` and the decayed ``lr * lr-decay^(t - 1)``."""
        t = self.training_round(ctx.server_round)
        values: dict[str, Any] = {wire.GOSSIP_TRAIN: t is not None}
        if t is not None and wire.LR in ctx.caller_config:
            decay = self.lr_decay ** (t - 1)
            values[wire.LR] = float(ctx.caller_config[wire.LR]) * decay
        return values
