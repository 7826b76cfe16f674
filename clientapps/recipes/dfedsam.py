"""DFedSAM client: mix with the neighbours, then local SAM steps.

Shi, Shen, Wei, Sun, Yuan, Wang, Tao, "Improving the Model Consistency of
Decentralized Federated Learning", ICML 2023, https://arxiv.org/abs/2302.04083.
:class:`~clientapps.recipes.dpsgd.GossipMix` (the gossip step, and no local
step when ``gossip.train`` is false: DFedSAM-MGS's extra gossip steps), then
:class:`~clientapps.hooks.SharpnessAwareStep` with radius ``dfedsam.rho``:
``g_sam = grad F_i(z + rho g / ||g||)`` on the same batch, ``z <- z - eta g_sam``.
Config keys read: ``gossip.weights``, ``gossip.train``, ``dfedsam.rho``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bouquet.clientapps.bounds import RATE_MAX, Bound
from bouquet.clientapps.hooks import Hook, SharpnessAwareStep
from bouquet.clientapps.recipes.dpsgd import GossipMix, read_train, read_weights
from bouquet.tasks.wire import algorithm_key

RHO = Bound(algorithm_key("dfedsam", "rho"), 0.0, 0.0, RATE_MAX)
BOUNDS = (RHO,)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """Gossip step, then SAM local steps."""
    return [
        GossipMix(read_weights(config), read_train(config)),
        SharpnessAwareStep(RHO.read(config)),
    ]
