"""Time for asynchronous runs: simulated device speeds and the two clocks.

The schedule of :mod:`strategies.asynchrony` asks a clock which event comes
next: a reply to handle, a timer, or nothing yet (pull and wait).

- :class:`VirtualClock` (default in simulation): every node has a simulated
  speed (:class:`DeviceSpeeds`, seeded), a task of ``Q`` local steps takes
  ``Q x (time per step) x noise`` simulated time units, and replies are
  released in order of simulated completion, whatever order they physically
  arrive in. The unit is the slowest client's mean time for one local step.
- :class:`WallClock` (real deployments): replies in arrival order, time in
  seconds since the start.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from bouquet.tasks import wire

SPEED_MODELS = ("equal", "linear", "random")


# ------------------------------------------------------------------ devices --
@dataclass(frozen=True)
class DeviceSpeeds:
    """Simulated device heterogeneity (run config ``device-speeds``).

    ``kind``: ``equal`` (every step takes 1), ``linear`` (client ``i`` of
    ``M`` takes ``1 - (i / (M-1)) (1 - 1/ratio)`` per step: FedFix's "F-X"
    scenario with ``X = 100 (1 - 1/ratio)``, so ratio 5 is F-80) or
    ``random`` (uniform in ``[1/ratio, 1]`` per client, drawn once from the
    seed). ``noise``: relative standard deviation of each task's time
    (``max(0.05, 1 + noise N(0, 1))``, seeded per client and task).
    """

    kind: str = "equal"
    ratio: float = 5.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SPEED_MODELS:
            raise ValueError(
                f"device-speeds must be one of {SPEED_MODELS}; got {self.kind!r}."
            )
        if not self.ratio >= 1.0:
            raise ValueError(f"device-speed-ratio must be >= 1; got {self.ratio}.")
        if not self.noise >= 0.0:
            raise ValueError(f"device-speed-noise must be >= 0; got {self.noise}.")

    def step_times(self, num_clients: int, seed: int) -> np.ndarray:
        """Mean simulated time per local step of clients ``0..M-1`` (max 1)."""
        fastest = 1.0 / self.ratio
        if self.kind == "equal" or num_clients < 2:
            return np.ones(num_clients)
        if self.kind == "linear":
            # Written so that the ends are exactly 1 and 1/ratio.
            share = np.arange(num_clients - 1, -1, -1) / (num_clients - 1)
            return fastest + (1.0 - fastest) * share
        rng = np.random.default_rng(wire.derive_seed(seed, "device-speeds"))
        return rng.uniform(fastest, 1.0, num_clients)

    def task_time(
        self, step_time: float, steps: int, seed: int, index: int, serial: int
    ) -> float:
        """Simulated duration of one task of ``steps`` local steps."""
        duration = step_time * steps
        if self.noise > 0.0:
            rng = np.random.default_rng(
                wire.derive_seed(seed, "device-noise", index, serial)
            )
            duration *= max(0.05, 1.0 + self.noise * float(rng.standard_normal()))
        return float(duration)


# -------------------------------------------------------------------- tasks --
@dataclass
class Task:
    """Work in flight: a train message a node has not answered yet."""

    node: int
    message_id: str
    version: int
    steps: int
    start: float
    serial: int
    due: float | None = None


TIMER = "timer"
"""Event: the clock reached the algorithm's next timer before any reply."""

InFlight = Mapping[str, Task]
Arrived = Mapping[str, Message]


class WallClock:
    """Events in arrival order; time is wall seconds since the start."""

    virtual = False

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def bind(self, indices: Mapping[int, int], seed: int) -> None:
        """Nothing to learn about the nodes: they run at their own speed."""

    def restore(self, now: float) -> None:
        """Continue a resumed run's time line at ``now``."""
        self._t0 = time.monotonic() - now

    def now(self) -> float:
        return time.monotonic() - self._t0

    def schedule(self, task: Task) -> None:
        """Real nodes finish when they finish."""

    def expected_task_time(self, node: int, steps: int) -> float | None:
        return None

    def next_event(
        self, in_flight: InFlight, arrived: Arrived, until: float | None
    ) -> str | None:
        """A message id to handle, :data:`TIMER`, or None (pull and wait)."""
        if arrived:
            return next(iter(arrived))
        if until is not None and self.now() >= until:
            return TIMER
        return None


class VirtualClock:
    """Events in order of simulated completion (deterministic by seed)."""

    virtual = True

    def __init__(self, speeds: DeviceSpeeds | None = None) -> None:
        self.speeds = speeds or DeviceSpeeds()
        self._now = 0.0
        self.seed = 0
        self.indices: dict[int, int] = {}
        self.step_time: dict[int, float] = {}

    def bind(self, indices: Mapping[int, int], seed: int) -> None:
        """Give every node its simulated time per step, by client index."""
        self.seed = int(seed)
        self.indices = dict(indices)
        size = max(self.indices.values(), default=-1) + 1
        times = self.speeds.step_times(size, self.seed)
        self.step_time = {n: float(times[i]) for n, i in self.indices.items()}

    def restore(self, now: float) -> None:
        self._now = float(now)

    def now(self) -> float:
        return self._now

    def schedule(self, task: Task) -> None:
        task.due = task.start + self.speeds.task_time(
            self.step_time.get(task.node, 1.0),
            task.steps,
            self.seed,
            self.indices.get(task.node, 0),
            task.serial,
        )

    def expected_task_time(self, node: int, steps: int) -> float | None:
        return self.step_time.get(node, 1.0) * steps

    def next_event(
        self, in_flight: InFlight, arrived: Arrived, until: float | None
    ) -> str | None:
        first = min(in_flight.values(), key=lambda t: (t.due, t.serial), default=None)
        if until is not None and (first is None or until < first.due):
            self._now = max(self._now, until)
            return TIMER
        if first is not None and first.message_id in arrived:
            self._now = max(self._now, first.due)
            return first.message_id
        return None


Clock = WallClock | VirtualClock


class DurationEstimates:
    """Running mean of each node's measured task duration (``tau_i``)."""

    def __init__(self) -> None:
        self.sums: dict[int, float] = {}
        self.counts: dict[int, int] = {}

    def add(self, node: int, duration: float) -> None:
        self.sums[node] = self.sums.get(node, 0.0) + duration
        self.counts[node] = self.counts.get(node, 0) + 1

    def get(self, node: int) -> float | None:
        return self.sums[node] / self.counts[node] if node in self.counts else None

    def longest(self) -> float | None:
        means = [self.sums[n] / self.counts[n] for n in self.counts]
        return max(means) if means else None
