"""The base of every Bouquet strategy: a mixin over Flower's message-API strategies.

``BouquetStrategy`` adds to any :class:`flwr.serverapp.strategy.Strategy`:

- **Seeded sampling.** Nodes are sampled from the sorted node ids with a random
  stream derived from ``(seed, round)``, so a run replays exactly.
- **Reply validation.** Replies are checked against the arrays that were sent
  (keys, shapes, dtypes, finiteness) and against the metrics contract
  (``num-examples`` > 0, finite numbers). Bad replies are dropped with a logged
  reason and counted; the round goes on with the rest. If fewer than
  ``min_train_nodes`` good replies remain, the round's update is skipped (the
  global arrays stay as they were) and the reason is logged as an error.
- **Deterministic reply order.** Good replies are aggregated in order of the
  ``partition-id`` they report, so float sums do not depend on arrival order.
- **State export/load.** ``export_state()`` / ``load_state()`` cover the
  attributes named in ``state_attributes`` (e.g. FedAdam's moments), so a run
  can be checkpointed every round and resumed.
- **One round driver.** :meth:`start` is Flower's ``start`` with a first round
  (for resume), an ``on_round_end`` callback (checkpoints, results, progress)
  and per-round accounting (bytes each way, replies, drops, wall time, and
  the share of it spent in Bouquet's server code vs waiting for replies).
  Algorithms customise rounds through ``configure_*`` / ``aggregate_*``, never
  by copying the loop.
- **Prompt replies.** Messages go out and come back through :func:`exchange`,
  which polls every :data:`EXCHANGE_POLL_INTERVAL` seconds; Flower's
  deployment grid sleeps 3 s between pulls, which added up to 3 s to every
  phase of a deployment round (``simulations/bench_deployment.py``).
- **Extra records to clients.** ``outgoing_train_records(round)`` returns
  named records (e.g. a control variate) added to every train message.

- **Per-node messages.** :func:`with_records` copies a configured message with
  some records replaced (a role, a stale model, an extra ArrayRecord), for
  strategies that override ``configure_train`` to send nodes different content.

Use it first in the bases: ``class FedProx(BouquetStrategy, flwr.FedProx)``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from strategies import keys
from strategies.aggregation import cast_like, to_numpy, to_record, weighted_metrics
from strategies.validation import ArraySpec, array_spec, check_reply

_ARRAYRECORD_TAG = "__arrayrecord__"

EXCHANGE_POLL_INTERVAL = 0.05
"""Seconds between pulls while waiting for replies (see :func:`exchange`)."""


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float | None,
    poll_interval: float = EXCHANGE_POLL_INTERVAL,
) -> list[Message]:
    """Push ``messages`` and pull their replies until all are in or ``timeout``.

    What ``grid.send_and_receive`` does, with a short poll: Flower's
    ``HttpGrid`` (the deployment grid) sleeps a fixed 3 s between pulls, so a
    reply that arrives just after a pull waits up to 3 s more. A pull with
    nothing to return is one cheap request to the SuperLink.
    """
    pending = set(grid.push_messages(list(messages)))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        arrived = list(grid.pull_messages(pending))
        replies.extend(arrived)
        pending.difference_update(r.metadata.reply_to_message_id for r in arrived)
        if not pending or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll_interval)
    return replies


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. ``seed, round, "train"``)."""
    words = [
        p if isinstance(p, int) else int.from_bytes(p.encode(), "little") for p in parts
    ]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> 1)


def with_records(
    message: Message, records: Mapping[str, Any], dst_node_id: int | None = None
) -> Message:
    """A copy of an outgoing ``message`` with ``records`` added or replaced.

    For strategies that send different content to different nodes (a role in
    the config, a stale model, an extra ArrayRecord): Flower's ``configure_*``
    gives every node a message over one shared RecordDict, so tailor each one
    with this instead of editing it in place. Records not named are shared.
    ``dst_node_id`` readdresses the copy (a strategy's own choice of nodes).
    """
    content = RecordDict(dict(message.content.items()))
    for name, record in records.items():
        content[name] = record
    return Message(
        content=content,
        message_type=message.metadata.message_type,
        dst_node_id=(
            message.metadata.dst_node_id if dst_node_id is None else dst_node_id
        ),
        group_id=message.metadata.group_id,
    )


