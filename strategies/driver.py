"""The one driver: start-up, the exchange with the nodes, commits and checkpoints.

:class:`Driver` runs any Flower strategy (a Bouquet one, or one wrapped in
Flower's differential-privacy wrappers) through one path
(``docs/architecture.md``, "The driver"):

- **start-up**: Flower's start log and the strategy's summary; on resume, the
  checkpoint's arrays, strategy state and schedule state; else the initial
  model's central evaluation (round 0);
- **the exchange** (:class:`Exchange`): messages are pushed and replies pulled
  every :data:`POLL_INTERVAL` seconds (Flower's deployment grid sleeps 3 s
  between pulls); bytes each way, error replies and missing replies are
  counted in one place, and a missing reply names the node it was sent to;
- **a schedule** decides what to send and when to aggregate: :class:`Rounds`
  (synchronous rounds, Flower's contract) or the asynchronous event schedule
  of :mod:`strategies.asynchrony`, chosen by the strategy's ``schedule``; a
  round's train exchange is the strategy's ``exchange_train`` (one round
  trip, or several for split learning), always through the :class:`Exchange`;
- **commits**: after each round (or model version) the central evaluation,
  the :class:`RoundReport` (accounting, the strategy's drops), a log line as
  Flower's ``start`` writes it, a checkpoint and the ``on_round_end``
  callback.

Checkpoints and per-round callbacks are the driver's options, not extra
``start`` arguments: ``strategy.start(...)`` (Flower's signature) runs a
default driver; the ServerApp builds one with a checkpoint and a results
writer.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log

from bouquet.strategies.aggregation import to_record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.state import ServerState, load_state, save_state
from bouquet.strategies.validation import valid_client_time
from bouquet.tasks import wire

POLL_INTERVAL = 0.05
"""Seconds between pulls while waiting for replies."""


@dataclass
class RoundReport:
    """Accounting for one round (or one model version), filled by the driver."""

    round: int
    train_metrics: dict[str, float] = field(default_factory=dict)
    evaluate_metrics: dict[str, float] = field(default_factory=dict)
    central_metrics: dict[str, float] = field(default_factory=dict)
    train_replies: int = 0
    train_dropped: int = 0
    evaluate_replies: int = 0
    evaluate_dropped: int = 0
    train_missing: int = 0
    evaluate_missing: int = 0
    error_replies: int = 0
    drop_reasons: list[str] = field(default_factory=list)
    update_skipped: bool = False
    bytes_sent: int = 0
    bytes_received: int = 0
    wall_time: float = 0.0
    wait_time: float = 0.0
    """Seconds of ``wall_time`` spent waiting for replies (transport + clients);
    the rest is the strategy's own work and central evaluation."""
    client_time: float | None = None
    """Longest ``client-time`` a train reply reported (Bouquet's ClientApp
    measures its handler: data, model, training, packing)."""
    client_time_total: float | None = None
    """Sum of the train replies' ``client-time``: the clients' own compute."""
    sim_time: float | None = None
    """Simulated time at the end of the round (asynchronous runs)."""
    staleness: list[int] = field(default_factory=list)
    """Staleness of each aggregated update (asynchronous runs)."""

    def absorb(self, ctx: RoundContext | None) -> None:
        """Add what acceptance decided about a phase's replies."""
        if ctx is None:
            return
        outcome = ctx.outcome
        if ctx.phase == "train":
            self.train_replies += outcome.accepted
            self.train_dropped += len(outcome.dropped)
            self.update_skipped = self.update_skipped or outcome.update_skipped
        else:
            self.evaluate_replies += outcome.accepted
            self.evaluate_dropped += len(outcome.dropped)
        self.drop_reasons.extend(outcome.dropped)


RoundCallback = Callable[[RoundReport, ArrayRecord], None]


def plain_metrics(record: MetricRecord | None) -> dict[str, float]:
    """The scalar entries of a metric record."""
    if record is None:
        return {}
    return {k: v for k, v in record.items() if not isinstance(v, list)}


