"""FedProx: FedAvg with a proximal term in every client's objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in
Heterogeneous Networks", MLSys 2020, https://arxiv.org/abs/1812.06127.

- **Server**: FedAvg's weighted mean.
- **Client** (routine ``fedprox``): local SGD on
  ``F_k(w) + mu/2 ||w - w_global||^2`` (eq. 2).

Wire protocol: FedAvg's, plus ``config["proximal-mu"]`` (the key Flower's
FedProx sends, so either side can be Flower's).
"""

from __future__ import annotations

from bouquet.strategies.base import BouquetStrategy, Reduction
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param


@register
class FedProx(BouquetStrategy):
    """FedProx (see the module docstring)."""

    name = "fedprox"
    routine = "fedprox"
    reply_arrays = "model"
    paper = "Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127"
    tagline = "FedAvg + client proximal term mu/2 ||w - w_g||^2"
    family = "baseline"
    params = (
        Param(
            "proximal-mu",
            0.01,
            ">= 0",
            "mu, weight of the proximal term (eq. 2)",
            send="proximal-mu",
        ),
    )
    reductions = (Reduction({"proximal-mu": 0.0}, "fedavg"),)
