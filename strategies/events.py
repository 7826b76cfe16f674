"""The event schedule the driver runs for an asynchronous strategy.

See :mod:`strategies.asynchrony` for the design (versions, staleness, clocks,
failures, resume); this module is the loop: push work, pull replies through
the driver's exchange, release them in clock order, let the rule act.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore import log

from bouquet.strategies.aggregation import to_numpy, to_record
from bouquet.strategies.asynchrony import (
    MAX_CONSECUTIVE_FAILURES,
    MODEL_VERSION,
    AsyncStrategy,
    Update,
)
from bouquet.strategies.clocks import TIMER, Clock, Task, WallClock
from bouquet.strategies.context import RoundContext
from bouquet.strategies.driver import RoundReport, Run, plain_metrics
from bouquet.strategies.profiles import client_indices, query_profiles
from bouquet.strategies.validation import (
    RoutineMissingError,
    Sent,
    accept_all,
    weighted_metrics,
)
from bouquet.tasks import wire

POLL_INTERVAL = 0.01
"""Seconds between two pulls while waiting for replies."""


class Events:
    """The event schedule the driver runs for an :class:`AsyncStrategy`."""

    def __init__(
        self, run: Run, clock: Clock | None = None, time_budget: float = 0.0
    ) -> None:
        self.run = run
        self.strategy: AsyncStrategy = run.core
        self.book = self.strategy.book
        self.book.clock = clock if clock is not None else WallClock()
        self.time_budget = float(time_budget)
        if self.time_budget < 0:
            raise ValueError(f"time-budget must be >= 0; got {time_budget}.")
        self.train_config = dict(run.train_config)
        self.strategy.events = self
        self._last_commit_wall = time.perf_counter()
        self._contract: Any = None
        self._start_ctx: RoundContext | None = None
        """The context the contract was made with (shapes, personal entries):
        compressed replies are decoded against it."""

    def export_state(self) -> dict[str, Any]:
        """The bookkeeping, for the driver's checkpoint."""
        return self.book.export()

    # ------------------------------------------------------------- start --
    def execute(self) -> None:
        """Learn the nodes, start (or resume) the work, run the event loop."""
        run, book, strategy = self.run, self.book, self.strategy
        resumed = run.first_round > 1
        if resumed:
            book.load(run.schedule_state)
        else:
            book.version = 0
        connected = sorted(int(n) for n in run.grid.get_node_ids())
        fresh_nodes = resumed and set(connected) != set(book.nodes)
        if fresh_nodes:
            log(
                WARNING,
                "Resuming on different nodes (%d connected, %d in the checkpoint): "
                "work that was in flight is dropped and every node starts afresh "
                "from the checkpointed model.",
                len(connected),
                len(book.nodes),
            )
            book.restored_tasks = []
        book.nodes = connected
        self._learn_nodes()
        if resumed:
            book.clock.restore(book.saved_now)
        log(
            INFO,
            "Asynchronous run: %d clients, %s clock, up to %d versions%s",
            len(book.nodes),
            "virtual" if book.clock.virtual else "wall",
            run.num_rounds,
            f", time budget {self.time_budget:g}" if self.time_budget > 0 else "",
        )
        ctx = self._context()
        self._contract = strategy.contract(ctx)
        self._start_ctx = ctx
        run.exchange.report = RoundReport(book.version + 1)
        self._last_commit_wall = time.perf_counter()
        if resumed and not fresh_nodes:
            self._redo(book.restored_tasks)
        else:
            strategy.on_start()
        book.restored_tasks = []
        self._loop()
        self.strategy.events = None

    def _learn_nodes(self) -> None:
        book = self.book
        book.profiles = query_profiles(
            self.run.grid, book.nodes, self.run.timeout, "async-profile"
        )
        if not book.profiles:
            log(
                WARNING,
                "No node described its data (a ClientApp answers the data-profile "
                "query with @app.query() calling bouquet.clientapps.describe_client): "
                "simulated speeds follow the sorted node ids, each node's first "
                "task runs its configured local epochs and later ones are sized "
                "by the num-examples of its replies.",
            )
        indices = client_indices(book.profiles, book.nodes)
        book.index = indices
        # Node ids differ between engines; client indices do not. Ordering by
        # them makes task serials (and so seeds and noise) engine-independent.
        book.nodes = sorted(book.nodes, key=lambda n: (indices.get(n, n), n))
        book.clock.bind(indices, self.strategy.seed)

    def _context(self) -> RoundContext:
        return RoundContext(
            server_round=self.book.version + 1,
            num_rounds=self.run.num_rounds,
            phase="train",
            nodes=tuple(self.book.nodes),
            sampled=tuple(self.book.nodes),
            arrays=to_numpy(self.run.arrays),
            config=self.train_config,
            seed=self.strategy.seed,
            caller_config=self.train_config,
            personal=tuple(
                wire.resolve_personal(self.strategy.personal, list(self.run.arrays))
            ),
        )

    # ----------------------------------------------------------- actions --
    def dispatch(self, nodes: Iterable[int], steps: Mapping[int, int] | None) -> None:
        """Send the current model to ``nodes`` (each gets a task of its steps)."""
        book = self.book
        nodes = [n for n in nodes if n not in book.retired]
        if not nodes:
            return
        now = book.clock.now()
        messages, tasks = [], []
        for node in nodes:
            book.serial += 1
            q = (
                int(steps[node])
                if steps and node in steps
                else self.strategy.local_steps(node)
            )
            if q < 1:
                raise ValueError(f"A task needs at least one local step; got {q}.")
            # A node that did not describe its data (no query handler) runs its
            # configured epochs until its first reply tells its size.
            sized = bool(steps and node in steps) or node in book.profiles
            tasks.append(Task(node, "", book.version, q, now, book.serial))
            messages.append(self._message(node, q, book.serial, book.version, sized))
        self._push(messages, tasks)

    def _message(
        self, node: int, steps: int, serial: int, version: int, sized: bool = True
    ) -> Message:
        strategy = self.strategy
        ctx = RoundContext(serial, self.run.num_rounds, "train", (), (), {}, {})
        values = strategy.config_for(ctx, ConfigRecord(self.train_config))
        if sized:
            values.update({wire.LOCAL_STEPS: steps, wire.LOCAL_EPOCHS: steps})
        else:
            values[wire.LOCAL_STEPS] = 0
        values[MODEL_VERSION] = version
        return Message(
            RecordDict(
                {wire.ARRAYS: self.run.arrays, wire.CONFIG: ConfigRecord(values)}
            ),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            group_id=f"async-{serial}",
        )

    def _push(self, messages: list[Message], tasks: list[Task]) -> None:
        ids = self.run.exchange.push(messages)
        for task, mid in zip(tasks, ids, strict=True):
            if not mid:  # the grid refused it (Flower returns no id)
                self.book.retired.add(task.node)
                continue
            task.message_id = mid
            if task.due is None:
                self.book.clock.schedule(task)
            self.book.in_flight[mid] = task

    def commit(self, updates: Sequence[Update]) -> None:
        """Aggregate ``updates`` into a new model version; the driver commits it."""
        if not updates:
            return
        run, book, strategy = self.run, self.book, self.strategy
        updates = sorted(updates, key=lambda u: (u.arrival, strategy.order_key(u.node)))
        ctx = self._context()
        arrays = strategy.aggregate_safely(updates, ctx)
        if arrays is None:  # refused (logged): the updates are spent, no version
            self.run.exchange.report.update_skipped = True
            self.run.exchange.report.drop_reasons.append(ctx.outcome.refused)
            return
        staleness = [book.version - u.version for u in updates]
        book.version += 1
        run.arrays = to_record(arrays)
        report = run.exchange.report
        report.round = book.version
        report.train_replies = len(updates)
        report.sim_time = book.clock.now()
        report.staleness = staleness
        wall = time.perf_counter()
        report.wall_time = wall - self._last_commit_wall
        self._last_commit_wall = wall
        metrics = weighted_metrics(updates)
        log(
            INFO,
            "[VERSION %s/%s] %d update(s)",
            book.version,
            run.num_rounds,
            len(updates),
        )
        log(INFO, "\t└──> Aggregated MetricRecord: %s", metrics)
        run.result.train_metrics_clientapp[book.version] = metrics
        report.train_metrics = plain_metrics(metrics)
        run.commit(book.version, run.arrays, report)
        run.exchange.report = RoundReport(book.version + 1)

    # -------------------------------------------------------------- loop --
    def _redo(self, saved: list[dict[str, Any]]) -> None:
        """Re-send the tasks a crashed run had in flight (see module docstring)."""
        log(INFO, "Resuming: re-sending %d task(s) that were in flight.", len(saved))
        book = self.book
        tasks = [Task(**{**t, "message_id": ""}) for t in saved]
        tasks = [
            t for t in tasks if t.node in book.nodes and t.node not in book.retired
        ]
        messages = [self._message(t.node, t.steps, t.serial, t.version) for t in tasks]
        self._push(messages, tasks)

    def _loop(self) -> None:
        book, strategy = self.book, self.strategy
        arrived: dict[str, Message] = {}
        while book.version < self.run.num_rounds:
            until = strategy.next_timer()
            if not book.in_flight and until is None:
                log(
                    WARNING,
                    "Asynchronous run: no work left after version %d.",
                    book.version,
                )
                return
            event = book.clock.next_event(book.in_flight, arrived, until)
            if event is None:
                if not book.clock.virtual and self._over():
                    return
                self._pull(arrived)
                continue
            if self._over():
                return
            if event == TIMER:
                strategy.on_timer()
                continue
            task = book.in_flight.pop(event)
            self._handle(task, arrived.pop(event))

    def _over(self) -> bool:
        if self.time_budget > 0 and self.book.clock.now() > self.time_budget:
            log(
                INFO,
                "Time budget %g reached at version %d.",
                self.time_budget,
                self.book.version,
            )
            return True
        return False

    def _pull(self, arrived: dict[str, Message]) -> None:
        book, exchange = self.book, self.run.exchange
        waiting = [mid for mid in book.in_flight if mid not in arrived]
        replies = exchange.pull(waiting) if waiting else []
        for reply in replies:
            reply_to = reply.metadata.reply_to_message_id
            if reply_to in book.in_flight and reply_to not in arrived:
                arrived[reply_to] = reply
            else:  # unsolicited, or a second answer: never an event
                self.run.exchange.report.train_dropped += 1
                self.run.exchange.report.drop_reasons.append(
                    f"node {reply.metadata.src_node_id}: reply to no task in flight"
                )
                log(WARNING, "Dropped a reply to no task in flight.")
        if replies:
            return
        for mid in exchange.expire(self.run.timeout, waiting):
            task = book.in_flight.pop(mid)
            book.retired.add(task.node)
            log(WARNING, "Node %s gets no more work.", task.node)
            self.strategy.on_failure(task)
        time.sleep(POLL_INTERVAL)

    def _handle(self, task: Task, reply: Message) -> None:
        book, report = self.book, self.run.exchange.report
        sent = {task.message_id: Sent(task.node, MessageType.TRAIN)}
        good, reasons, _ = accept_all([reply], self._contract, sent)
        codec = self.strategy.reply_codec(self._start_ctx)
        if good and codec is not None:  # a compressed uplink: C(Delta), decoded once
            good = self.strategy.decode_replies(good, codec, self._start_ctx, reasons)
        if not good:
            report.train_dropped += 1
            report.drop_reasons.extend(reasons)
            log(WARNING, "Dropped reply from %s", reasons[0])
            if not book.accepted_any and "did not run the routine" in reasons[0]:
                raise RoutineMissingError(
                    f"{self.strategy.name} needs its client routine "
                    f"'{self.strategy.routine}'; {reasons[0]}"
                )
            book.failures[task.node] = book.failures.get(task.node, 0) + 1
            if book.failures[task.node] >= MAX_CONSECUTIVE_FAILURES:
                log(
                    WARNING,
                    "Node %s failed %d times in a row; it gets no more work.",
                    task.node,
                    MAX_CONSECUTIVE_FAILURES,
                )
                book.retired.add(task.node)
            self.strategy.on_failure(task)
            return
        book.accepted_any = True
        book.failures[task.node] = 0
        if task.node not in book.profiles:
            # Learned from the reply where the node never answered the query.
            book.profiles[task.node] = {wire.NUM_EXAMPLES: int(good[0].num_examples)}
        update = Update.of(
            good[0], task.version, task.steps, task.start, book.clock.now()
        )
        book.durations.add(task.node, update.duration)
        self.strategy.on_arrival(update)
