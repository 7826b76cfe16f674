"""Waiting for nodes: a node lost for good never stops a run for ever.

Flower's sampler waits without limit for ``min_available_nodes``; Bouquet's
rounds wait up to ``node_wait_timeout`` and then go on with the connected nodes
(if the phase's minimum is met) or fail with an error that names the numbers.
"""

import logging
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord

from bouquet.serverapps.run import wait_for_nodes
from bouquet.simulations.inprocess import ensure_task_identity
from bouquet.strategies.aggregation import to_record
from bouquet.strategies.fedavg import FedAvg


class ScriptedGrid:
    """A grid whose node list follows a script: ``lists[i]`` on the i-th query
    (the last one from then on)."""

    def __init__(self, *lists: list[int]) -> None:
        self.lists = lists
        self.queries = 0

    def get_node_ids(self) -> list[int]:
        nodes = self.lists[min(self.queries, len(self.lists) - 1)]
        self.queries += 1
        return list(nodes)


ARRAYS = to_record({"w": np.zeros(3, np.float32)})


def _targets(strategy, grid, rnd=2):
    ensure_task_identity()
    messages = strategy.configure_train(rnd, ARRAYS, ConfigRecord(), grid)
    return sorted(m.metadata.dst_node_id for m in messages)


def test_lost_node_round_goes_on_with_the_rest_after_the_wait(caplog):
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=2, node_wait_timeout=0.3)
    grid = ScriptedGrid([7, 8])  # node 9 died in round 1 and never returns
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert _targets(strategy, grid) == [7, 8]
    assert time.monotonic() - start >= 0.3
    assert "fewer than min_available_nodes=3" in caplog.text
    assert strategy.min_available_nodes == 3  # lowered for that call only


def test_node_that_comes_back_within_the_wait_is_sampled():
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=2, node_wait_timeout=30)
    grid = ScriptedGrid([7, 8], [7, 8], [7, 8, 9])
    assert _targets(strategy, grid) == [7, 8, 9]


def test_zero_timeout_waits_for_ever():
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=3, node_wait_timeout=0)
    grid = ScriptedGrid([7], [7], [7, 8], [7, 8], [7, 8, 9])
    assert _targets(strategy, grid) == [7, 8, 9]
    assert grid.queries >= 5


def test_too_few_nodes_for_the_phase_fails_with_the_numbers():
    strategy = FedAvg(min_available_nodes=3, min_train_nodes=2, node_wait_timeout=0.2)
    with pytest.raises(RuntimeError, match=r"1 node\(s\) connected.*needs 2"):
        _targets(strategy, ScriptedGrid([7]))
    assert strategy.min_available_nodes == 3


def test_fraction_is_taken_of_the_connected_nodes():
    strategy = FedAvg(
        fraction_train=0.5,
        min_available_nodes=4,
        min_train_nodes=1,
        node_wait_timeout=0.1,
    )
    # 2 of 4 connected: half of them, 1 node, sampled (seeded, reproducible).
    first = _targets(strategy, ScriptedGrid([7, 8]))
    assert len(first) == 1
    assert _targets(strategy, ScriptedGrid([7, 8])) == first


def test_enough_nodes_sample_as_flower_would_without_waiting():
    strategy = FedAvg(min_available_nodes=2, min_train_nodes=2, node_wait_timeout=60)
    grid = ScriptedGrid([9, 3, 5])
    start = time.monotonic()
    assert _targets(strategy, grid) == [3, 5, 9]
    assert time.monotonic() - start < 1.0


def test_evaluation_waits_by_its_own_minimum():
    strategy = FedAvg(
        min_available_nodes=3,
        min_evaluate_nodes=1,
        min_train_nodes=3,
        node_wait_timeout=0.1,
    )
    ensure_task_identity()
    messages = strategy.configure_evaluate(2, ARRAYS, ConfigRecord(), ScriptedGrid([4]))
    assert [m.metadata.dst_node_id for m in messages] == [4]
    # No evaluation at all: nothing to wait for.
    strategy.fraction_evaluate = 0.0
    assert (
        list(strategy.configure_evaluate(2, ARRAYS, ConfigRecord(), ScriptedGrid([])))
        == []
    )


def test_server_start_fails_clearly_when_too_few_nodes_come():
    with pytest.raises(
        RuntimeError, match=r"2 node\(s\) connected.*min-available-nodes is 5"
    ):
        wait_for_nodes(ScriptedGrid([1, 2]), 5, settle=0.05, timeout=0.3)
    assert wait_for_nodes(ScriptedGrid([1], [1, 2]), 2, settle=0.05, timeout=5) == 2


def test_superlink_error_reply_for_an_offline_node_is_not_also_missing(caplog):
    """The SuperLink answers for an offline node with an error reply of its own
    (sender: the SuperLink's id). That node is an error reply, not a missing one,
    and the log names the node, not the SuperLink."""
    from flwr.app import Error, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    from bouquet.strategies.context import RoundContext
    from bouquet.strategies.driver import Exchange

    ensure_task_identity()
    sent = []
    for node in (7, 8, 9):
        msg = Message(RecordDict(), dst_node_id=node, message_type="train")
        msg.metadata.__dict__["_message_id"] = f"m{node}"
        sent.append(msg)
    offline = Message(Error(code=0, reason="node unavailable"), reply_to=sent[2])
    offline.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
    assert offline.metadata.src_node_id == SUPERLINK_NODE_ID

    class OfflineGrid:
        """Accepts every message; only the SuperLink's error reply ever comes."""

        def __init__(self):
            self.replies = {"m9": offline}

        def push_messages(self, messages):
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, message_ids):
            return [self.replies.pop(i) for i in message_ids if i in self.replies]

    # Node 8 never answered; 9 answered through the SuperLink; 7 is still out.
    exchange = Exchange(OfflineGrid(), poll_interval=0.01)
    with caplog.at_level(logging.WARNING):
        replies = exchange.round_trip(sent, timeout=0.2)
    assert replies == [offline]
    assert exchange.report.train_missing == 2
    assert exchange.report.evaluate_missing == 0
    assert exchange.report.error_replies == 1
    assert "node(s) [7, 8]" in caplog.text

    strategy = FedAvg()
    ctx = RoundContext(
        server_round=1,
        num_rounds=None,
        phase="train",
        nodes=(7, 8, 9),
        sampled=(7, 8, 9),
        arrays={"w": np.zeros(3, np.float32)},
        config={},
        messages=sent,
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        good = strategy.accept([offline], ctx)
    assert good == [] and ctx.outcome.errors == 1
    assert len(ctx.outcome.dropped) == 1
    assert ctx.outcome.dropped[0].startswith("node 9:")
    assert "Dropped reply from node 9:" in caplog.text
