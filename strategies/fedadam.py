"""FedAdam: Adam on the server's pseudo-gradient.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive
Federated Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295.

- **Server**: ``Delta = mean - x`` (FedAvg's mean), ``m = beta_1 m + (1 -
  beta_1) Delta``, ``v = beta_2 v + (1 - beta_2) Delta^2``,
  ``x <- x + eta_t m / (sqrt(v) + tau)``; the chain with
  :class:`~strategies.pieces.ServerAdam`. ``eta_t`` carries Flower's bias
  correction (see that class), and the mean and the step are computed in the
  arrays' dtypes as Flower does, so this equals Flower's FedAdam bit for bit.
- **Client**: plain local SGD; its learning rate is the shared ``lr`` key
  (``eta-l`` is the paper's name for it, kept for Flower's signature and
  reported in the summary only).

Wire protocol: FedAvg's. Server state: ``m`` and ``v`` (checkpointed).
"""

from __future__ import annotations

from bouquet.strategies.base import BouquetStrategy
from bouquet.strategies.pieces import Aggregator, ByExamples, ServerAdam, WeightedMean
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param


@register
class FedAdam(BouquetStrategy):
    """FedAdam (see the module docstring)."""

    name = "fedadam"
    paper = "Reddi et al., ICLR 2021, https://arxiv.org/abs/2003.00295"
    tagline = "Adam on the server's pseudo-gradient"
    family = "baseline"
    params = (
        Param("eta", 0.01, "> 0", "server learning rate eta"),
        Param("eta-l", 0.01, "> 0", "client learning rate eta_l (use lr)"),
        Param("beta-1", 0.9, "[0, 1)", "first-moment decay"),
        Param("beta-2", 0.99, "[0, 1)", "second-moment decay"),
        Param("tau", 0.001, "> 0", "adaptivity tau"),
    )

    def make_aggregator(self) -> Aggregator:
        """Weighted mean, then a server Adam step."""
        return Aggregator(
            ByExamples(),
            WeightedMean(accumulate="wire"),
            ServerAdam(self.eta, self.beta_1, self.beta_2, self.tau, "wire"),
        )
