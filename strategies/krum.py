"""Krum: the reply closest to its neighbours (Byzantine-robust).

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS 2017.

- **Server**: each reply's score is the sum of its squared distances to its
  ``n - f - 2`` nearest other replies; the lowest-scoring reply becomes the
  global model (:class:`~strategies.pieces.KrumMean` with one selected).
  Distances are accumulated block by block: Flower's version stacks every
  reply into one float64 matrix, which ran out of 24 GB at 100 replies of
  ResNet-18 size (``simulations/bench_aggregation.py``).
- **Client**: plain local SGD.

Wire protocol: FedAvg's.
"""

from __future__ import annotations

from bouquet.strategies.base import BouquetStrategy
from bouquet.strategies.pieces import Aggregator, ByExamples, KrumMean, ServerSGD
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param


@register
class Krum(BouquetStrategy):
    """Krum (see the module docstring)."""

    name = "krum"
    paper = "Blanchard et al., NeurIPS 2017"
    tagline = "Pick the reply closest to its neighbours (robust)"
    family = "robust baseline"
    params = (Param("num-malicious-nodes", 0, ">= 0", "f, the attackers tolerated"),)

    def make_aggregator(self) -> Aggregator:
        """Krum's choice of one reply."""
        return Aggregator(ByExamples(), KrumMean(self.num_malicious_nodes), ServerSGD())
