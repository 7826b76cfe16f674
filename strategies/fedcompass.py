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
- A failed task (error, refused or lost reply) frees its node for new work.
  A node with no speed yet (its first task failed) gets a first task again,
  ``Q_max`` steps in no group, rather than an assignment the scheduler cannot
  compute; a speed sample is floored at ``MIN_STEP_TIME``.

Clients: recipe ``delta``, ``local-steps`` = ``Q_i`` per task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bouquet.strategies.asynchrony import AsyncStrategy, Task, Update, async_params
from bouquet.strategies.registry import register
from bouquet.tasks.params import Param

MIN_STEP_TIME = 1e-9
"""Smallest time per local step a speed estimate takes (seconds)."""


@register
class FedCompass(AsyncStrategy):
    """The COMPASS scheduler and its group aggregation (see module docstring).

    State (``self.state``): ``speed`` (``s_i``, estimated time per local step),
    ``assigned-steps``, ``group-of``, ``groups`` (id -> ``expected`` E,
    ``latest`` D, ``members`` still out, ``arrived``, ``buffer``, ``closed``),
    ``general-buffer`` and ``group-counter``.
    """

    name = "fedcompass"
    paper = "Li et al., ICLR 2024, https://arxiv.org/abs/2309.14675"
    tagline = (
        "Semi-async FL: a speed-aware scheduler assigns local steps so groups "
        "arrive together"
    )
    params = (
        Param("q-max", 100, ">= 1", "most local steps assigned"),
        Param("q-min", 20, ">= 1", "fewest local steps assigned"),
        Param("latest-time-factor", 1.5, ">= 1", "lambda: a group waits lambda x E"),
        Param("speed-momentum", 0.9, "(0, 1]", "weight of the newest speed sample"),
        Param("alpha", 0.9, "> 0", "aggregation weight"),
        *async_params(staleness="polynomial"),
    )

    def validate(self) -> None:
        """``q-min <= q-max``."""
        if self.q_min > self.q_max:
            raise ValueError(
                f"fedcompass needs q-min <= q-max; got {self.q_min}, {self.q_max}."
            )

    def init_state(self) -> dict[str, Any]:
        return {
            "speed": {},
            "assigned-steps": {},
            "group-of": {},
            "groups": {},
            "general-buffer": [],
            "group-counter": 0,
        }

    # ---------------------------------------------------------- scheduling --
    def on_start(self) -> None:
        self.dispatch(self.nodes, {n: self.q_max for n in self.nodes})

    def local_steps(self, node: int) -> int:
        return self.state["assigned-steps"].get(node, self.q_max)

    def _measure(self, node: int, start: float, steps: int) -> None:
        speed = self.state["speed"]
        # A zero duration (a clock that did not move) would divide by zero.
        sample = max((self.now() - start) / steps, MIN_STEP_TIME)
        if node in speed:
            m = self.speed_momentum
            speed[node] = (1 - m) * speed[node] + m * sample
        else:
            speed[node] = sample

    def on_arrival(self, update: Update) -> None:
        node, now = update.node, self.now()
        self._measure(node, update.start, update.steps)
        gid = self.state["group-of"].pop(node, None)
        groups = self.state["groups"]
        group = groups.get(gid) if gid is not None else None
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
            del groups[gid]
        self.state["general-buffer"].append(update)
        self._assign_and_send([node])

    def on_failure(self, task: Task) -> None:
        gid = self.state["group-of"].pop(task.node, None)
        groups = self.state["groups"]
        if gid is not None and gid in groups:
            group = groups[gid]
            group["members"].remove(task.node)
            if not group["closed"] and not group["members"] and group["arrived"]:
                self._aggregate_group(gid)
        if task.node not in self.retired:
            self._assign_and_send([task.node])

    def next_timer(self) -> float | None:
        open_ = [g["latest"] for g in self.state["groups"].values() if not g["closed"]]
        return min(open_) if open_ else None

    def on_timer(self) -> None:
        now, groups = self.now(), self.state["groups"]
        for gid in sorted(groups, key=lambda g: groups[g]["latest"]):
            group = groups.get(gid)
            if group is not None and not group["closed"] and group["latest"] <= now:
                self._aggregate_group(gid)

    def _aggregate_group(self, gid: int) -> None:
        groups = self.state["groups"]
        group = groups[gid]
        group["closed"] = True
        arrived, buffered = group["arrived"], group["buffer"]
        group["arrived"], group["buffer"] = [], []
        if not group["members"]:
            del groups[gid]
        if not buffered:
            return  # the deadline passed with nobody back: nothing to aggregate
        updates = [*self.state["general-buffer"], *buffered]
        self.state["general-buffer"] = []
        self.commit(updates)
        speed = self.state["speed"]
        self._assign_and_send(
            sorted(arrived, key=lambda n: (speed[n], self.order_key(n)))
        )

    def _assign_and_send(self, nodes: Sequence[int]) -> None:
        nodes = [n for n in nodes if n not in self.retired]
        speed, steps = self.state["speed"], self.state["assigned-steps"]
        for node in nodes:  # in order: each assignment sees the groups before it
            if node in speed:
                self._assign(node)
            else:
                # No speed yet (its first task failed): a first task again,
                # Q_max steps in no group, as at the start.
                self.state["assigned-steps"][node] = self.q_max
        self.dispatch(nodes, {n: steps[n] for n in nodes})

    def _assign(self, node: int) -> None:
        speed, groups = self.state["speed"], self.state["groups"]
        now, s = self.now(), speed[node]
        if not groups:
            self._new_group(node, self.q_max)
            return
        best, chosen = -1, None
        for gid in sorted(groups):
            group = groups[gid]
            if group["closed"]:
                continue
            q = math.floor((group["expected"] - now) / s)
            if self.q_min <= q <= self.q_max and q >= best:
                best, chosen = q, gid
        if chosen is not None:
            groups[chosen]["members"].append(node)
            self.state["group-of"][node] = chosen
            self.state["assigned-steps"][node] = best
            return
        best = -1
        for group in groups.values():
            if group["closed"] or now >= group["latest"]:
                continue
            out = group["members"] + group["arrived"]
            fastest = min(speed.get(n, s) for n in out) if out else s
            q = math.floor((group["latest"] + fastest * self.q_max - now) / s)
            if q <= self.q_max:
                best = max(best, q)
        if 0 <= best < self.q_min:
            best = self.q_min
        self._new_group(node, self.q_max if best < 0 else max(1, best))

    def _new_group(self, node: int, steps: int) -> None:
        now, s = self.now(), self.state["speed"][node]
        gid = self.state["group-counter"]
        self.state["group-counter"] += 1
        self.state["groups"][gid] = {
            "expected": now + steps * s,
            "latest": now + steps * s * self.latest_time_factor,
            "members": [node],
            "arrived": [],
            "buffer": [],
            "closed": False,
        }
        self.state["group-of"][node] = gid
        self.state["assigned-steps"][node] = steps

    # --------------------------------------------------------- aggregation --
    def coefficients(self, updates: Sequence[Update]) -> list[float]:
        return [self.alpha * self.s(u) * self.p(u.node) for u in updates]
