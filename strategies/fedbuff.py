"""FedBuff: buffered asynchronous aggregation of the K earliest updates.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022, https://arxiv.org/abs/2106.06639, in the form of Fraboni,
Vidal, Kameni, Lorenzi, "A General Theory for Federated Optimization with
Asynchronous and Heterogeneous Clients Updates", JMLR 2023,
https://arxiv.org/abs/2206.10189 (official code: Accenture/Labs-Federated-
Learning, branch ``asynchronous_FL``), which the spec follows.

Returned updates wait in a buffer; as soon as ``c`` (``buffer-size``) have
arrived, ``theta <- theta + eta_g sum_{i in buffer} S(tau_i) d_i Delta_i`` (one
version, at the latest of those return times) and each contributing client is
sent the new model. ``buffer-size = 0`` means "every client": all nodes train,
the server waits for all of them, aggregates and sends them all the new
model, i.e. synchronous FedAvg with full participation (with ``weights =
"examples"`` it equals Flower's FedAvg round exactly; tested).

- ``weights = "identical"``: ``d_i = 1/c`` (spec default).
- ``weights = "examples"``: ``d_i = n_i / sum_{j in buffer} n_j`` (FedAvg's
  weighting within the buffer).
- ``weights = "weight"``: ``d_i = p_i / f_i`` with ``f_i`` the fraction of
  aggregations so far (this one included) that contained client ``i``, a
  running estimate of the schedule frequency the official code computes from
  the known timings.
- ``staleness``: ``constant`` (Fraboni), ``polynomial`` (Nguyen et al. use
  ``1/sqrt(1+tau)``, i.e. ``a = 0.5``) or ``hinge``.

Clients: recipe ``delta``. Driver and wire protocol: ``strategies/asynchrony.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from strategies.aggregation import NDArrays
from strategies.asynchrony import (
    AsyncStrategy,
    Update,
    check_choice,
    driver_options,
)
from strategies.registry import AlgorithmEntry, register

WEIGHTS = ("identical", "examples", "weight")


class FedBuff(AsyncStrategy):
    """Buffered asynchronous aggregation (see module docstring)."""

    policy_attributes = ("buffer", "inclusions", "aggregations")

    def __init__(
        self,
        *args: Any,
        buffer_size: int = 5,
        weights: str = "identical",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if buffer_size < 0:
            raise ValueError(f"fedbuff.buffer-size must be >= 0; got {buffer_size}.")
        self.buffer_size = int(buffer_size)
        self.weights = check_choice("fedbuff.weights", weights, WEIGHTS)
        self.buffer: list[Update] = []
        self.inclusions: dict[int, int] = {}
        self.aggregations = 0

    @property
    def c(self) -> int:
        """The buffer size in effect (never more than the live clients)."""
        live = len([n for n in self.nodes if n not in self.retired])
        size = self.buffer_size or live
        return max(1, min(size, live))

    def on_arrival(self, update: Update) -> None:
        self.buffer.append(update)
        self._maybe_aggregate()

    def on_failure(self, task: Any) -> None:
        super().on_failure(task)
        self._maybe_aggregate()

    def _maybe_aggregate(self) -> None:
        if self.buffer and len(self.buffer) >= self.c:
            buffered, self.buffer = self.buffer, []
            self.commit(buffered)
            self.dispatch(u.node for u in buffered)

    def combine(self, updates: Sequence[Update]) -> NDArrays:
        self.aggregations += 1
        for u in updates:
            self.inclusions[u.node] = self.inclusions.get(u.node, 0) + 1
        if self.weights == "identical":
            d = [1.0 / len(updates)] * len(updates)
        elif self.weights == "examples":
            total = sum(u.num_examples for u in updates)
            d = [u.num_examples / total for u in updates]
        else:
            d = [
                self.p(u.node) * self.aggregations / self.inclusions[u.node]
                for u in updates
            ]
        s = [self.s(u) for u in updates]
        return self.weighted_sum(updates, [a * b for a, b in zip(d, s, strict=True)])


def _build(common: Mapping[str, Any], hp: Mapping[str, Any]) -> FedBuff:
    return FedBuff(
        **common,
        **driver_options(hp),
        buffer_size=hp["buffer-size"],
        weights=hp["weights"],
    )


register(
    AlgorithmEntry(
        "fedbuff",
        _build,
        client="delta",
        hyperparameters={
            "buffer-size": 5,
            "eta-g": 1.0,
            "weights": "identical",
            "staleness": "constant",
            "staleness-a": 0.5,
            "staleness-b": 4.0,
            "importance": "uniform",
        },
        paper="Nguyen et al., AISTATS 2022, https://arxiv.org/abs/2106.06639; "
        "as in Fraboni et al., JMLR 2023, https://arxiv.org/abs/2206.10189",
        summary="Buffered async FL: aggregate the K earliest updates "
        "(K = all nodes: synchronous FedAvg)",
        family="asynchronous",
    )
)
