"""BouquetStrategy.outgoing_train_records: extra named records to clients."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from simulations.inprocess import InProcessGrid
from strategies.aggregation import to_record
from strategies.baselines import FedAvg


def _configure(strategy, server_round=1):
    grid = InProcessGrid(lambda msg, ctx: msg, 4, {})
    arrays = to_record({"w": np.zeros(2, np.float32)})
    return list(
        strategy.configure_train(server_round, arrays, ConfigRecord({"lr": 0.1}), grid)
    )


def test_outgoing_records_reach_every_sampled_node_and_cannot_clobber():
    class WithExtra(FedAvg):
        def outgoing_train_records(self, server_round):
            return {"demo.r": MetricRecord({"round": server_round})}

    messages = _configure(WithExtra(fraction_train=0.5), 3)
    assert len(messages) == 2
    assert all(m.content["demo.r"]["round"] == 3 for m in messages)
    assert all("arrays" in m.content and "config" in m.content for m in messages)
    assert "demo.r" not in _configure(FedAvg(fraction_train=0.5))[0].content

    class Clobber(FedAvg):
        def outgoing_train_records(self, server_round):
            return {"arrays": ArrayRecord()}

    with pytest.raises(ValueError, match="arrays"):
        _configure(Clobber())