NODE_WAIT_TIMEOUT = 300.0
"""Default seconds a round waits for ``min_available_nodes`` (see
:meth:`BouquetStrategy.connected_nodes`)."""

NODE_POLL_INTERVAL = 0.5
"""Seconds between node-list queries while waiting for nodes."""


class _NodeSnapshot:
    """A view of a Grid whose ``get_node_ids`` is one sorted, fixed list.

    Sorted for stable sampling; fixed so that Flower's sampler, which waits in
    a loop until enough nodes are listed, sees exactly the nodes the strategy
    already waited for and never blocks on a node lost in between.
    """

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid = grid
        self._nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def wait_for_node_list(
    grid: Grid,
    minimum: int,
    timeout: float,
    settle: float = 0.0,
    poll_interval: float = NODE_POLL_INTERVAL,
) -> list[int]:
    """The sorted node ids once ``minimum`` are connected.

    With ``settle``, also once the count has not changed for that long (nodes
    still registering). After ``timeout`` seconds, whatever is connected then
    (``timeout <= 0``: wait for ever). A wait past 5 s is logged once.
    """
    start = time.monotonic()
    last, stable_since, logged = -1, start, False
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) != last:
            last, stable_since = len(nodes), now
        if len(nodes) >= minimum and now - stable_since >= settle:
            return nodes
        if timeout > 0 and now - start >= timeout:
            return nodes
        if not logged and len(nodes) < minimum and now - start >= 5.0:
            log(INFO, "Waiting for nodes: %d connected, %d wanted", len(nodes), minimum)
            logged = True
        time.sleep(poll_interval)


@dataclass
class RoundReport:
    """Accounting for one round, filled in by the driver and the mixin."""

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
    sim_time: float | None = None
    """Simulated time at the end of the round (asynchronous runs)."""
    staleness: list[int] = field(default_factory=list)
    """Staleness of each aggregated update (asynchronous runs)."""


Record = ArrayRecord | ConfigRecord | MetricRecord
"""A record that can travel in a message besides ``arrays`` and ``config``."""

RoundCallback = Callable[["BouquetStrategy", int, ArrayRecord, RoundReport], None]


def _payload_bytes(messages: Iterable[Message]) -> int:
    total = 0
    for msg in messages:
        if msg.has_content():
            for record in msg.content.array_records.values():
                total += sum(len(a.data) for a in record.values())
    return total


def _plain(record: MetricRecord | None) -> dict[str, float]:
    if record is None:
        return {}
    return {k: v for k, v in record.items() if not isinstance(v, list)}


