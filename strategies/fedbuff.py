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

from collections.abc import Sequence
from typing import Any

from bouquet.strategies.asynchrony import AsyncStrategy, Task, Update, async_params
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param

WEIGHTS = ("identical", "examples", "weight")


@register
class FedBuff(AsyncStrategy):
    """Buffered asynchronous aggregation (see module docstring)."""

    name = "fedbuff"
    paper = (
        "Nguyen et al., AISTATS 2022, https://arxiv.org/abs/2106.06639; "
        "as in Fraboni et al., JMLR 2023, https://arxiv.org/abs/2206.10189"
    )
    tagline = (
        "Buffered async FL: aggregate the K earliest updates "
        "(K = all nodes: synchronous FedAvg)"
    )
    params = (
        Param("buffer-size", 5, ">= 0", "K; 0 = every node (synchronous FedAvg)"),
        Param(
            "weights",
            "identical",
            choices=WEIGHTS,
            help="identical (1/K) | examples (n_i share) | weight (p_i / f_i)",
        ),
        *async_params(),
    )

    def init_state(self) -> dict[str, Any]:
        return {"buffer": [], "inclusions": {}, "aggregations": 0}

    @property
    def c(self) -> int:
        """The buffer size in effect (never more than the live clients)."""
        live = len([n for n in self.nodes if n not in self.retired])
        size = self.buffer_size or live
        return max(1, min(size, live))

    def on_arrival(self, update: Update) -> None:
        self.state["buffer"] = [*self.state["buffer"], update]
        self._maybe_aggregate()

    def on_failure(self, task: Task) -> None:
        super().on_failure(task)
        self._maybe_aggregate()

    def _maybe_aggregate(self) -> None:
        buffered = self.state["buffer"]
        if buffered and len(buffered) >= self.c:
            self.state["buffer"] = []
            self.commit(buffered)
            self.dispatch(u.node for u in buffered)

    def coefficients(self, updates: Sequence[Update]) -> list[float]:
        self.state["aggregations"] += 1
        inclusions = dict(self.state["inclusions"])
        for u in updates:
            inclusions[u.node] = inclusions.get(u.node, 0) + 1
        self.state["inclusions"] = inclusions
        if self.weights == "identical":
            d = [1.0 / len(updates)] * len(updates)
        elif self.weights == "examples":
            total = sum(u.num_examples for u in updates)
            d = [u.num_examples / total for u in updates]
        else:
            aggregations = self.state["aggregations"]
            d = [self.p(u.node) * aggregations / inclusions[u.node] for u in updates]
        return [a * self.s(u) for a, u in zip(d, updates, strict=True)]
