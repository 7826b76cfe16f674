"""``exchange``: push, then pull promptly until every reply is in or time is up."""

import time
from types import SimpleNamespace

from strategies.base import exchange


class SlowGrid:
    """Replies become pullable ``delays[i]`` seconds after the push."""

    def __init__(self, delays):
        self.delays = delays
        self.pulls = 0

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        self.messages = {str(i): m for i, m in enumerate(messages)}
        return list(self.messages)

    def pull_messages(self, message_ids):
        self.pulls += 1
        elapsed = time.monotonic() - self.pushed_at
        ready = [i for i in message_ids if self.delays[int(i)] <= elapsed]
        return [
            SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
            for i in ready
        ]


def _messages(n):
    return [SimpleNamespace(dst_node_id=i + 1) for i in range(n)]


def test_replies_are_collected_soon_after_they_arrive():
    grid = SlowGrid([0.0, 0.2, 0.3])
    start = time.monotonic()
    replies = exchange(grid, _messages(3), timeout=5.0, poll_interval=0.02)
    took = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1", "2"]
    assert 0.3 <= took < 1.0  # Flower's deployment grid would wait 3 s here
    assert grid.pulls >= 3


def test_timeout_returns_what_arrived():
    grid = SlowGrid([0.0, 10.0])
    start = time.monotonic()
    replies = exchange(grid, _messages(2), timeout=0.2, poll_interval=0.02)
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]
    assert time.monotonic() - start < 1.0


def test_nothing_to_send_pulls_nothing():
    grid = SlowGrid([])
    assert exchange(grid, [], timeout=1.0) == []
    assert grid.pulls == 0
