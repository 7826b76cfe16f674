"""The compressed uplink on extra model-shaped records: SCAFFOLD's ``dc``.

Hand-made arrays: the server decodes ``C(dc)`` into its control variate ``c``,
a client compresses ``dc`` with its own error feedback (the 2-round run with
SCAFFOLD is in ``test_uplink_algorithms.py``).
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.uplink import ERROR_STATE, compress_records, error_state
from bouquet.simulations.inprocess import InProcessGrid, ensure_task_identity
from bouquet.strategies.aggregation import to_record
from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.momentum import SCAFFOLD
from bouquet.strategies.uplink import compress_uplink
from bouquet.tasks import wire
from tests.conftest import answer, make_reply

X = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}
DC = "momentum.dc"


def _topk(index, value):
    return {"indices": np.int32([index]), "values": np.float32([value])}


def _record(payload):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in payload.items()})


def _reply(node, update, dc):
    return make_reply(
        _topk(*update),
        {"num-examples": 10, "partition-id": node, "momentum.eta-k": 0.5},
        node_id=1000 + node,
        extra={DC: _record(_topk(*dc))} if dc is not None else {},
        routine="momentum",
    )


def _configure(strategy):
    ensure_task_identity()
    grid = InProcessGrid(lambda msg, ctx: msg, 4, {})
    config = ConfigRecord({"lr": 0.1})
    return list(strategy.configure_train(1, to_record(X), config, grid))


def test_scaffold_decodes_compressed_dc_into_its_control_variate():
    strategy = compress_uplink(SCAFFOLD(fraction_train=0.5, eta_g=2.0), "topk", k=1)
    sent = _configure(strategy)
    assert sent[0].content["config"][wire.UPLINK_RECORDS] == DC
    # y1 - x = (0, .5), y2 - x = (.5, 0): x + 2 * mean = (1.5, 2.5), n kept.
    # dc1 = (0, -.4), dc2 = (.6, 0): mean (.3, -.2), times S/N = 2/4.
    replies = [_reply(0, (1, 0.5), (1, -0.4)), _reply(1, (0, 0.5), (0, 0.6))]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
    np.testing.assert_allclose(arrays["w"].numpy(), [1.5, 2.5])
    assert arrays["n"].numpy() == 3
    np.testing.assert_allclose(strategy.state["c"]["w"], [0.15, -0.1])
    assert strategy.state["c"]["n"] == 0  # an integer entry is not sent: no change


@pytest.mark.parametrize(
    ("dc", "reason"),
    [((2, 1.0), "compressed 'momentum.dc'"), (None, "array records")],
    ids=["index-outside", "missing"],
)
def test_a_reply_with_a_bad_compressed_dc_is_dropped(dc, reason):
    strategy = compress_uplink(SCAFFOLD(fraction_train=0.5, min_train_nodes=1), "topk")
    _configure(strategy)
    replies = [_reply(0, (1, 0.5), (1, -0.4)), _reply(1, (0, 0.5), dc)]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 2.5])  # node 0 alone
    np.testing.assert_allclose(strategy.state["c"]["w"], [0.0, -0.1])
    (dropped,) = strategy.train_round.outcome.dropped
    assert reason in dropped


def test_a_dense_dc_is_refused_once_the_uplink_compresses_it():
    strategy = compress_uplink(SCAFFOLD(fraction_train=0.5), "topk", k=1)
    _configure(strategy)
    dense = {"w": Array(np.float32([0.1, 0.2])), "n": Array(np.array(0, np.int64))}
    reply = make_reply(
        _topk(0, 1.0),
        {"num-examples": 10, "partition-id": 0, "momentum.eta-k": 0.5},
        node_id=1000,
        extra={DC: ArrayRecord(dense)},
        routine="momentum",
    )
    assert strategy.aggregate_train(1, answer(strategy, [reply])) == (None, None)


def test_strategies_without_model_shaped_records_send_no_record_list():
    sent = _configure(compress_uplink(FedAvg(), "topk", k=1))
    assert wire.UPLINK_RECORDS not in sent[0].content["config"]
    dense = _configure(SCAFFOLD())
    assert wire.UPLINK_RECORDS not in dense[0].content["config"]


def test_client_compresses_dc_with_its_own_error_feedback():
    config = {
        wire.UPLINK_COMPRESSOR: "topk",
        wire.UPLINK_K: 1,
        wire.UPLINK_ERROR_FEEDBACK: True,
        wire.UPLINK_RECORDS: DC,
    }
    state: dict = {}

    def send(dc):
        records = {
            DC: ArrayRecord(
                {"w": Array(np.float32(dc)), "n": Array(np.array(0, np.int64))}
            )
        }
        compress_records(records, config, state, seed=0)
        return {k: a.numpy() for k, a in records[DC].items()}

    first = send([0.2, -0.4, 0.1])
    assert list(first) == ["indices", "values"]  # the integer entry is not sent
    np.testing.assert_array_equal(first["indices"], [1])
    np.testing.assert_allclose(first["values"], [-0.4])
    key = ".".join(error_state(DC))
    assert key == "bouquet.uplink-error.momentum.dc"
    np.testing.assert_allclose(state[key]["e"].numpy(), [0.2, 0.0, 0.1], atol=1e-7)
    assert ".".join(ERROR_STATE) not in state  # the arrays' error is separate
    # Next round: dc (.1, 0, 0) + e (.2, 0, .1): coordinate 0 carries .3.
    second = send([0.1, 0.0, 0.0])
    np.testing.assert_array_equal(second["indices"], [0])
    np.testing.assert_allclose(second["values"], [0.3], rtol=1e-6)
    np.testing.assert_allclose(state[key]["e"].numpy(), [0.0, 0.0, 0.1], atol=1e-7)


def test_a_client_refuses_to_compress_a_record_it_does_not_send():
    config = {wire.UPLINK_COMPRESSOR: "topk", wire.UPLINK_RECORDS: "momentum.g"}
    with pytest.raises(ConfigError, match=wire.UPLINK_RECORDS):
        compress_records({}, config, {}, seed=0)
