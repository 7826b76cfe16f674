"""``with_records``: per-node content without touching the shared message."""

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from simulations.inprocess import ensure_task_identity
from strategies.base import with_records


def test_with_records_replaces_and_adds_without_aliasing():
    ensure_task_identity()
    shared = RecordDict({"config": ConfigRecord({"a": 1}), "arrays": ArrayRecord()})
    msg = Message(shared, dst_node_id=5, message_type=MessageType.TRAIN)
    out = with_records(msg, {"config": ConfigRecord({"a": 2}), "x": ArrayRecord()})
    assert out.content["config"]["a"] == 2 and "x" in out.content
    assert msg.content["config"]["a"] == 1 and "x" not in msg.content
    assert out.content["arrays"] is shared["arrays"]  # untouched records shared
    assert out.metadata.dst_node_id == 5
    assert out.metadata.message_type == MessageType.TRAIN
    assert with_records(msg, {}, dst_node_id=9).metadata.dst_node_id == 9
