"""Asynchronous federated learning: an event schedule on the one driver.

:class:`AsyncStrategy` is a Bouquet strategy whose ``schedule`` is
``"events"``: the driver (:mod:`strategies.driver`) runs it with the event
schedule of :mod:`strategies.events` instead of rounds. Work is pushed to
idle nodes, replies are pulled as they arrive (through the driver's exchange,
every 10 ms), and the algorithm's rule decides what a reply or a timer does:
aggregate at once (FedAsync), buffer until K replies (FedBuff), wait for the
next fixed time boundary (FedFix) or for a group planned by a scheduler
(FedCompass). Every
aggregation makes a new model *version*, committed by the driver like a
synchronous round (central evaluation, results row, checkpoint); a reply's
*staleness* is the number of versions committed since its node was sent its
model. ``round`` in the results of an asynchronous run is the model version,
and ``num-server-rounds`` caps the number of versions.

Aggregation is the chain of :mod:`strategies.pieces`: the rule's weights
``d_i S(tau_i)`` (:meth:`AsyncStrategy.coefficients`), their sum of the updates
``Delta_i`` and a step of ``eta_g``.

Time comes from a clock (:mod:`strategies.clocks`):

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
batches). Clients run plain local SGD (routine ``delta``) and return
``Delta_i = theta_i - theta_sent`` in ``arrays``, so the server never stores
old models.

Before the first task, nodes are asked for their data profile
(:mod:`strategies.profiles`): the partition id fixes each node's simulated
speed, and ``num-examples`` the client importance ``p_i`` when ``importance =
"examples"``. An app without a query handler falls back to ranks and uniform
importance, with a warning.

Failure handling: a reply that fails acceptance or is an error frees its node,
which gets new work (a node failing three times in a row is retired); a task
with no reply after ``timeout`` seconds counts as missing and its node is
retired. The run stops at ``num-server-rounds`` versions, at ``time-budget``
simulated time units, or when no work is left. A run whose clients do not run
the ``delta`` routine fails at once (their full models would be added as
updates).

Resume: the checkpoint after each version holds the schedule's bookkeeping
(clock, per-node counts, tasks in flight) and the rule's state (buffered
updates). A resumed run on the same nodes re-sends the tasks that were in
flight (same node, steps, start, serial and due time) from the checkpointed
model: a valid continuation, not a bit-identical replay (the lost tasks
trained on older versions that are not stored). On other nodes (a new Ray
simulation draws new node ids) the work restarts on every node from the
checkpointed model, with a warning.

Decisions where the specs were open:

- ``Delta`` covers every state-dict entry (BatchNorm buffers follow the rule
  of the parameters, integer counters are rounded back); the papers' models
  have no BatchNorm.
- Client-side (federated) evaluation runs once, on the final version, after
  the last commit: during the run nodes are busy training. Every version is
  evaluated centrally (``evaluate_fn``).
- ``fraction-train`` is not used: every connected node is a client.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from bouquet.strategies.aggregation import NDArrays
from bouquet.strategies.base import BouquetStrategy
from bouquet.strategies.clocks import Clock, DurationEstimates, Task, VirtualClock
from bouquet.strategies.context import RoundContext
from bouquet.strategies.pieces import Aggregator, RuleWeights, ServerSGD, WeightedMean
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire
from bouquet.tasks.params import Param

if TYPE_CHECKING:
    from bouquet.strategies.events import Events

MODEL_VERSION = "model-version"
"""Config key: the version of the model a task starts from (information)."""

MAX_CONSECUTIVE_FAILURES = 3
"""A node whose replies fail this many times in a row gets no more work."""

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")
IMPORTANCE = ("uniform", "examples")


def async_params(
    staleness: str | None = "constant", eta_g: float = 1.0, eta_g_note: str = ""
) -> tuple[Param, ...]:
    """The parameters every asynchronous rule declares.

    ``eta-g`` (default ``eta_g``) and ``importance``, and with ``staleness``
    (its default kind) the staleness function ``S`` and its constants.
    """
    help_ = "server learning rate on the update" + (
        f"; {eta_g_note}" if eta_g_note else ""
    )
    shared = (Param("eta-g", eta_g, "> 0", help_),)
    if staleness is not None:
        shared += (
            Param("staleness", staleness, choices=STALENESS_FUNCTIONS, help="S(tau)"),
            Param("staleness-a", 0.5, ">= 0", "a of (tau+1)^-a and of the hinge"),
            Param("staleness-b", 4.0, ">= 0", "b, the hinge's knee"),
        )
    return (
        *shared,
        Param("importance", "uniform", choices=IMPORTANCE, help="p_i: 1/M or n_i/n"),
    )


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


@dataclass
class Update(ClientReply):
    """An accepted reply of a task: ``Delta_i`` in ``arrays``, and its timing."""

    version: int = 0
    steps: int = 1
    start: float = 0.0
    arrival: float = 0.0

    @property
    def duration(self) -> float:
        return self.arrival - self.start

    @classmethod
    def of(
        cls, reply: ClientReply, version: int, steps: int, start: float, arrival: float
    ) -> Update:
        """The update an accepted reply carries (kept in its wire dtype)."""
        return cls(
            node=reply.node,
            partition=reply.partition,
            num_examples=reply.num_examples,
            metrics=reply.metrics,
            arrays=reply.arrays,
            records=reply.records,
            version=version,
            steps=steps,
            start=start,
            arrival=arrival,
        )

    def export(self) -> dict[str, Any]:
        """As plain data (for checkpoints; the message is not kept)."""
        names = [f.name for f in fields(self) if f.name != "message"]
        data = {name: getattr(self, name) for name in names}
        data["metrics"], data["arrays"] = dict(self.metrics), dict(self.arrays)
        data["records"] = {k: dict(v) for k, v in self.records.items()}
        return data


@dataclass
class Bookkeeping:
    """What the schedule knows about the run; the rules read it.

    Checkpointed by the driver as the schedule's state.
    """

    version: int = 0
    serial: int = 0
    nodes: list[int] = field(default_factory=list)
    index: dict[int, int] = field(default_factory=dict)
    """Node id -> client index (partition id), from the data profiles."""
    profiles: dict[int, dict[str, Any]] = field(default_factory=dict)
    in_flight: dict[str, Task] = field(default_factory=dict)
    retired: set[int] = field(default_factory=set)
    failures: dict[int, int] = field(default_factory=dict)
    durations: DurationEstimates = field(default_factory=DurationEstimates)
    clock: Clock = field(default_factory=VirtualClock)
    restored_tasks: list[dict[str, Any]] = field(default_factory=list)
    saved_now: float = 0.0
    accepted_any: bool = False

    def export(self) -> dict[str, Any]:
        """As plain data (string keys)."""
        return {
            "version": self.version,
            "serial": self.serial,
            "now": self.clock.now(),
            "nodes": list(self.nodes),
            "retired": sorted(self.retired),
            "failures": {str(k): v for k, v in self.failures.items()},
            "duration-sums": {str(k): v for k, v in self.durations.sums.items()},
            "duration-counts": {str(k): v for k, v in self.durations.counts.items()},
            "in-flight": [
                {k: v for k, v in asdict(t).items() if k != "message_id"}
                for t in sorted(self.in_flight.values(), key=lambda t: t.serial)
            ]
            or list(self.restored_tasks),
        }

    def load(self, saved: Mapping[str, Any]) -> None:
        """Restore what :meth:`export` returned."""
        self.version = int(saved["version"])
        self.serial = int(saved["serial"])
        self.saved_now = float(saved["now"])
        self.nodes = [int(n) for n in saved["nodes"]]
        self.retired = {int(n) for n in saved["retired"]}
        self.failures = {int(k): int(v) for k, v in saved["failures"].items()}
        self.durations.sums = {
            int(k): float(v) for k, v in saved["duration-sums"].items()
        }
        self.durations.counts = {
            int(k): int(v) for k, v in saved["duration-counts"].items()
        }
        self.restored_tasks = [dict(t) for t in saved["in-flight"]]


# ----------------------------------------------------------------- strategy --
class AsyncStrategy(BouquetStrategy):
    """Base of the asynchronous algorithms: the rule's interface.

    Subclasses implement the rule through :meth:`on_start`, :meth:`on_arrival`,
    :meth:`on_failure`, :meth:`next_timer`, :meth:`on_timer` and
    :meth:`coefficients`, and act through :meth:`dispatch` (send the current model
    to nodes) and :meth:`commit` (aggregate updates into a new version). Their
    own state lives in :attr:`state`; the schedule's in :attr:`book`.
    """

    routine = "delta"
    reply_arrays = "update"
    family = "asynchronous"
    schedule = "events"
    params: ClassVar[tuple[Param, ...]] = async_params(None)
    staleness: str = "constant"
    staleness_a: float = 0.5
    staleness_b: float = 4.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.book = Bookkeeping()
        self.events: Events | None = None

    def make_aggregator(self) -> Aggregator:
        """The rule's weights, their sum of the updates, a step of eta_g."""
        return Aggregator(
            RuleWeights(lambda updates, ctx: self.coefficients(updates)),
            WeightedMean(of="updates"),
            ServerSGD(self.eta_g),
        )

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

    def coefficients(self, updates: Sequence[Update]) -> list[float]:
        """The coefficient ``d_i S(tau_i)`` of each update (before ``eta_g``)."""
        raise NotImplementedError

    def local_steps(self, node: int) -> int:
        """Size of a default task: ``local-steps``, else epochs x batches."""
        config = self.events.train_config if self.events else {}
        steps = int(config.get(wire.LOCAL_STEPS, 0) or 0)
        if steps > 0:
            return steps
        epochs = int(config.get(wire.LOCAL_EPOCHS, 1))
        batch = int(config.get(wire.BATCH_SIZE, 32))
        examples = float(self.profiles.get(node, {}).get(wire.NUM_EXAMPLES, batch))
        # A profile is a claim: a task never asks for more than a client runs.
        return min(wire.MAX_LOCAL_STEPS, max(1, epochs * math.ceil(examples / batch)))

    # ------------------------------------------------ the schedule's view --
    @property
    def version(self) -> int:
        """Model versions committed so far."""
        return self.book.version

    @property
    def nodes(self) -> list[int]:
        """The run's clients (node ids, in client-index order)."""
        return self.book.nodes

    @property
    def retired(self) -> set[int]:
        return self.book.retired

    @property
    def in_flight(self) -> dict[str, Task]:
        return self.book.in_flight

    @property
    def durations(self) -> DurationEstimates:
        return self.book.durations

    @property
    def clock(self) -> Clock:
        return self.book.clock

    @property
    def profiles(self) -> dict[int, dict[str, Any]]:
        return self.book.profiles

    def now(self) -> float:
        return self.book.clock.now()

    @property
    def num_clients(self) -> int:
        return max(1, len(self.nodes))

    def p(self, node: int) -> float:
        """Client importance ``p_i`` (sums to 1 over the clients)."""
        if self.importance == "examples" and self.profiles:
            total = sum(
                float(p.get(wire.NUM_EXAMPLES, 0)) for p in self.profiles.values()
            )
            mine = float(self.profiles.get(node, {}).get(wire.NUM_EXAMPLES, 0))
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

    def order_key(self, node: int) -> int:
        """A node's client index: a tie-break that is the same in every engine."""
        return self.book.index.get(node, node)

    # ------------------------------------------------------------ actions --
    def dispatch(
        self, nodes: Iterable[int], steps: Mapping[int, int] | None = None
    ) -> None:
        """Send the current model to ``nodes`` (each gets a task of its steps)."""
        if self.events is None:
            raise RuntimeError("dispatch() needs a running asynchronous schedule.")
        self.events.dispatch(nodes, steps)

    def commit(self, updates: Sequence[Update]) -> None:
        """Aggregate ``updates`` into a new model version and report it."""
        if self.events is None:
            raise RuntimeError("commit() needs a running asynchronous schedule.")
        self.events.commit(updates)

    # -------------------------------------------------- synchronous use --
    def aggregate(self, replies: Sequence[ClientReply], ctx: RoundContext) -> NDArrays:
        """The chain over updates; plain replies count as fresh (staleness 0).

        Plain replies come when the strategy is driven in rounds (Flower's
        ``start``): every reply is then an update of the arrays just sent.
        """
        updates = [
            r if isinstance(r, Update) else Update.of(r, self.version, 1, 0.0, 0.0)
            for r in replies
        ]
        return super().aggregate(updates, ctx)

    # -------------------------------------------------------------- state --
    def export_state(self) -> dict[str, Any]:
        return _plain(self.state)

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.state.update(_restore(dict(state)))


_UPDATE_TAG = "__update__"


def _plain(value: Any) -> Any:
    if isinstance(value, Update):
        return {_UPDATE_TAG: value.export()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _restore(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_UPDATE_TAG}:
            return Update(**value[_UPDATE_TAG])
        return {_int_key(k): _restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return value


def _int_key(key: str) -> int | str:
    return int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else key
