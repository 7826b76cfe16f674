"""Baselines registered from Flower's own strategies (DESIGN rule 7).

Each class is Flower's strategy with :class:`~strategies.base.BouquetStrategy`
mixed in first (seeded sampling, reply validation, state export, the round
driver); the aggregation rule is Flower's, unchanged.

- ``fedavg``: FedAvg, McMahan et al., "Communication-Efficient Learning of Deep
  Networks from Decentralized Data", AISTATS 2017. https://arxiv.org/abs/1602.05629
- ``fedprox``: Li et al., "Federated Optimization in Heterogeneous Networks",
  MLSys 2020. https://arxiv.org/abs/1812.06127. The client adds
  ``mu/2 ||w - w_global||^2`` (config key ``proximal-mu``, Flower's name).
- ``fedavgm``: Hsu et al., "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", 2019.
  https://arxiv.org/abs/1909.06335 (server momentum).
- ``fedadam``: Reddi et al., "Adaptive Federated Optimization", ICLR 2021.
  https://arxiv.org/abs/2003.00295
- ``krum``: Blanchard et al., "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent", NeurIPS 2017. Flower's selection rule, with the
  pairwise distances computed block by block
  (:func:`~strategies.aggregation.pairwise_sq_distances`): Flower's version
  stacks every reply into one float64 matrix and squares it, which ran out of
  24 GB at 100 replies of ResNet-18 size (``simulations/bench_aggregation.py``).
- ``fedmedian``: Yin et al., "Byzantine-Robust Distributed Learning: Towards
  Optimal Statistical Rates", ICML 2018 (coordinate-wise median). Same median
  as Flower's, from a vectorised sort
  (:func:`~strategies.aggregation.coordinate_median`), faster at 100 replies;
  Flower's also empties the replies it reads.

Wire protocol (all six): server sends ``arrays`` + ``config`` (shared training
keys, ``seed``, ``server-round``; FedProx adds ``proximal-mu``); clients return
their full local ``arrays`` and ``metrics`` with ``num-examples``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from strategies import keys
from strategies.aggregation import (
    array_view,
    coordinate_median,
    pairwise_sq_distances,
    to_record,
)
from strategies.base import BouquetStrategy
from strategies.registry import AlgorithmEntry, register


class FedAvg(BouquetStrategy, flwr_strategy.FedAvg):
    """Flower's FedAvg with Bouquet's guarantees."""


class FedProx(BouquetStrategy, flwr_strategy.FedProx):
    """Flower's FedProx; the client recipe ``fedprox`` adds the proximal term."""


class FedAvgM(BouquetStrategy, flwr_strategy.FedAvgM):
    """Flower's FedAvgM; the momentum buffer is checkpointed."""

    state_attributes = ("momentum_vector",)


class FedAdam(BouquetStrategy, flwr_strategy.FedAdam):
    """Flower's FedAdam; both moments are checkpointed."""

    state_attributes = ("m_t", "v_t")


def krum_select(
    distances: np.ndarray, num_malicious: int, num_select: int
) -> list[int]:
    """Indices of the ``num_select`` replies with the lowest Krum score.

    Score of reply i (Blanchard et al.): the sum of its squared
    distances to its ``n - f - 2`` nearest other replies (at least 1).
    """
    n = len(distances)
    nearest = max(1, n - num_malicious - 2)
    scores = [
        float(np.sort(np.delete(distances[i], i))[:nearest].sum()) for i in range(n)
    ]
    return [int(i) for i in np.argsort(scores, kind="stable")[:num_select]]


class Krum(BouquetStrategy, flwr_strategy.Krum):
    """Flower's Krum, with memory-lean pairwise distances."""

    def aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Krum's choice among the validated replies, then Flower's weighted mean."""
        contents = [r.content for r in replies]
        distances = pairwise_sq_distances([c[keys.ARRAYS] for c in contents])
        chosen = [
            contents[i]
            for i in krum_select(
                distances, self.num_malicious_nodes, self.num_nodes_to_select
            )
        ]
        arrays = aggregate_arrayrecords(chosen, self.weighted_by_key)
        return arrays, self.train_metrics_aggr_fn(chosen, self.weighted_by_key)


class FedMedian(BouquetStrategy, flwr_strategy.FedMedian):
    """Flower's coordinate-wise median, computed faster and without side effects."""

    def aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Median of every array over the validated replies."""
        contents = [r.content for r in replies]
        records = [c[keys.ARRAYS] for c in contents]
        arrays = to_record(
            {
                key: np.asarray(
                    coordinate_median([array_view(r[key]) for r in records])
                )
                for key in records[0]
            }
        )
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)


def _snake(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in hyperparameters.items()}


def _builder(cls: type) -> Any:
    def build(common: Mapping[str, Any], hyperparameters: Mapping[str, Any]) -> Any:
        return cls(**common, **_snake(hyperparameters))

    return build


for _entry in (
    AlgorithmEntry(
        "fedavg",
        _builder(FedAvg),
        paper="McMahan et al., AISTATS 2017, https://arxiv.org/abs/1602.05629",
        summary="Weighted mean of client models",
        family="baseline",
    ),
    AlgorithmEntry(
        "fedprox",
        _builder(FedProx),
        client="fedprox",
        hyperparameters={"proximal-mu": 0.01},
        paper="Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127",
        summary="FedAvg + client proximal term mu/2 ||w - w_g||^2",
        family="baseline",
    ),
    AlgorithmEntry(
        "fedavgm",
        _builder(FedAvgM),
        hyperparameters={"server-learning-rate": 1.0, "server-momentum": 0.9},
        paper="Hsu et al., 2019, https://arxiv.org/abs/1909.06335",
        summary="FedAvg with server momentum",
        family="baseline",
    ),
    AlgorithmEntry(
        "fedadam",
        _builder(FedAdam),
        hyperparameters={
            "eta": 0.01,
            "eta-l": 0.01,
            "beta-1": 0.9,
            "beta-2": 0.99,
            "tau": 0.001,
        },
        paper="Reddi et al., ICLR 2021, https://arxiv.org/abs/2003.00295",
        summary="Adam on the server's pseudo-gradient",
        family="baseline",
    ),
    AlgorithmEntry(
        "krum",
        _builder(Krum),
        hyperparameters={"num-malicious-nodes": 0},
        paper="Blanchard et al., NeurIPS 2017",
        summary="Pick the reply closest to its neighbours (robust)",
        family="robust baseline",
    ),
    AlgorithmEntry(
        "fedmedian",
        _builder(FedMedian),
        paper="Yin et al., ICML 2018",
        summary="Coordinate-wise median (robust)",
        family="robust baseline",
    ),
):
    register(_entry)
