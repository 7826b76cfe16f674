"""Asynchronous federated learning on Flower's Grid: one event driver for every rule.

:class:`AsyncStrategy` replaces the synchronous round loop of
:class:`~strategies.base.BouquetStrategy` by an event loop over
``grid.push_messages`` / ``grid.pull_messages`` (polled every
:data:`POLL_INTERVAL` seconds, not Flower's 3 s): work is pushed to idle nodes,
replies are pulled as they arrive, and the algorithm's rule decides what a
reply or a timer does: aggregate at once (FedAsync), buffer until K replies
(FedBuff), wait for the next fixed time boundary (FedFix) or for a group
planned by a scheduler (FedCompass). Every aggregation makes a new model
*version*; a reply's *staleness* is the number of versions committed since the
node was sent its model. Each version is reported like a synchronous round
(``on_round_end``: checkpoint, results row, progress line), so ``round`` in the
results of an asynchronous run is the model version, and ``num-server-rounds``
caps the number of versions.

Time comes from a clock:

- :class:`VirtualClock` (default in simulation): every node has a simulated
  speed (:class:`DeviceSpeeds`, seeded), a task of ``Q`` local steps takes
  ``Q x (time per step) x noise`` simulated time units, and replies are
  released in order of simulated completion, whatever order they physically
  arrive in. Runs are deterministic by seed and stragglers exist on one
  machine; results report simulated time (``sim-time``) and wall time.
  The unit is the slowest client's mean time for one local step.
- :class:`WallClock` (real deployments): replies are handled in arrival order
  and time is seconds since the start.

Wire protocol (all four algorithms): the server sends ``arrays`` and a
``config`` with ``local-steps`` (the task's size), ``local-epochs`` (enough
epochs for that many steps), ``model-version`` and ``server-round`` = the
task's serial number (unique per task, so every task draws its own seeded
batches). Clients run plain local SGD (recipe ``delta``) and return
``Delta_i = theta_i - theta_sent`` in ``arrays``, so the server never stores
old models.

Before the first task, nodes are asked for their data profile
(:mod:`strategies.profiles`): the partition id fixes each node's simulated
speed, and ``num-examples`` the client importance ``p_i`` when ``importance =
"examples"``. An app without a query handler falls back to ranks and uniform
importance, with a warning.

Failure handling: a reply that fails validation or is an error frees its node,
which gets new work (a node failing three times in a row is retired); a task
with no reply after ``timeout`` seconds counts as missing and its node is
retired. The run stops at ``num-server-rounds`` versions, at ``time-budget``
simulated time units, or when no work is left.

Resume: the checkpoint after each version holds the clock, the per-node
bookkeeping, buffered updates and the tasks in flight. A resumed run on the
same nodes re-sends the tasks that were in flight (same node, steps, start,
serial and due time) from the checkpointed model: a valid continuation, not a
bit-identical replay (the lost tasks trained on older versions that are not
stored). On other nodes (a new Ray simulation draws new node ids) the work
restarts on every node from the checkpointed model, with a warning.

Decisions where the specs were open:

- ``Delta`` covers every state-dict entry (BatchNorm buffers follow the rule
  of the parameters, integer counters are rounded back); the papers' models
  have no BatchNorm.
- Client-side (federated) evaluation is not run: nodes are busy training.
  Every version is evaluated centrally.
- ``fraction-train`` is not used: every connected node is a client.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from strategies import keys
from strategies.aggregation import (
    NDArrays,
    apply_delta,
    to_numpy,
    to_record,
    weighted_sum,
)
from strategies.base import (
    BouquetStrategy,
    RoundCallback,
    RoundReport,
    _payload_bytes,
    _plain,
    derive_seed,
)
from strategies.profiles import ProfileError, client_indices, query_profiles
from strategies.validation import array_spec

POLL_INTERVAL = 0.01
"""Seconds between two pulls while waiting for replies."""

MODEL_VERSION = "model-version"
"""Config key: the version of the model a task starts from (information)."""

MAX_CONSECUTIVE_FAILURES = 3
"""A node whose replies fail this many times in a row gets no more work."""

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")
SPEED_MODELS = ("equal", "linear", "random")
IMPORTANCE = ("uniform", "examples")


def staleness_weight(kind: str, tau: int, a: float = 0.5, b: float = 4.0) -> float:
    """The staleness weight ``S(tau)`` of an update ``tau`` versions old.

    ``constant`` 1, ``polynomial`` ``(tau+1)^-a``, ``hinge`` 1 if ``tau <= b``
    else ``1 / (a (tau - b) + 1)`` (Xie et al., FedAsync; FedCompass uses the
    decaying polynomial).
    """
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((tau + 1.0) ** (-a))
    if kind == "hinge":
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"staleness must be one of {STALENESS_FUNCTIONS}; got {kind!r}.")


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}.")
    return value


def driver_options(hp: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`AsyncStrategy` keyword arguments from an algorithm's table.

    ``eta-g`` and ``importance`` (every asynchronous algorithm), plus
    ``staleness``, ``staleness-a`` and ``staleness-b`` where declared.
    """
    options = {"eta_g": hp["eta-g"], "importance": hp["importance"]}
    for key in ("staleness", "staleness-a", "staleness-b"):
        if key in hp:
            options[key.replace("-", "_")] = hp[key]
    return options


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
        check_choice("device-speeds", self.kind, SPEED_MODELS)
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
        rng = np.random.default_rng(derive_seed(seed, "device-speeds"))
        return rng.uniform(fastest, 1.0, num_clients)

    def task_time(
        self, step_time: float, steps: int, seed: int, index: int, serial: int
    ) -> float:
        """Simulated duration of one task of ``steps`` local steps."""
        duration = step_time * steps
        if self.noise > 0.0:
            rng = np.random.default_rng(
                derive_seed(seed, "device-noise", index, serial)
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
    pushed_at: float = 0.0


@dataclass
class Update:
    """A valid reply, ready for aggregation."""

    node: int
    version: int
    steps: int
    start: float
    arrival: float
    num_examples: float
    delta: NDArrays
    reply: Message | None = field(default=None, repr=False)

    @property
    def duration(self) -> float:
        return self.arrival - self.start

    @classmethod
    def from_reply(
        cls,
        reply: Message,
        node: int,
        version: int,
        steps: int,
        start: float,
        arrival: float,
    ) -> Update:
        """The update a valid train reply carries (``Delta_i`` in ``arrays``)."""
        content = reply.content
        return cls(
            node=node,
            version=version,
            steps=steps,
            start=start,
            arrival=arrival,
            num_examples=float(content[keys.METRICS][keys.NUM_EXAMPLES]),
            # kept in the wire dtype: ``combine`` accumulates in float64, and a
            # float64 copy of every buffered update doubled the memory
            delta=to_numpy(content[keys.ARRAYS]),
            reply=reply,
        )


TIMER = "timer"
"""Event: the clock reached the algorithm's next timer before any reply."""


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
        self,
        in_flight: Mapping[str, Task],
        arrived: Mapping[str, Message],
        until: float | None,
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
        self,
        in_flight: Mapping[str, Task],
        arrived: Mapping[str, Message],
        until: float | None,
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


# ----------------------------------------------------------------- strategy --
class AsyncStrategy(BouquetStrategy, flwr_strategy.FedAvg):
    """Base of the asynchronous algorithms: the driver (see module docstring).

    Subclasses implement the rule through :meth:`on_start`, :meth:`on_arrival`,
    :meth:`next_timer`, :meth:`on_timer` and :meth:`combine`, and act through
    :meth:`dispatch` (send the current model to nodes) and :meth:`commit`
    (aggregate updates into a new version). Their own state goes in
    ``policy_attributes``.

    Parameters
    ----------
    eta_g : float
        Server learning rate applied to the combined update.
    importance : str
        Client importance ``p_i``: ``uniform`` (``1/M``) or ``examples``
        (``n_i / sum_j n_j``, from the data profiles).
    staleness, staleness_a, staleness_b
        The staleness function ``S`` (see :func:`staleness_weight`).

    """

    policy_attributes: tuple[str, ...] = ()
    """The algorithm's own state, checkpointed with the driver's."""

    def __init__(
        self,
        *args: Any,
        eta_g: float = 1.0,
        importance: str = "uniform",
        staleness: str = "constant",
        staleness_a: float = 0.5,
        staleness_b: float = 4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.staleness = check_choice("staleness", staleness, STALENESS_FUNCTIONS)
        self.staleness_a, self.staleness_b = float(staleness_a), float(staleness_b)
        if not eta_g > 0:
            raise ValueError(f"eta-g must be > 0; got {eta_g}.")
        self.eta_g = float(eta_g)
        self.importance = check_choice("importance", importance, IMPORTANCE)
        self.version = 0
        self.serial = 0
        self.clock: Clock = VirtualClock()
        self.profiles: dict[int, dict[str, Any]] = {}
        self.nodes: list[int] = []
        self.index: dict[int, int] = {}
        """Node id -> client index (partition id), from the data profiles."""
        self.in_flight: dict[str, Task] = {}
        self.retired: set[int] = set()
        self.failures: dict[int, int] = {}
        self.durations = DurationEstimates()
        self._restored_tasks: list[dict[str, Any]] = []
        self._saved_now = 0.0
        self._grid: Grid | None = None
        self._arrays: ArrayRecord = ArrayRecord()
        self._train_config: dict[str, Any] = {}
        self._pending = RoundReport(0)
        self._last_commit_wall = 0.0
        self._commit_hook: Callable[[list[Update], list[int]], None] | None = None

    # ---------------------------------------------------------- the rule --
    def on_start(self) -> None:
        """First work of the run (default: every node gets a task)."""
        self.dispatch(self.nodes)

    def on_arrival(self, update: Update) -> None:
        """A valid reply arrived at ``self.now()``."""
        raise NotImplementedError

    def on_failure(self, task: Task) -> None:
        """A task ended without a usable update (default: new work)."""
        self.dispatch([task.node])

    def next_timer(self) -> float | None:
        """Time of the next timer event, if any (FedFix boundaries, deadlines)."""
        return None

    def on_timer(self) -> None:
        """The clock reached :meth:`next_timer`."""

    def combine(self, updates: Sequence[Update]) -> NDArrays:
        """The increment ``sum_i d_i Delta_i`` (before ``eta_g``), float64."""
        raise NotImplementedError

    def local_steps(self, node: int) -> int:
        """Size of a default task: ``local-steps``, else epochs x batches."""
        steps = int(self._train_config.get(keys.LOCAL_STEPS, 0) or 0)
        if steps > 0:
            return steps
        epochs = int(self._train_config.get(keys.LOCAL_EPOCHS, 1))
        batch = int(self._train_config.get(keys.BATCH_SIZE, 32))
        examples = float(self.profiles.get(node, {}).get(keys.NUM_EXAMPLES, batch))
        return max(1, epochs * math.ceil(examples / batch))

    # --------------------------------------------------------- utilities --
    def now(self) -> float:
        return self.clock.now()

    @property
    def num_clients(self) -> int:
        return max(1, len(self.nodes))

    def p(self, node: int) -> float:
        """Client importance ``p_i`` (sums to 1 over the clients)."""
        if self.importance == "examples" and self.profiles:
            total = sum(
                float(p.get(keys.NUM_EXAMPLES, 0)) for p in self.profiles.values()
            )
            mine = float(self.profiles.get(node, {}).get(keys.NUM_EXAMPLES, 0))
            if total > 0:
                return mine / total
        return 1.0 / self.num_clients

    def s(self, update: Update) -> float:
        """``S(tau)`` of ``update``, ``tau`` = versions committed since it was sent."""
        return staleness_weight(
            self.staleness,
            self.version - update.version,
            self.staleness_a,
            self.staleness_b,
        )

    @staticmethod
    def weighted_sum(updates: Sequence[Update], weights: Sequence[float]) -> NDArrays:
        """``sum_i w_i Delta_i`` per key, in float64."""
        return weighted_sum([u.delta for u in updates], weights)

    # ------------------------------------------------------------ actions --
    def dispatch(
        self, nodes: Iterable[int], steps: Mapping[int, int] | None = None
    ) -> None:
        """Send the current model to ``nodes`` (each gets a task of its steps)."""
        nodes = [n for n in nodes if n not in self.retired]
        if not nodes:
            return
        assert self._grid is not None
        now = self.now()
        messages, tasks = [], []
        for node in nodes:
            self.serial += 1
            q = int(steps[node]) if steps and node in steps else self.local_steps(node)
            if q < 1:
                raise ValueError(f"A task needs at least one local step; got {q}.")
            tasks.append(Task(node, "", self.version, q, now, self.serial))
            messages.append(self._train_message(node, q, self.serial))
        self._push(messages, tasks)

    def _train_message(self, node: int, steps: int, serial: int) -> Message:
        config = ConfigRecord(
            {
                **self._train_config,
                keys.SERVER_ROUND: serial,
                keys.SEED: self.seed,
                keys.LOCAL_STEPS: steps,
                keys.LOCAL_EPOCHS: steps,  # >= 1 step per epoch: enough epochs
                MODEL_VERSION: self.version,
                **self.round_config(self.version),
            }
        )
        return Message(
            RecordDict({keys.ARRAYS: self._arrays, keys.CONFIG: config}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            group_id=f"async-{serial}",
        )

    def _push(self, messages: list[Message], tasks: list[Task]) -> None:
        assert self._grid is not None
        ids = list(self._grid.push_messages(messages))
        self._pending.bytes_sent += _payload_bytes(messages)
        pushed_at = time.monotonic()
        for task, mid in zip(tasks, ids, strict=True):
            if not mid:  # Flower returns "" for a message it could not store
                log(WARNING, "Train message to node %s was not accepted.", task.node)
                self.retired.add(task.node)
                continue
            task.message_id, task.pushed_at = mid, pushed_at
            if task.due is None:
                self.clock.schedule(task)
            self.in_flight[mid] = task

    def commit(self, updates: Sequence[Update]) -> None:
        """Aggregate ``updates`` into a new model version and report it."""
        if not updates:
            return
        updates = sorted(updates, key=lambda u: (u.arrival, self.order_key(u.node)))
        new = apply_delta(to_numpy(self._arrays), self.combine(updates), self.eta_g)
        staleness = [self.version - u.version for u in updates]
        self.version += 1
        self._arrays = to_record(new)
        if self._commit_hook is not None:
            self._commit_hook(list(updates), staleness)

    def order_key(self, node: int) -> int:
        """A node's client index: a tie-break that is the same in every engine."""
        return self.index.get(node, node)

    # -------------------------------------------------- synchronous use --
    def aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The rule applied to one batch of fresh replies (staleness 0).

        Used when the strategy is driven synchronously (Flower's ``start`` or
        a user's own loop): every reply is an update of the arrays just sent.
        """
        updates = [
            Update.from_reply(r, r.metadata.src_node_id, self.version, 1, 0.0, 0.0)
            for r in replies
        ]
        new = apply_delta(self.global_arrays, self.combine(updates), self.eta_g)
        metrics = self.train_metrics_aggr_fn(
            [r.content for r in replies], self.weighted_by_key
        )
        return to_record(new), metrics

    # -------------------------------------------------------------- state --
    def export_state(self) -> dict[str, Any]:
        state = super().export_state()
        state["async"] = {
            "version": self.version,
            "serial": self.serial,
            "now": self.now() if self._grid is not None else self._saved_now,
            "nodes": list(self.nodes),
            "retired": sorted(self.retired),
            "failures": {str(k): v for k, v in self.failures.items()},
            "duration-sums": {str(k): v for k, v in self.durations.sums.items()},
            "duration-counts": {str(k): v for k, v in self.durations.counts.items()},
            "in-flight": (
                [
                    {
                        k: v
                        for k, v in asdict(t).items()
                        if k not in ("message_id", "pushed_at")
                    }
                    for t in sorted(self.in_flight.values(), key=lambda t: t.serial)
                ]
                if self._grid is not None
                else [dict(t) for t in self._restored_tasks]
            ),
            "policy": {
                name: _export_value(getattr(self, name))
                for name in self.policy_attributes
            },
        }
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        saved = state.get("async")
        if not saved:
            return
        self.version = int(saved["version"])
        self.serial = int(saved["serial"])
        self._saved_now = float(saved["now"])
        self.nodes = [int(n) for n in saved["nodes"]]
        self.retired = {int(n) for n in saved["retired"]}
        self.failures = {int(k): int(v) for k, v in saved["failures"].items()}
        self.durations.sums = {
            int(k): float(v) for k, v in saved["duration-sums"].items()
        }
        self.durations.counts = {
            int(k): int(v) for k, v in saved["duration-counts"].items()
        }
        self._restored_tasks = [dict(t) for t in saved["in-flight"]]
        for name in self.policy_attributes:
            if name in saved["policy"]:
                setattr(self, name, _import_value(saved["policy"][name]))

    # ------------------------------------------------------------- driver --
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
        on_round_end: RoundCallback | None = None,
        clock: Clock | None = None,
        time_budget: float = 0.0,
    ) -> Result:
        """Run until ``num_rounds`` versions, ``time_budget`` or no work left.

        ``clock`` defaults to a :class:`WallClock` (real devices); the
        ServerApp passes the run config's (a :class:`VirtualClock` in
        simulation). ``first_round > 1`` resumes after version
        ``first_round - 1`` (load the strategy state first).
        """
        self.summary()
        self.clock = clock if clock is not None else WallClock()
        self._grid = grid
        self._arrays = initial_arrays
        self._train_config = dict(train_config or {})
        self._sent_spec = array_spec(initial_arrays)
        self.global_arrays = to_numpy(initial_arrays)
        result = Result()
        resumed = first_round > 1
        if not resumed:
            self.version = 0
        if evaluate_fn and not resumed:
            if (res := evaluate_fn(0, initial_arrays)) is not None:
                result.evaluate_metrics_serverapp[0] = res
                if on_round_end is not None:
                    report = RoundReport(0, central_metrics=_plain(res))
                    report.sim_time = 0.0
                    on_round_end(self, 0, initial_arrays, report)
        connected = sorted(grid.get_node_ids())
        fresh_nodes = resumed and set(connected) != set(self.nodes)
        if fresh_nodes:
            log(
                WARNING,
                "Resuming on different nodes (%d connected, %d in the checkpoint): "
                "work that was in flight is dropped and every node starts afresh "
                "from the checkpointed model.",
                len(connected),
                len(self.nodes),
            )
            self._restored_tasks = []
        self.nodes = connected
        self._learn_nodes(grid, timeout)
        if resumed:
            self.clock.restore(self._saved_now)
        log(
            INFO,
            "Asynchronous run: %d clients, %s clock, up to %d versions%s",
            len(self.nodes),
            "virtual" if self.clock.virtual else "wall",
            num_rounds,
            f", time budget {time_budget:g}" if time_budget > 0 else "",
        )

        def report_commit(updates: list[Update], staleness: list[int]) -> None:
            report = self._pending
            report.round = self.version
            report.train_replies = len(updates)
            report.sim_time = self.now()
            report.staleness = staleness
            wall = time.perf_counter()
            report.wall_time = wall - self._last_commit_wall
            self._last_commit_wall = wall
            metrics = self.train_metrics_aggr_fn(
                [u.reply.content for u in updates if u.reply is not None],
                self.weighted_by_key,
            )
            result.train_metrics_clientapp[self.version] = metrics
            report.train_metrics = _plain(metrics)
            if (
                evaluate_fn
                and (res := evaluate_fn(self.version, self._arrays)) is not None
            ):
                result.evaluate_metrics_serverapp[self.version] = res
                report.central_metrics = _plain(res)
            self._pending = RoundReport(self.version + 1)
            self.current_report = self._pending
            result.arrays = self._arrays
            self.global_arrays = to_numpy(self._arrays)
            if on_round_end is not None:
                on_round_end(self, self.version, self._arrays, report)

        self._commit_hook = report_commit
        self._pending = self.current_report = RoundReport(self.version + 1)
        self._last_commit_wall = time.perf_counter()
        if resumed and not fresh_nodes:
            self._redo(self._restored_tasks)
        else:
            self.on_start()
        self._restored_tasks = []
        self._loop(num_rounds, timeout, time_budget)
        self._commit_hook = None
        self.current_report = None
        result.arrays = self._arrays
        return result

    def _learn_nodes(self, grid: Grid, timeout: float) -> None:
        try:
            self.profiles = query_profiles(grid, self.nodes, timeout, "async-profile")
            indices = client_indices(self.profiles)
        except ProfileError as err:
            log(
                WARNING,
                "%s Simulated speeds follow the sorted node ids and importance "
                "is uniform.",
                err,
            )
            self.profiles = {}
            indices = {n: i for i, n in enumerate(self.nodes)}
        self.index = indices
        # Node ids differ between engines; client indices do not. Ordering by
        # them makes task serials (and so seeds and noise) engine-independent.
        self.nodes = sorted(self.nodes, key=lambda n: (indices.get(n, n), n))
        self.clock.bind(indices, self.seed)

    def _redo(self, saved: list[dict[str, Any]]) -> None:
        """Re-send the tasks a crashed run had in flight (see module docstring)."""
        log(INFO, "Resuming: re-sending %d task(s) that were in flight.", len(saved))
        tasks = [Task(**{**t, "message_id": ""}) for t in saved]
        tasks = [
            t for t in tasks if t.node in self.nodes and t.node not in self.retired
        ]
        messages = [self._train_message(t.node, t.steps, t.serial) for t in tasks]
        for m, t in zip(messages, tasks, strict=True):
            m.content[keys.CONFIG][MODEL_VERSION] = t.version
        self._push(messages, tasks)

    def _loop(self, num_rounds: int, timeout: float, time_budget: float) -> None:
        assert self._grid is not None
        arrived: dict[str, Message] = {}
        while self.version < num_rounds:
            until = self.next_timer()
            if not self.in_flight and until is None:
                log(
                    WARNING,
                    "Asynchronous run: no work left after version %d.",
                    self.version,
                )
                return
            event = self.clock.next_event(self.in_flight, arrived, until)
            if event is None:
                if not self.clock.virtual and self._over(time_budget):
                    return
                self._pull(arrived, timeout)
                continue
            if self._over(time_budget):
                return
            if event == TIMER:
                self.on_timer()
                continue
            task = self.in_flight.pop(event)
            self._handle(task, arrived.pop(event))

    def _over(self, time_budget: float) -> bool:
        if time_budget > 0 and self.now() > time_budget:
            log(
                INFO, "Time budget %g reached at version %d.", time_budget, self.version
            )
            return True
        return False

    def _pull(self, arrived: dict[str, Message], timeout: float) -> None:
        assert self._grid is not None
        waiting = [mid for mid in self.in_flight if mid not in arrived]
        replies = list(self._grid.pull_messages(waiting)) if waiting else []
        for reply in replies:
            arrived[reply.metadata.reply_to_message_id] = reply
        self._pending.bytes_received += _payload_bytes(replies)
        if replies:
            return
        wall = time.monotonic()
        for mid in waiting:
            task = self.in_flight[mid]
            if wall - task.pushed_at > timeout:
                del self.in_flight[mid]
                self._pending.train_missing += 1
                self.retired.add(task.node)
                log(
                    WARNING,
                    "No train reply from node %s within %.0fs: node lost, stopped "
                    "or too slow; it gets no more work.",
                    task.node,
                    timeout,
                )
                self.on_failure(task)
        time.sleep(POLL_INTERVAL)

    def _handle(self, task: Task, reply: Message) -> None:
        good = self.valid_train_replies(task.version, [reply])
        if not good:
            self.failures[task.node] = self.failures.get(task.node, 0) + 1
            if self.failures[task.node] >= MAX_CONSECUTIVE_FAILURES:
                log(
                    WARNING,
                    "Node %s failed %d times in a row; it gets no more work.",
                    task.node,
                    MAX_CONSECUTIVE_FAILURES,
                )
                self.retired.add(task.node)
            self.on_failure(task)
            return
        self.failures[task.node] = 0
        update = Update.from_reply(
            good[0], task.node, task.version, task.steps, task.start, self.now()
        )
        self.durations.add(task.node, update.duration)
        self.on_arrival(update)


# ------------------------------------------------- policy state export --
_UPDATE_TAG = "__update__"


def _export_value(value: Any) -> Any:
    """Policy state as checkpointable data (updates lose their reply)."""
    if isinstance(value, Update):
        data = {
            "node": value.node,
            "version": value.version,
            "steps": value.steps,
            "start": value.start,
            "arrival": value.arrival,
            "num_examples": value.num_examples,
            "delta": dict(value.delta),
        }
        return {_UPDATE_TAG: data}
    if isinstance(value, dict):
        return {str(k): _export_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_export_value(v) for v in value]
    return value


def _import_value(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_UPDATE_TAG}:
            return Update(**value[_UPDATE_TAG])
        return {_int_key(k): _import_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_import_value(v) for v in value]
    return value


def _int_key(key: str) -> int | str:
    return int(key) if key.lstrip("-").isdigit() else key
