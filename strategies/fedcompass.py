"""FedCompass: semi-asynchronous FL with a computing-power-aware scheduler.

Li, Chaturvedi, Kim, Huerta, Madduri, Ryu (Zilinghan Li et al.), "FedCompass:
Efficient Cross-Silo Federated Learning on Heterogeneous Client Devices using
a Computing Power Aware Scheduler", ICLR 2024, https://arxiv.org/abs/2309.14675
(official code: APPFL/FedCompass, ``src/appfl/scheduler/compass_scheduler.py``
and ``src/appfl/aggregator/fedcompass_aggregator.py``).

The server learns each client's time per local step ``s_i`` and assigns it a
number of local steps ``Q_i`` so that a *group* of clients returns at about the
same time; the group is aggregated in one update, keeping staleness low with
little waiting.

- Start: every client gets ``Q_max`` steps and no group. A client returning
  without a group triggers an immediate single aggregation, then is assigned.
- Speed: on each return ``s_i <- (1-m) s_i + m (elapsed / Q_i)`` (the first
  sample is taken as is), ``m`` = ``speed-momentum``.
- A group member returning by the group's latest arrival time ``D_g`` waits.
  When the last member returns, or at ``D_g``, the general buffer and the
  group's updates are aggregated in one version, and the members that
  returned get the new model and new assignments, fastest first.
- A member returning after ``D_g`` is late: its update goes to the general
  buffer (aggregated with the next group), and it gets the current model and a
  new assignment at once.
- Assignment: join the open group ``g`` giving the most steps ``Q =
  floor((E_g - now) / s_i)`` within ``[Q_min, Q_max]``; otherwise create a
  group: ``Q`` = the largest ``floor((D_g + s_fastest(g) Q_max - now) / s_i)
  <= Q_max`` over groups still waiting, raised to ``Q_min`` (``Q_max`` if
  none), ``E = now + Q s_i``, ``D = now + lambda Q s_i``.
- Aggregation: ``theta <- theta + eta_g sum_i alpha S(tau_i) p_i Delta_i``
  with ``p_i = 1/N`` (``importance = "uniform"``, the official ``equal``) or
  the client's data share, ``S`` the decaying polynomial ``(tau+1)^-a``.

Decisions where the spec was open:

- Sign: clients send ``Delta_i = theta_end - theta_start`` (the other
  algorithms' convention) and the server adds; the official code subtracts
  ``theta_start - theta_end``. Same update.
- The staleness function is the decaying ``(tau+1)^(-a)`` (the spec's
  choice; that repository snapshot has ``+a``).
- Buffers (BatchNorm statistics) follow the parameters' rule instead of being
  averaged, since only deltas cross the wire.
- Time is the driver's clock: simulated time under the virtual clock, where
  the measured ``elapsed / Q_i`` is the node's simulated step time (times its
  noise); wall seconds in deployment.

Clients: recipe ``delta``, ``local-steps`` = ``Q_i`` per task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from strategies.aggregation import NDArrays
from strategies.asynchrony import (
    AsyncStrategy,
    Task,
    Update,
    driver_options,
)
from strategies.registry import AlgorithmEntry, register


class FedCompass(AsyncStrategy):
    """The COMPASS scheduler and its group aggregation (see module docstring)."""

    policy_attributes = (
        "speed",
        "assigned_steps",
        "group_of",
        "groups",
        "general_buffer",
        "group_counter",
    )

    def __init__(
        self,
        *args: Any,
        q_max: int = 100,
        q_min: int = 20,
        latest_time_factor: float = 1.5,
        speed_momentum: float = 0.9,
        alpha: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 1 <= q_min <= q_max:
            raise ValueError(
                f"fedcompass needs 1 <= q-min <= q-max; got {q_min}, {q_max}."
            )
        if not latest_time_factor >= 1.0:
            raise ValueError(
                f"fedcompass.latest-time-factor must be >= 1; got {latest_time_factor}."
            )
        if not 0.0 < speed_momentum <= 1.0:
            raise ValueError(
                f"fedcompass.speed-momentum must be in (0, 1]; got {speed_momentum}."
            )
        self.q_max, self.q_min = int(q_max), int(q_min)
        self.latest_time_factor = float(latest_time_factor)
        self.speed_momentum = float(speed_momentum)
        self.alpha = float(alpha)
        self.speed: dict[int, float] = {}
        """``s_i``: estimated time per local step."""
        self.assigned_steps: dict[int, int] = {}
        self.group_of: dict[int, int] = {}
        self.groups: dict[int, dict[str, Any]] = {}
        """Group id -> ``expected`` (E), ``latest`` (D), ``members`` (still out),
        ``arrived``, ``buffer`` and ``closed`` (aggregated or timed out)."""
        self.general_buffer: list[Update] = []
        self.group_counter = 0

    # ---------------------------------------------------------- scheduling --
    def on_start(self) -> None:
        self.dispatch(self.nodes, {n: self.q_max for n in self.nodes})

    def local_steps(self, node: int) -> int:
        return self.assigned_steps.get(node, self.q_max)

    def _measure(self, node: int, start: float, steps: int) -> None:
        sample = (self.now() - start) / steps
        if node in self.speed:
            m = self.speed_momentum
            self.speed[node] = (1 - m) * self.speed[node] + m * sample
        else:
            self.speed[node] = sample

    def on_arrival(self, update: Update) -> None:
        node, now = update.node, self.now()
        self._measure(node, update.start, update.steps)
        gid = self.group_of.pop(node, None)
        group = self.groups.get(gid) if gid is not None else None
        if group is None:
            # First return (no group yet): a single asynchronous aggregation.
            self.commit([update])
            self._assign_and_send([node])
            return
        group["members"].remove(node)
        if not group["closed"] and now <= group["latest"]:
            group["arrived"].append(node)
            group["buffer"].append(update)
            if not group["members"]:
                self._aggregate_group(gid)
            return
        # Late: aggregated with the next group; new work at once.
        if not group["members"] and not group["arrived"]:
            del self.groups[gid]
        self.general_buffer.append(update)
        self._assign_and_send([node])

    def on_failure(self, task: Task) -> None:
        gid = self.group_of.pop(task.node, None)
        if gid is not None and gid in self.groups:
            group = self.groups[gid]
            group["members"].remove(task.node)
            if not group["closed"] and not group["members"] and group["arrived"]:
                self._aggregate_group(gid)
        if task.node not in self.retired:
            self._assign_and_send([task.node])

    def next_timer(self) -> float | None:
        open_ = [g["latest"] for g in self.groups.values() if not g["closed"]]
        return min(open_) if open_ else None

    def on_timer(self) -> None:
        now = self.now()
        for gid in sorted(self.groups, key=lambda g: self.groups[g]["latest"]):
            group = self.groups.get(gid)
            if group is not None and not group["closed"] and group["latest"] <= now:
                self._aggregate_group(gid)

    def _aggregate_group(self, gid: int) -> None:
        group = self.groups[gid]
        group["closed"] = True
        arrived, buffered = group["arrived"], group["buffer"]
        group["arrived"], group["buffer"] = [], []
        if not group["members"]:
            del self.groups[gid]
        if not buffered:
            return  # the deadline passed with nobody back: nothing to aggregate
        updates, self.general_buffer = [*self.general_buffer, *buffered], []
        self.commit(updates)
        self._assign_and_send(
            sorted(arrived, key=lambda n: (self.speed[n], self.order_key(n)))
        )

    def _assign_and_send(self, nodes: Sequence[int]) -> None:
        nodes = [n for n in nodes if n not in self.retired]
        for node in nodes:  # in order: each assignment sees the groups before it
            self._assign(node)
        self.dispatch(nodes, {n: self.assigned_steps[n] for n in nodes})

    def _assign(self, node: int) -> None:
        now, s = self.now(), self.speed[node]
        if not self.groups:
            self._new_group(node, self.q_max)
            return
        best, chosen = -1, None
        for gid in sorted(self.groups):
            group = self.groups[gid]
            if group["closed"]:
                continue
            q = math.floor((group["expected"] - now) / s)
            if self.q_min <= q <= self.q_max and q >= best:
                best, chosen = q, gid
        if chosen is not None:
            self.groups[chosen]["members"].append(node)
            self.group_of[node], self.assigned_steps[node] = chosen, best
            return
        best = -1
        for group in self.groups.values():
            if group["closed"] or now >= group["latest"]:
                continue
            out = group["members"] + group["arrived"]
            fastest = min(self.speed.get(n, s) for n in out) if out else s
            q = math.floor((group["latest"] + fastest * self.q_max - now) / s)
            if q <= self.q_max:
                best = max(best, q)
        if 0 <= best < self.q_min:
            best = self.q_min
        self._new_group(node, self.q_max if best < 0 else max(1, best))

    def _new_group(self, node: int, steps: int) -> None:
        now, s = self.now(), self.speed[node]
        gid = self.group_counter
        self.group_counter += 1
        self.groups[gid] = {
            "expected": now + steps * s,
            "latest": now + steps * s * self.latest_time_factor,
            "members": [node],
            "arrived": [],
            "buffer": [],
            "closed": False,
        }
        self.group_of[node], self.assigned_steps[node] = gid, steps

    # --------------------------------------------------------- aggregation --
    def combine(self, updates: Sequence[Update]) -> NDArrays:
        return self.weighted_sum(
            updates,
            [self.alpha * self.s(u) * self.p(u.node) for u in updates],
        )


def _build(common: Mapping[str, Any], hp: Mapping[str, Any]) -> FedCompass:
    return FedCompass(
        **common,
        **driver_options(hp),
        q_max=hp["q-max"],
        q_min=hp["q-min"],
        latest_time_factor=hp["latest-time-factor"],
        speed_momentum=hp["speed-momentum"],
        alpha=hp["alpha"],
    )


register(
    AlgorithmEntry(
        "fedcompass",
        _build,
        client="delta",
        hyperparameters={
            "q-max": 100,
            "q-min": 20,
            "latest-time-factor": 1.5,
            "speed-momentum": 0.9,
            "alpha": 0.9,
            "staleness": "polynomial",
            "staleness-a": 0.5,
            "staleness-b": 4.0,
            "eta-g": 1.0,
            "importance": "uniform",
        },
        paper="Li et al., ICLR 2024, https://arxiv.org/abs/2309.14675",
        summary="Semi-async FL: a speed-aware scheduler assigns local steps so "
        "groups arrive together",
        family="asynchronous",
    )
)
