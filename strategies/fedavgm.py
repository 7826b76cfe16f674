"""FedAvgM: FedAvg with momentum on the server.

Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification", 2019, https://arxiv.org/abs/1909.06335.

- **Server**: the FedAvg mean gives the pseudo-gradient ``g = x - mean``; a
  heavy-ball buffer ``v = beta v + g`` (``v = g`` in round 1) and
  ``x <- x - eta v`` (``server-learning-rate`` eta, ``server-momentum`` beta),
  as Flower's FedAvgM (bit for bit: the chain with
  :class:`~strategies.pieces.ServerSGD` in the arrays' dtypes).
- **Client**: plain local SGD.

Wire protocol: FedAvg's. Server state: the momentum buffer (checkpointed).
Not the client-side momentum of ``fedavg-m`` (``strategies/momentum.py``).
"""

from __future__ import annotations

from bouquet.strategies.base import BouquetStrategy, Reduction
from bouquet.strategies.pieces import Aggregator, ByExamples, ServerSGD, WeightedMean
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param


@register
class FedAvgM(BouquetStrategy):
    """FedAvgM (see the module docstring)."""

    name = "fedavgm"
    paper = "Hsu et al., 2019, https://arxiv.org/abs/1909.06335"
    tagline = "FedAvg with server momentum"
    family = "baseline"
    params = (
        Param("server-learning-rate", 1.0, "> 0", "server step size eta"),
        Param("server-momentum", 0.9, "[0, 1)", "server momentum beta"),
    )
    reductions = (
        Reduction({"server-momentum": 0.0, "server-learning-rate": 1.0}, "fedavg"),
    )

    def make_aggregator(self) -> Aggregator:
        """Weighted mean, then a server SGD step with momentum."""
        return Aggregator(
            ByExamples(),
            WeightedMean(accumulate="wire"),
            ServerSGD(self.server_learning_rate, self.server_momentum, "wire"),
        )
