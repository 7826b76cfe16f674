"""BouquetStrategy.train_records: extra named records on every train message."""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from simulations.inprocess import ensure_task_identity
from strategies.aggregation import to_numpy, to_record
from strategies.baselines import FedAvg


class Grid3:
    def get_node_ids(self):
        return [3, 1, 2]


class WithRecord(FedAvg):
    name = "demo.extra"

    def train_records(self, server_round):
        return {self.name: to_record({"c": np.full(2, float(server_round))})}


def test_every_train_message_carries_the_records():
    ensure_task_identity()
    strategy = WithRecord(seed=0)
    arrays = to_record({"w": np.zeros(2, np.float32)})
    messages = strategy.configure_train(4, arrays, ConfigRecord(), Grid3())
    assert len(messages) == 3
    for msg in messages:
        np.testing.assert_array_equal(to_numpy(msg.content["demo.extra"])["c"], [4, 4])
        assert set(msg.content) == {"arrays", "config", "demo.extra"}
    plain = FedAvg(seed=0).configure_train(1, arrays, ConfigRecord(), Grid3())
    assert set(plain[0].content) == {"arrays", "config"}


def test_records_may_not_replace_the_model_or_config():
    ensure_task_identity()
    strategy = WithRecord(seed=0)
    strategy.name = "arrays"
    with pytest.raises(ValueError, match="arrays"):
        strategy.configure_train(
            1, to_record({"w": np.zeros(2)}), ConfigRecord(), Grid3()
        )
