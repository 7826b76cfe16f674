"""The one-pass poll of Flower's simulation engine (tasks/flower_engine.py).

It mirrors three Flower functions. When Flower changes any of them,
``test_flower_sources_are_the_measured_ones`` fails: re-read the new sources,
re-measure (``simulations/bench_small_clients.py``) and update the hashes.
"""

from __future__ import annotations

import importlib
import threading
from queue import Queue

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from bouquet.tasks import flower_engine


def test_flower_sources_are_the_measured_ones() -> None:
    assert flower_engine.flower_mismatches() == [], (
        "Flower changed the engine code that bouquet.tasks.flower_engine mirrors; "
        "re-read it, re-measure and update FLOWER_SOURCES"
    )


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's grid reads a process-wide task identity; keep it per test."""
    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))


def _federation(num_nodes: int, per_node: list[int]):
    """A simulation link state with ``per_node[i]`` messages pushed to node i,
    set up as ``flwr.simulation.run_simulation`` sets up its own."""
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    nodes = _register_nodes(num_nodes, factory)
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(
        task_id=run.primary_task_id, run_id=run.run_id
    )
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    messages = []
    for node_id, count in zip(nodes, per_node, strict=True):
        for k in range(count):
            content = RecordDict({"config": ConfigRecord({"k": k})})
            messages.append(Message(content, dst_node_id=node_id, message_type="train"))
    # Interleave the nodes so "oldest per node" is not the store's prefix.
    messages.sort(key=lambda m: m.content["config"]["k"])
    grid.push_messages(messages)
    return state, nodes


def test_one_pass_gives_what_flowers_per_node_loop_gives() -> None:
    per_node = [3, 0, 1, 2, 5, 1]
    flower_state, flower_nodes = _federation(6, per_node)
    ours_state, ours_nodes = _federation(6, per_node)
    for _ in range(max(per_node) + 1):
        flowers = [
            m
            for node_id in flower_nodes
            for m in flower_state.get_message_ins(node_id=node_id, limit=1)
        ]
        ours = flower_engine.pending_messages(ours_state, set(ours_nodes))
        # Node ids are random per state; compare by partition (the node's index).
        assert sorted(
            (flower_nodes[m.metadata.dst_node_id], m.content["config"]["k"])
            for m in flowers
        ) == sorted(
            (ours_nodes[m.metadata.dst_node_id], m.content["config"]["k"]) for m in ours
        )
        assert all(m.metadata.delivered_at != "" for m in ours)
    assert flower_engine.pending_messages(ours_state, set(ours_nodes)) == []


def test_only_the_engines_nodes_are_polled() -> None:
    state, nodes = _federation(3, [1, 1, 1])
    first = next(iter(nodes))
    got = flower_engine.pending_messages(state, {first})
    assert [m.metadata.dst_node_id for m in got] == [first]


def test_the_replacement_thread_feeds_the_queue_and_stops() -> None:
    state, nodes = _federation(4, [2, 1, 0, 1])
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    thread = threading.Thread(
        target=flower_engine.add_messages_to_queue, args=(state, queue, nodes, stop)
    )
    thread.start()
    got = [queue.get(timeout=5) for _ in range(4)]
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert len({m.metadata.message_id for m in got}) == 4
    assert queue.empty()


def test_install_replaces_the_engines_loop_only_where_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = importlib.import_module(flower_engine.ENGINE_MODULE)
    flower_engine.uninstall()  # (an earlier import in this process may have installed it)
    original = engine.add_messages_to_queue
    assert original is not flower_engine.add_messages_to_queue
    try:
        monkeypatch.setenv(flower_engine.ENV_SWITCH, "flower")
        assert not flower_engine.install()
        assert engine.add_messages_to_queue is original
        monkeypatch.delenv(flower_engine.ENV_SWITCH)
        assert flower_engine.install()
        assert engine.add_messages_to_queue is flower_engine.add_messages_to_queue
        assert flower_engine.flower_mismatches() == []
        assert flower_engine.install()  # idempotent
    finally:
        flower_engine.uninstall()
    assert engine.add_messages_to_queue is original


def test_a_changed_flower_keeps_flowers_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = importlib.import_module(flower_engine.ENGINE_MODULE)
    flower_engine.uninstall()
    original = engine.add_messages_to_queue
    monkeypatch.setitem(flower_engine.FLOWER_SOURCES, "add_messages_to_queue", "0" * 16)
    monkeypatch.setattr(flower_engine, "_installed", {})
    assert not flower_engine.install()
    assert engine.add_messages_to_queue is original
