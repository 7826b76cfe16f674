"""``recipients``: per-node content without touching the shared message."""

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MessageType

from bouquet.simulations.inprocess import ensure_task_identity
from bouquet.strategies.aggregation import to_record
from bouquet.strategies.base import BouquetStrategy


class Nodes:
    def __init__(self, *nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


class Roles(BouquetStrategy):
    """Node 9 gets another config, node 5 an extra record, node 7 nothing own."""

    def recipients(self, ctx):
        return {
            9: {"config": ConfigRecord({**ctx.config, "a": 2})},
            5: {"x": ArrayRecord()},
            7: {},
        }


def test_recipients_replace_and_add_records_without_aliasing():
    ensure_task_identity()
    arrays = to_record({"w": np.zeros(2, np.float32)})
    strategy = Roles(min_available_nodes=1, node_wait_timeout=0.1)
    messages = list(
        strategy.configure_train(3, arrays, ConfigRecord({"a": 1}), Nodes(5, 7, 9))
    )
    # One message per recipient, in the order the hook named them.
    assert [m.metadata.dst_node_id for m in messages] == [9, 5, 7]
    assert strategy.train_round.sampled == (9, 5, 7)
    assert strategy.train_round.messages == messages
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    assert all(m.metadata.group_id == "3" for m in messages)
    by_node = {m.metadata.dst_node_id: m.content for m in messages}

    # Replaced: node 9's config only.
    assert by_node[9]["config"]["a"] == 2 and "x" not in by_node[9]
    # Added: node 5's extra record only; the shared config is left alone.
    assert "x" in by_node[5] and by_node[5]["config"]["a"] == 1
    # Node 7 gets the shared content, which neither change touched.
    assert by_node[7]["config"]["a"] == 1 and "x" not in by_node[7]
    assert strategy.train_round.config["a"] == 1
    # Records nobody replaced are shared, not copied.
    assert all(content["arrays"] is arrays for content in by_node.values())
    assert by_node[5]["config"] is by_node[7]["config"]
    assert set(by_node[7]) == {"arrays", "config"}
    np.testing.assert_array_equal(arrays["w"].numpy(), np.zeros(2, np.float32))