def payload_bytes(messages: Iterable[Message]) -> int:
    """Bytes of the arrays that ``messages`` carry."""
    total = 0
    for msg in messages:
        if msg.has_content():
            for record in msg.content.array_records.values():
                total += sum(len(a.data) for a in record.values())
    return total


def client_times(replies: Iterable[Message]) -> list[float]:
    """The valid ``client-time`` of each reply that reports one.

    Read from raw replies (before acceptance), so only a value acceptance
    would keep counts (:func:`~strategies.validation.valid_client_time`).
    """
    times = []
    for reply in replies:
        if reply.has_error() or not reply.has_content():
            continue
        record = wire.metrics_of(reply.content)
        value = record.get(wire.CLIENT_TIME) if record is not None else None
        if valid_client_time(value):
            times.append(float(value))
    return times


def bouquet_core(strategy: Strategy) -> Any:
    """The Bouquet strategy inside ``strategy`` (through Flower's wrappers), or None."""
    from bouquet.strategies.base import BouquetStrategy

    seen = 0
    while not isinstance(strategy, BouquetStrategy) and seen < 8:
        inner = getattr(strategy, "strategy", None)
        if not isinstance(inner, Strategy):
            return None
        strategy, seen = inner, seen + 1
    return strategy if isinstance(strategy, BouquetStrategy) else None


@dataclass
class Sent:
    """A message in flight."""

    node: int
    phase: str
    pushed_at: float


