"""FedProx client: local SGD on ``F_k(w) + mu/2 ||w - w_global||^2``.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
https://arxiv.org/abs/1812.06127 (eq. 2). ``mu`` arrives as the config key
``proximal-mu`` (the key Flower's FedProx strategy sends).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bouquet.clientapps.bounds import RATE_MAX, Bound
from bouquet.clientapps.hooks import Hook, ProximalTerm

MU = Bound("proximal-mu", 0.0, 0.0, RATE_MAX)
BOUNDS = (MU,)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the proximal term."""
    return [ProximalTerm(mu=MU.read(config))]
