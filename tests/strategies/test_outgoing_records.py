"""BouquetStrategy.outgoing_records: extra named records to clients."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from bouquet.simulations.inprocess import InProcessGrid
from bouquet.strategies.aggregation import to_record
from bouquet.strategies.fedavg import FedAvg


def _configure(strategy, server_round=1):
    grid = InProcessGrid(lambda msg, ctx: msg, 4, {})
    arrays = to_record({"w": np.arange(2, dtype=np.float32)})
    return list(
        strategy.configure_train(server_round, arrays, ConfigRecord({"lr": 0.1}), grid)
    )


def test_outgoing_records_reach_every_sampled_node():
    seen = []

    class WithExtra(FedAvg):
        def outgoing_records(self, ctx):
            seen.append(ctx)
            return {"demo.r": MetricRecord({"round": ctx.server_round})}

    messages = _configure(WithExtra(fraction_train=0.5), 3)
    assert len(messages) == 2
    assert all(m.content["demo.r"]["round"] == 3 for m in messages)
    assert all("arrays" in m.content and "config" in m.content for m in messages)
    assert "demo.r" not in _configure(FedAvg(fraction_train=0.5))[0].content
    # Called once per round, with the round's context: who was sampled, and
    # the arrays being sent.
    (ctx,) = seen
    assert ctx.server_round == 3 and ctx.phase == "train"
    assert ctx.sampled == tuple(m.metadata.dst_node_id for m in messages)
    np.testing.assert_array_equal(ctx.arrays["w"], [0.0, 1.0])


@pytest.mark.parametrize(
    "record", [("arrays", ArrayRecord()), ("config", ConfigRecord({"lr": 9.0}))]
)
def test_outgoing_records_cannot_clobber_arrays_or_config(record):
    name, value = record

    class Clobber(FedAvg):
        def outgoing_records(self, ctx):
            return {name: value}

    with pytest.raises(ValueError, match=name):
        _configure(Clobber())
