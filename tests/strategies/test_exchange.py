"""``Exchange.round_trip``: push, then pull promptly until every reply is in or
time is up; replies that never came are counted missing in ``exchange.report``."""

import time

from flwr.app import Message, MessageType, RecordDict

from bouquet.simulations.inprocess import ensure_task_identity
from bouquet.strategies.driver import Exchange, client_times


class SlowGrid:
    """Replies become pullable ``delays[i]`` seconds after the push."""

    def __init__(self, delays):
        self.delays = delays
        self.pulls = 0

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        self.messages = {m.metadata.message_id: m for m in messages}
        return list(self.messages)

    def pull_messages(self, message_ids):
        self.pulls += 1
        elapsed = time.monotonic() - self.pushed_at
        ready = [i for i in message_ids if self.delays[int(i)] <= elapsed]
        return [Message(RecordDict(), reply_to=self.messages[i]) for i in ready]


def _messages(n, message_type=MessageType.TRAIN):
    ensure_task_identity()
    messages = []
    for i in range(n):
        msg = Message(RecordDict(), dst_node_id=i + 1, message_type=message_type)
        msg.metadata.__dict__["_message_id"] = str(i)
        messages.append(msg)
    return messages


def test_replies_are_collected_soon_after_they_arrive():
    grid = SlowGrid([0.0, 0.2, 0.3])
    exchange = Exchange(grid, poll_interval=0.02)
    start = time.monotonic()
    replies = exchange.round_trip(_messages(3), timeout=5.0)
    took = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1", "2"]
    assert 0.3 <= took < 1.0  # Flower's deployment grid would wait 3 s here
    assert grid.pulls >= 3
    assert exchange.report.train_missing == 0
    assert exchange.report.evaluate_missing == 0
    assert exchange.in_flight == {}


def test_timeout_returns_what_arrived():
    grid = SlowGrid([0.0, 10.0])
    exchange = Exchange(grid, poll_interval=0.02)
    start = time.monotonic()
    replies = exchange.round_trip(_messages(2), timeout=0.2)
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]
    assert time.monotonic() - start < 1.0
    # The reply that never came is counted missing, once, for its phase.
    assert exchange.report.train_missing == 1
    assert exchange.report.evaluate_missing == 0
    assert exchange.in_flight == {}


def test_missing_evaluation_replies_are_counted_as_evaluation():
    grid = SlowGrid([10.0, 10.0])
    exchange = Exchange(grid, poll_interval=0.02)
    assert exchange.round_trip(_messages(2, MessageType.EVALUATE), 0.1) == []
    assert exchange.report.evaluate_missing == 2
    assert exchange.report.train_missing == 0


def test_nothing_to_send_pulls_nothing():
    grid = SlowGrid([])
    exchange = Exchange(grid)
    assert exchange.round_trip([], timeout=1.0) == []
    assert grid.pulls == 0
    assert exchange.report.train_missing == 0


def test_client_time_is_read_only_when_valid(reply):
    times = [[1.0, 2.0], float("nan"), -1.0, 1e30, 3.0, 2.5]
    replies = [reply({}, {"num-examples": 1, "client-time": t}) for t in times]
    assert client_times(replies) == [3.0, 2.5]
    assert client_times(replies[:4]) == []
