"""FedAvg: the weighted mean of the client models.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient
Learning of Deep Networks from Decentralized Data", AISTATS 2017,
https://arxiv.org/abs/1602.05629.

- **Server**: ``x <- sum_i w_i y_i`` over the accepted replies, with
  ``w_i = n_i / n`` (``weighting = "num-examples"``, the paper's) or ``1/m``
  (``"uniform"``): the default chain of :mod:`strategies.pieces`.
- **Client**: plain local SGD (routine ``plain``).

Wire protocol: the server sends ``arrays`` and ``config`` (shared training
keys, ``seed``, ``server-round``); clients return their full local ``arrays``
and ``metrics`` with ``num-examples``. No state on either side.

Equal to Flower's ``FedAvg`` on the same replies (tested), which it replaces
as the baseline: Flower's accumulates in float32, this in float64.
"""

from __future__ import annotations

from bouquet.strategies.base import BouquetStrategy
from bouquet.strategies.pieces import (
    Aggregator,
    ByExamples,
    ServerSGD,
    Uniform,
    WeightedMean,
)
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param


@register
class FedAvg(BouquetStrategy):
    """FedAvg (see the module docstring)."""

    name = "fedavg"
    paper = "McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629"
    tagline = "Weighted mean of client models"
    family = "baseline"
    params = (
        Param(
            "weighting",
            "num-examples",
            choices=("num-examples", "uniform"),
            help="weight of a client's model: its share of examples, or 1/m",
        ),
    )

    def make_aggregator(self) -> Aggregator:
        """Weighted mean of the models, applied with step 1."""
        weighting = ByExamples() if self.weighting == "num-examples" else Uniform()
        return Aggregator(weighting, WeightedMean(accumulate="wire"), ServerSGD())
