"""FedFix: asynchronous FL aggregated at fixed time boundaries, reweighted.

Fraboni, Vidal, Kameni, Lorenzi, "A General Theory for Federated Optimization
with Asynchronous and Heterogeneous Clients Updates", JMLR 2023,
https://arxiv.org/abs/2206.10189 (official code: Accenture/Labs-Federated-
Learning, branch ``asynchronous_FL``, ``FL/server.py``).

The server aggregates at times ``Delta_t, 2 Delta_t, ...``. Every client whose
update returned by a boundary contributes to that event; a client that
finished early waits for the boundary, then is sent the new model (its next
return is the boundary plus its task time). At each event with returns
``W``: ``theta <- theta + eta_g sum_{i in W} d_i Delta_i`` with ``d_i =
ceil(tau_i / Delta_t) p_i``: client ``i`` contributes once every
``ceil(tau_i / Delta_t)`` events, so its expected weight per event is ``p_i``
and FedFix optimises the true objective (Async's surrogate weights clients by
``1/tau_i``). Events with no returns leave the model unchanged (no version).

- ``delta-t`` is in units of the slowest client's task time, as in the paper
  (0.2, 0.5, 0.8): the period is ``delta-t x T``, with ``T`` the slowest
  client's expected task time under the virtual clock, or the longest mean
  task duration measured so far under the wall clock (no boundary before the
  first return).
- ``tau_i`` is the running mean of client ``i``'s measured task durations
  (the spec's advice when timings are noisy; exact under a noiseless virtual
  clock).
- ``delta-t >= 1`` makes FedFix synchronous in effect; small ``delta-t``
  approaches Async.

Clients: recipe ``delta``. Driver and wire protocol: ``strategies/asynchrony.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bouquet.strategies.asynchrony import AsyncStrategy, Update, async_params
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param


@register
class FedFix(AsyncStrategy):
    """Fixed-period asynchronous aggregation (see module docstring)."""

    name = "fedfix"
    paper = "Fraboni et al., JMLR 2023, https://arxiv.org/abs/2206.10189"
    tagline = (
        "Async FL aggregated at fixed time boundaries, weights ceil(tau_i/Delta_t) p_i"
    )
    params = (
        Param("delta-t", 0.5, "> 0", "period, in units of the slowest task time"),
        *async_params(staleness=None),
    )

    def init_state(self) -> dict[str, Any]:
        return {"buffer": [], "boundary": 0.0}

    def period(self) -> float | None:
        """The aggregation period in clock time (None until it can be known)."""
        expected = [
            self.clock.expected_task_time(n, self.local_steps(n)) for n in self.nodes
        ]
        if expected and None not in expected:
            longest = max(e for e in expected if e is not None)
        else:
            longest = self.durations.longest()
        return None if not longest else self.delta_t * longest

    def next_timer(self) -> float | None:
        if not self.state["buffer"] and not self.in_flight:
            return None  # nothing can arrive: no boundary can matter
        period = self.period()
        return None if period is None else self.state["boundary"] + period

    def on_arrival(self, update: Update) -> None:
        self.state["buffer"] = [*self.state["buffer"], update]

    def on_timer(self) -> None:
        period = self.period()
        assert period is not None
        self.state["boundary"] += period
        if self.state["buffer"]:
            returned, self.state["buffer"] = self.state["buffer"], []
            self.commit(returned)
            self.dispatch(u.node for u in returned)

    def d(self, node: int, period: float) -> float:
        """``d_i = ceil(tau_i / Delta_t) p_i``."""
        tau = self.durations.get(node) or period
        # A duration equal to a multiple of the period must not round up.
        return math.ceil(tau / period - 1e-9) * self.p(node)

    def coefficients(self, updates: Sequence[Update]) -> list[float]:
        period = self.period() or 1.0
        return [self.d(u.node, period) for u in updates]
