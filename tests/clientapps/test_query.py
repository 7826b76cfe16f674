"""The ClientApp's query handler: a node describes its data."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from bouquet.clientapps.routine import describe_client
from bouquet.simulations.inprocess import ensure_task_identity


def _query(kind):
    ensure_task_identity()
    msg = Message(
        RecordDict({"config": ConfigRecord({"query": kind})}),
        dst_node_id=1,
        message_type=MessageType.QUERY,
    )
    msg.metadata.__dict__["_message_id"] = "q"
    return msg


def _context():
    return Context(1, 1, {"partition-id": 4}, RecordDict(), {})


def test_data_profile_has_partition_size_and_histogram():
    labels = torch.tensor([0, 2, 2, 3, 2])
    reply = describe_client(_query("data-profile"), _context(), labels, 5)
    metrics = reply.content["metrics"]
    assert metrics["partition-id"] == 4
    assert metrics["num-examples"] == 5
    assert metrics["label-counts"] == [1, 0, 3, 1, 0]


def test_unknown_query_is_refused():
    with pytest.raises(ValueError, match="data-profile"):
        describe_client(_query("weights"), _context(), torch.tensor([0]), 2)