class Exchange:
    """Pushes messages, pulls replies; the one place replies are counted.

    ``report`` is the :class:`RoundReport` that bytes, error and missing
    replies and waiting time are added to; the schedule points it at the
    round (or version) in progress.
    """

    def __init__(self, grid: Grid, poll_interval: float = POLL_INTERVAL) -> None:
        self.grid = grid
        self.poll_interval = poll_interval
        self.report = RoundReport(0)
        self.in_flight: dict[str, Sent] = {}

    def push(self, messages: list[Message]) -> list[str]:
        """Send ``messages``; the id of each, "" where the grid refused it."""
        if not messages:
            return []
        accepted = set(self.grid.push_messages(messages))
        self.report.bytes_sent += payload_bytes(messages)
        now = time.monotonic()
        ids = []
        for msg in messages:
            mid = msg.metadata.message_id
            if mid and mid in accepted:
                phase = str(msg.metadata.message_type).split(".")[0]
                self.in_flight[mid] = Sent(msg.metadata.dst_node_id, phase, now)
                ids.append(mid)
            else:
                log(
                    WARNING,
                    "Message to node %s was not accepted.",
                    msg.metadata.dst_node_id,
                )
                ids.append("")
        return ids

    def pull(self, message_ids: Iterable[str] | None = None) -> list[Message]:
        """One pull: the replies that have arrived (for ``message_ids``, or all)."""
        wanted = [i for i in (message_ids or self.in_flight) if i in self.in_flight]
        if not wanted:
            return []
        replies = list(self.grid.pull_messages(wanted))
        for reply in replies:
            self.in_flight.pop(reply.metadata.reply_to_message_id, None)
            self.report.error_replies += reply.has_error()
        self.report.bytes_received += payload_bytes(replies)
        return replies

    def expire(
        self, timeout: float, message_ids: Iterable[str] | None = None
    ) -> list[str]:
        """Forget messages older than ``timeout`` s; count and log them missing."""
        now = time.monotonic()
        lost = {
            mid: sent
            for mid in list(message_ids or self.in_flight)
            if (sent := self.in_flight.get(mid)) and now - sent.pushed_at >= timeout
        }
        for mid in lost:
            del self.in_flight[mid]
        self._count_missing(list(lost.values()), timeout)
        return list(lost)

    def _count_missing(self, lost: list[Sent], timeout: float) -> None:
        for phase in sorted({s.phase for s in lost}):
            nodes = sorted(s.node for s in lost if s.phase == phase)
            if phase == "evaluate":
                self.report.evaluate_missing += len(nodes)
            else:
                self.report.train_missing += len(nodes)
            log(
                WARNING,
                "Round %s: no %s reply from node(s) %s within %.0fs: node lost, "
                "stopped or too slow; going on without them.",
                self.report.round,
                phase,
                nodes,
                timeout,
            )

    def round_trip(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        """Push ``messages`` and pull their replies until all are in or ``timeout``."""
        messages = list(messages)
        if not messages:
            return []
        start = time.perf_counter()
        pending = {i for i in self.push(messages) if i}
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            arrived = self.pull(pending)
            replies.extend(arrived)
            pending.difference_update(r.metadata.reply_to_message_id for r in arrived)
            if not pending:
                break
            if time.monotonic() >= deadline:
                lost = [
                    self.in_flight.pop(i)
                    for i in sorted(pending)
                    if i in self.in_flight
                ]
                self._count_missing(lost, timeout)
                break
            time.sleep(self.poll_interval)
        self.report.wait_time += time.perf_counter() - start
        return replies


@dataclass
class Run:
    """One run in progress: what a schedule needs from the driver."""

    strategy: Strategy
    core: Any
    grid: Grid
    exchange: Exchange
    num_rounds: int
    timeout: float
    train_config: ConfigRecord
    evaluate_config: ConfigRecord
    first_round: int
    arrays: ArrayRecord
    result: Result
    commit: Callable[[int, ArrayRecord, RoundReport], None]
    schedule_state: dict[str, Any] = field(default_factory=dict)


class Rounds:
    """Synchronous rounds: train, evaluate, commit (Flower's ``start`` loop)."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def export_state(self) -> dict[str, Any]:
        """Nothing beyond the round number and the strategy's state."""
        return {}

    def execute(self) -> None:
        """Rounds ``first_round .. num_rounds``."""
        run, strategy, exchange = self.run, self.run.strategy, self.run.exchange
        for rnd in range(run.first_round, run.num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", rnd, run.num_rounds)
            report = exchange.report = RoundReport(rnd)
            t0 = time.perf_counter()
            messages = strategy.configure_train(
                rnd, run.arrays, run.train_config, run.grid
            )
            if run.core is not None:  # several exchanges per round (a split)
                replies = run.core.exchange_train(list(messages), exchange, run.timeout)
            else:
                replies = exchange.round_trip(messages, run.timeout)
            times = client_times(replies)
            if times:
                report.client_time = max(times)
                report.client_time_total = sum(times)
            arrays, metrics = strategy.aggregate_train(rnd, replies)
            if run.core is not None:
                report.absorb(run.core.train_round)
            else:
                report.train_replies = len(replies) - report.error_replies
            if arrays is not None:
                run.arrays = arrays
            if metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
                run.result.train_metrics_clientapp[rnd] = metrics
                report.train_metrics = plain_metrics(metrics)
            federated_evaluation(run, rnd, report)
            report.wall_time = time.perf_counter() - t0
            run.commit(rnd, run.arrays, report)


def federated_evaluation(run: Run, rnd: int, report: RoundReport) -> None:
    """Evaluate ``run.arrays`` on the nodes (``fraction_evaluate`` of them)."""
    strategy = run.strategy
    messages = strategy.configure_evaluate(
        rnd, run.arrays, run.evaluate_config, run.grid
    )
    replies = run.exchange.round_trip(messages, run.timeout)
    metrics = strategy.aggregate_evaluate(rnd, replies)
    if run.core is not None:
        report.absorb(run.core.evaluate_round)
    if metrics is not None:
        log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
        run.result.evaluate_metrics_clientapp[rnd] = metrics
        report.evaluate_metrics = plain_metrics(metrics)


@dataclass
class Driver:
    """Runs a strategy (see the module docstring).

    Parameters
    ----------
    checkpoint : Path, optional
        Stem of the checkpoint written after every round (``.npz`` + ``.json``,
        :mod:`strategies.state`); None writes none.
    resume : bool
        Continue from ``checkpoint`` if it exists.
    on_round_end : callable, optional
        ``on_round_end(report, arrays)`` after every round (round 0 included).
    clock : object, optional
        The clock of an asynchronous schedule (default: wall time).
    time_budget : float
        Simulated-time budget of an asynchronous run (0: none).
    poll_interval : float
        Seconds between pulls while waiting for replies.

    """

    checkpoint: Path | None = None
    resume: bool = False
    on_round_end: RoundCallback | None = None
    clock: Any = None
    time_budget: float = 0.0
    poll_interval: float = POLL_INTERVAL

    def run(
        self,
        strategy: Strategy,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run ``strategy`` for ``num_rounds`` rounds (or model versions)."""
        core = bouquet_core(strategy)
        events = core is not None and core.schedule == "events"
        if events and core is not strategy and not getattr(strategy, "in_core", False):
            raise ValueError(
                f"{type(strategy).__name__} wraps the asynchronous {core.name!r}, "
                "whose schedule is not rounds: the wrapper would see synchronous "
                "rounds only. Run asynchronous strategies unwrapped."
            )
        train_config = ConfigRecord(
            {**(train_config or {}), wire.NUM_ROUNDS: int(num_rounds)}
        )
        evaluate_config = ConfigRecord(dict(evaluate_config or {}))
        log(INFO, "Starting %s strategy:", type(strategy).__name__)
        log_strategy_start_info(
            num_rounds, initial_arrays, train_config, evaluate_config
        )
        strategy.summary()
        log(INFO, "")
        t_start = time.time()
        result = Result()
        arrays, first_round, schedule_state = initial_arrays, 1, {}
        if self.resume and self.checkpoint is not None and _exists(self.checkpoint):
            saved = load_state(self.checkpoint)
            if core is not None:
                core.load_state(saved.strategy)
            arrays, first_round = to_record(saved.arrays), saved.round + 1
            schedule_state = saved.driver
            log(INFO, "Resuming after round %d", saved.round)
        result.arrays = arrays
        schedule_ref: list[Any] = []

        def commit(rnd: int, current: ArrayRecord, report: RoundReport) -> None:
            if evaluate_fn is not None:
                log(INFO, "Global evaluation")
                res = evaluate_fn(rnd, current)
                log(INFO, "\t└──> MetricRecord: %s", res)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
                    report.central_metrics = plain_metrics(res)
            result.arrays = current
            if rnd > 0 and self.checkpoint is not None:
                save_state(
                    ServerState(
                        rnd,
                        {k: a.numpy() for k, a in current.items()},
                        core.export_state() if core is not None else {},
                        schedule_ref[0].export_state() if schedule_ref else {},
                    ),
                    self.checkpoint,
                )
            if self.on_round_end is not None:
                self.on_round_end(report, current)

        run = Run(
            strategy=strategy,
            core=core,
            grid=grid,
            exchange=Exchange(grid, self.poll_interval),
            num_rounds=int(num_rounds),
            timeout=float(timeout),
            train_config=train_config,
            evaluate_config=evaluate_config,
            first_round=first_round,
            arrays=arrays,
            result=result,
            commit=commit,
            schedule_state=schedule_state,
        )
        if first_round == 1:
            start = RoundReport(0)
            if events:
                start.sim_time = 0.0  # an event schedule's time line starts here
            commit(0, arrays, start)
        if events:
            from bouquet.strategies.events import Events

            schedule: Any = Events(run, clock=self.clock, time_budget=self.time_budget)
        else:
            schedule = Rounds(run)
        schedule_ref.append(schedule)
        schedule.execute()
        result.arrays = run.arrays
        if events:
            # Nodes train without pause during an asynchronous run, so only the
            # final version is evaluated on them (every version centrally).
            final = schedule.book.version
            log(INFO, "")
            log(INFO, "Federated evaluation of version %d", final)
            federated_evaluation(run, final, RoundReport(final))
        log(INFO, "")
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        log(INFO, "")
        log(INFO, "Final results:")
        log(INFO, "")
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        log(INFO, "")
        return result


def _exists(stem: Path) -> bool:
    return Path(stem).with_suffix(".json").exists()