class BouquetStrategy:
    """Mixin that gives a Flower strategy Bouquet's guarantees (see module doc).

    Parameters
    ----------
    seed : int
        Root of the sampling stream and of the clients' random streams (sent as
        ``config["seed"]``).
    *args, **kwargs
        Passed to the Flower strategy it is mixed into.

    """

    state_attributes: ClassVar[tuple[str, ...]] = ()
    """Attributes saved by ``export_state`` and restored by ``load_state``."""

    extra_train_records: ClassVar[tuple[str, ...]] = ()
    """Names of extra ArrayRecords a train reply carries (shaped like the model);
    the records sent the other way come from :meth:`outgoing_train_records`."""

    def __init__(
        self,
        *args: Any,
        seed: int = 0,
        node_wait_timeout: float = NODE_WAIT_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", weighted_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", weighted_metrics)
        super().__init__(*args, **kwargs)
        self.seed = int(seed)
        self.node_wait_timeout = float(node_wait_timeout)
        self.current_report: RoundReport | None = None
        self._sent_spec: ArraySpec | None = None
        self.global_arrays: dict[str, np.ndarray] = {}
        """The arrays sent this round (the reference for client deltas)."""
        self._recipients: dict[str, int] = {}
        """Node each message of the current exchange went to, by message id."""

    # ----------------------------------------------------------- sampling --
    def connected_nodes(self, grid: Grid, server_round: int, needed: int) -> list[int]:
        """The nodes to sample from this round, after waiting for enough of them.

        Flower's sampler waits, without limit, until ``min_available_nodes``
        are connected. A node that dies for good mid-run then stops the run for
        ever. Here the round waits up to ``node_wait_timeout`` seconds (a node
        that restarts comes back); after that it goes on with the connected
        nodes if there are at least ``needed`` (the phase's ``min_*_nodes``),
        with a warning, and otherwise fails with an error that names the
        numbers (the last round's checkpoint is kept for ``resume``).
        """
        wanted = max(getattr(self, "min_available_nodes", 1), needed)
        nodes = wait_for_node_list(grid, wanted, self.node_wait_timeout)
        if len(nodes) >= wanted:
            return nodes
        if len(nodes) >= needed:
            log(
                WARNING,
                "Round %s: %d node(s) connected after waiting %.0f s, fewer than "
                "min_available_nodes=%d; going on with them.",
                server_round,
                len(nodes),
                self.node_wait_timeout,
                wanted,
            )
            return nodes
        raise RuntimeError(
            f"Round {server_round}: {len(nodes)} node(s) connected after waiting "
            f"{self.node_wait_timeout:.0f} s; the round needs {needed} "
            f"(min_available_nodes={wanted}). Start more SuperNodes, lower "
            "min-train-nodes / min-evaluate-nodes, or raise node-wait-timeout "
            "(0 waits for ever)."
        )

    def _seeded(
        self,
        server_round: int,
        phase: str,
        configure: Callable,
        *args: Any,
        grid: Grid | None = None,
        needed: int = 1,
    ) -> list[Message]:
        """``configure(*args, grid_view)`` with Flower's sampler seeded.

        ``grid_view`` is a fixed list of nodes that suffices for the round
        (see :meth:`connected_nodes`).
        """
        restore_minimum = None
        if grid is not None:
            nodes = self.connected_nodes(grid, server_round, needed)
            args = (*args, _NodeSnapshot(grid, nodes))
            minimum = getattr(self, "min_available_nodes", None)
            if minimum is not None and minimum > len(nodes):
                restore_minimum, self.min_available_nodes = minimum, len(nodes)
        # Flower's samplers draw from the global `random`: seed it for this call
        # only, and restore it so that nothing else in the process is affected.
        saved = random.getstate()
        random.seed(derive_seed(self.seed, server_round, phase))
        try:
            return list(configure(*args))
        finally:
            random.setstate(saved)
            if restore_minimum is not None:
                self.min_available_nodes = restore_minimum

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (seeded) and send them the arrays and the round's config."""
        self._sent_spec = array_spec(arrays)
        self.global_arrays = to_numpy(arrays)
        config[keys.SEED] = self.seed
        config.update(self.round_config(server_round))
        if getattr(self, "fraction_train", 1.0) == 0.0:
            return []
        messages = self._seeded(
            server_round,
            "train",
            super().configure_train,
            server_round,
            arrays,
            config,
            grid=grid,
            needed=getattr(self, "min_train_nodes", 1),
        )
        extras = self.outgoing_train_records(server_round)
        clash = set(extras) & {keys.ARRAYS, keys.CONFIG}
        if clash:
            raise ValueError(f"Extra records may not replace {sorted(clash)}.")
        for msg in messages:
            for name, record in extras.items():
                msg.content[name] = record
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (seeded) for federated evaluation."""
        config[keys.SEED] = self.seed
        if getattr(self, "fraction_evaluate", 1.0) == 0.0:
            return []
        return self._seeded(
            server_round,
            "evaluate",
            super().configure_evaluate,
            server_round,
            arrays,
            config,
            grid=grid,
            needed=getattr(self, "min_evaluate_nodes", 1),
        )

    def round_config(self, server_round: int) -> dict[str, Any]:
        """Algorithm-specific config values for this round (override to schedule)."""
        return {}

    def outgoing_train_records(self, server_round: int) -> dict[str, Record]:
        """Extra named records sent with every train message of this round.

        Override to send tensors besides the model (e.g. SCAFFOLD's server
        control variate), each in its own record named ``"<algorithm>.<name>"``.
        Called after ``global_arrays`` holds this round's arrays; the same
        records go to every sampled node. Default: none.
        """
        return {}

    # --------------------------------------------------------- validation --
    def _filter(
        self, replies: Iterable[Message], array_records: dict[str, ArraySpec]
    ) -> tuple[list[Message], list[str]]:
        good, reasons = [], []
        for msg in replies:
            reason = check_reply(msg, array_records=array_records)
            if reason is None:
                good.append(msg)
            else:
                if msg.has_error() and self.current_report is not None:
                    self.current_report.error_replies += 1
                # The SuperLink answers for a node it found offline (its own
                # id as the sender): name the node the message was for.
                src = self._recipients.get(
                    msg.metadata.reply_to_message_id, msg.metadata.src_node_id
                )
                reasons.append(f"node {src}: {reason}")
                log(WARNING, "Dropped reply from node %s: %s", src, reason)
        good.sort(key=_reply_order)
        return good, reasons

    def valid_train_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> list[Message]:
        """Replies fit for aggregation, in deterministic order; logs the rest."""
        spec = self._sent_spec or {}
        expected = {keys.ARRAYS: spec}
        expected.update({name: spec for name in self.extra_train_records})
        good, reasons = self._filter(replies, expected)
        report = self.current_report
        if report is not None:
            report.train_replies += len(good)
            report.train_dropped += len(reasons)
            report.drop_reasons.extend(reasons)
        return good

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, then aggregate with the wrapped strategy's rule."""
        good = self.valid_train_replies(server_round, replies)
        minimum = max(1, getattr(self, "min_train_nodes", 1))
        if len(good) < minimum:
            log(
                ERROR,
                "Round %s: %d valid train replies, fewer than min_train_nodes=%d; "
                "the global arrays are left unchanged this round.",
                server_round,
                len(good),
                minimum,
            )
            if self.current_report is not None:
                self.current_report.update_skipped = True
            return None, None
        arrays, metrics = self.aggregate_valid(server_round, good)
        return self._keep_dtypes(arrays), metrics

    def _keep_dtypes(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        # Flower's weighted mean turns integer buffers (BatchNorm's
        # num_batches_tracked) into float64; the next round's replies would then
        # no longer match what was sent. Cast back to the sent dtypes.
        if arrays is None or not self.global_arrays:
            return arrays
        sent = self.global_arrays
        # Only the arrays whose dtype changed are deserialized and cast.
        return ArrayRecord(
            {
                k: Array(np.array(cast_like(a.numpy(), sent[k]), order="C"))
                if k in sent and a.dtype != str(sent[k].dtype)
                else a
                for k, a in arrays.items()
            }
        )

    def aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregation rule, over validated replies in deterministic order.

        Defaults to the wrapped Flower strategy's ``aggregate_train``; an
        algorithm with its own rule overrides this (never ``aggregate_train``,
        which owns validation).
        """
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Validate evaluation replies, then average their metrics."""
        good, reasons = self._filter(replies, {})
        if self.current_report is not None:
            self.current_report.evaluate_replies += len(good)
            self.current_report.evaluate_dropped += len(reasons)
            self.current_report.drop_reasons.extend(reasons)
        if not good:
            return None
        return super().aggregate_evaluate(server_round, good)

    # -------------------------------------------------------------- state --
    def export_state(self) -> dict[str, Any]:
        """The strategy's own state (not the global arrays) as plain data."""
        return {name: _export(getattr(self, name)) for name in self.state_attributes}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`export_state` returned."""
        for name in self.state_attributes:
            if name in state:
                setattr(self, name, _import(state[name]))

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
    ) -> Result:
        """Run rounds ``first_round..num_rounds`` (Flower's ``start`` otherwise).

        Parameters
        ----------
        first_round : int
            Round to start at; ``> 1`` when resuming from a checkpoint of round
            ``first_round - 1`` (load the strategy state first).
        on_round_end : callable, optional
            ``on_round_end(strategy, round, arrays, report)`` after every round,
            e.g. to checkpoint and write results.

        """
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        arrays = initial_arrays
        if evaluate_fn and first_round == 1:
            if (res := evaluate_fn(0, initial_arrays)) is not None:
                result.evaluate_metrics_serverapp[0] = res
                if on_round_end is not None:
                    on_round_end(
                        self, 0, arrays, RoundReport(0, central_metrics=_plain(res))
                    )
        for rnd in range(first_round, num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", rnd, num_rounds)
            report = self.current_report = RoundReport(rnd)
            t0 = time.perf_counter()
            messages = list(self.configure_train(rnd, arrays, train_config, grid))
            report.bytes_sent += _payload_bytes(messages)
            replies = self._timed_exchange(grid, messages, timeout, report)
            report.client_time = _longest_client_time(replies)
            report.train_missing = _missing(rnd, "train", messages, replies, timeout)
            report.bytes_received += _payload_bytes(replies)
            new_arrays, train_metrics = self.aggregate_train(rnd, replies)
            if new_arrays is not None:
                arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
                report.train_metrics = _plain(train_metrics)
            messages = list(self.configure_evaluate(rnd, arrays, evaluate_config, grid))
            report.bytes_sent += _payload_bytes(messages)
            replies = self._timed_exchange(grid, messages, timeout, report)
            report.evaluate_missing = _missing(
                rnd, "evaluate", messages, replies, timeout
            )
            if (eval_metrics := self.aggregate_evaluate(rnd, replies)) is not None:
                result.evaluate_metrics_clientapp[rnd] = eval_metrics
                report.evaluate_metrics = _plain(eval_metrics)
            if evaluate_fn and (res := evaluate_fn(rnd, arrays)) is not None:
                result.evaluate_metrics_serverapp[rnd] = res
                report.central_metrics = _plain(res)
            report.wall_time = time.perf_counter() - t0
            result.arrays = arrays
            if on_round_end is not None:
                on_round_end(self, rnd, arrays, report)
        self.current_report = None
        result.arrays = arrays
        return result

    def _timed_exchange(
        self, grid: Grid, messages: list[Message], timeout: float, report: RoundReport
    ) -> list[Message]:
        if not messages:
            return []
        start = time.perf_counter()
        replies = exchange(grid, messages, timeout)
        report.wait_time += time.perf_counter() - start
        self._recipients = {
            m.metadata.message_id: m.metadata.dst_node_id for m in messages
        }
        return replies


def _longest_client_time(replies: Iterable[Message]) -> float | None:
    times = [
        float(r.content[keys.METRICS][keys.CLIENT_TIME])
        for r in replies
        if r.has_content()
        and keys.METRICS in r.content.metric_records
        and keys.CLIENT_TIME in r.content[keys.METRICS]
    ]
    return max(times, default=None)


def _missing(
    server_round: int,
    phase: str,
    sent: list[Message],
    replies: list[Message],
    timeout: float,
) -> int:
    """Log and count the nodes that were sent a message and never answered.

    Replies are matched to messages by id, not by sender: the SuperLink itself
    answers (an error reply) for a node it has found offline.
    """
    answered = {r.metadata.reply_to_message_id for r in replies}
    lost = sorted(
        {m.metadata.dst_node_id for m in sent if m.metadata.message_id not in answered}
    )
    if lost:
        log(
            WARNING,
            "Round %s: no %s reply from node(s) %s within the round timeout "
            "(%.0fs): node lost, stopped or too slow; the round goes on without "
            "them.",
            server_round,
            phase,
            lost,
            timeout,
        )
    return len(lost)


def _reply_order(msg: Message) -> tuple[float, int]:
    metrics = msg.content.metric_records.get(keys.METRICS, {})
    pid = metrics.get(keys.PARTITION_ID, float("inf"))
    return (
        float(pid) if not isinstance(pid, list) else float("inf"),
        msg.metadata.src_node_id,
    )


def _export(value: Any) -> Any:
    if isinstance(value, ArrayRecord):
        return {_ARRAYRECORD_TAG: to_numpy(value)}
    if isinstance(value, dict):
        return {k: _export(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_export(v) for v in value]
    return value


def _import(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ARRAYRECORD_TAG}:
            return to_record(value[_ARRAYRECORD_TAG])
        return {k: _import(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_import(v) for v in value]
    return value
