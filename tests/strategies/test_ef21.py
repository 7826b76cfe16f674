"""EF21's server: golden numbers on hand-made compressed replies, state, a real run."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord

from bouquet.simulations.inprocess import (
    InProcessGrid,
    ensure_task_identity,
    run_inprocess,
)
from bouquet.strategies.aggregation import to_numpy, to_record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.ef21 import EF21, ErrorFeedbackMean
from bouquet.strategies.pieces import Aggregator, ServerSGD, Uniform
from bouquet.strategies.validation import ClientReply
from tests.conftest import answer, make_reply

X0 = {
    "w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
    "b": np.array([0.5], np.float32),
    "n": np.array(7, np.int64),  # an integer buffer: never sent, never changed
}


def test_error_feedback_mean_golden_numbers():
    ctx = RoundContext(1, None, "train", (1, 2, 3, 4), (1, 2), X0, {})
    replies = [
        ClientReply(
            node=i + 1,
            partition=i,
            num_examples=10.0 * (i + 1),  # weights are not used
            metrics={},
            arrays={"w": np.full((2, 2), c), "b": np.array([-c])},
        )
        for i, c in enumerate([4.0, 8.0])
    ]
    chain = Aggregator(Uniform(), ErrorFeedbackMean(eta_g=0.5), ServerSGD())
    arrays, state = chain.update(replies, chain.init(), ctx)
    # g = (c_1 + c_2) / N with N = 4 (the population): w 3, b -3.
    np.testing.assert_allclose(state["combine"]["w"], np.full((2, 2), 3.0))
    np.testing.assert_allclose(state["combine"]["b"], [-3.0])
    np.testing.assert_allclose(arrays["w"], X0["w"] + 1.5)
    np.testing.assert_allclose(arrays["b"], [-1.0])
    assert arrays["w"].dtype == np.float32 and arrays["n"] == 7
    # Round 2: g keeps what it had; one reply of c adds c / N.
    ctx2 = RoundContext(2, None, "train", (1, 2, 3, 4), (3,), arrays, {})
    one = [ClientReply(3, 2, 1.0, {}, {"w": np.full((2, 2), -4.0), "b": np.zeros(1)})]
    arrays2, state = chain.update(one, state, ctx2)
    np.testing.assert_allclose(state["combine"]["w"], np.full((2, 2), 2.0))
    np.testing.assert_allclose(arrays2["w"], arrays["w"] + 1.0)
    np.testing.assert_allclose(arrays2["b"], arrays["b"] - 1.5)


def _configured(strategy, num_nodes=2):
    ensure_task_identity()
    grid = InProcessGrid(lambda msg, ctx: msg, num_nodes=num_nodes, run_config={})
    messages = list(
        strategy.configure_train(1, to_record(X0), ConfigRecord({"lr": 0.1}), grid)
    )
    return messages, sorted(m.metadata.dst_node_id for m in messages)


def _topk_reply(node, indices, values, dtype=np.int32):
    payload = {
        "indices": np.asarray(indices, dtype),
        "values": np.asarray(values, np.float32),
    }
    return make_reply(payload, {"num-examples": 5}, node_id=node, routine="ef21")


def test_round_decodes_topk_replies_and_steps_on_the_mean():
    strategy = EF21(k=2, eta_g=1.0)
    messages, nodes = _configured(strategy)
    sent = messages[0].content["config"]
    assert sent["ef21.compressor"] == "topk" and sent["ef21.k"] == 2
    assert sent["client-routine"] == "ef21"
    # d = 5 (w then b, state-dict order): index 4 is b.
    replies = [
        _topk_reply(nodes[0], [0, 4], [2.0, -1.0]),
        _topk_reply(nodes[1], [3, 4], [4.0, 3.0]),
    ]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
    new = to_numpy(arrays)
    np.testing.assert_allclose(new["w"], X0["w"] + [[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(new["b"], X0["b"] + 1.0)
    assert new["n"] == 7 and new["w"].dtype == np.float32
    g = strategy.state["aggregator"]["combine"]
    np.testing.assert_allclose(g["w"], [[1.0, 0.0], [0.0, 2.0]])


@pytest.mark.parametrize(
    ("indices", "values", "dtype", "reason"),
    [
        ([0, 5], [1.0, 1.0], np.int32, "outside"),
        ([3, 1], [1.0, 1.0], np.int32, "increasing"),
        ([0, 1], [1.0, 1.0], np.int64, "expected int32"),
        ([0, 1, 2], [1.0, 1.0, 1.0], np.int32, "expected int32[2]"),
    ],
)
def test_an_undecodable_payload_is_dropped_with_its_reason(
    indices, values, dtype, reason
):
    strategy = EF21(k=2, min_train_nodes=1)
    _, nodes = _configured(strategy)
    replies = [
        _topk_reply(nodes[0], [0, 1], [2.0, 2.0]),
        _topk_reply(nodes[1], indices, values, dtype),
    ]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
    outcome = strategy.train_round.outcome
    assert outcome.accepted == 1 and len(outcome.dropped) == 1
    assert reason in outcome.dropped[0]
    np.testing.assert_allclose(to_numpy(arrays)["w"], X0["w"] + [[1.0, 1.0], [0, 0]])


def test_a_dense_model_reply_is_refused():
    strategy = EF21(min_train_nodes=1)
    _, nodes = _configured(strategy)
    dense = make_reply({k: v for k, v in X0.items()}, node_id=nodes[0], routine="ef21")
    arrays, _ = strategy.aggregate_train(1, answer(strategy, [dense]))
    assert arrays is None
    assert "keys differ" in strategy.train_round.outcome.dropped[0]


def test_unbiased_compressors_are_decoded_scaled_to_be_contractive():
    strategy = EF21(compressor="randk", k=1)
    _, nodes = _configured(strategy)
    # Rand-1 of d = 5 decodes to 5 x_j; scaled by 1/(omega+1) = 1/5: x_j.
    replies = [_topk_reply(nodes[0], [2], [3.0]), _topk_reply(nodes[1], [2], [1.0])]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
    np.testing.assert_allclose(to_numpy(arrays)["w"], X0["w"] + [[0, 0], [2.0, 0]])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="compressor"):
        EF21(compressor="gzip")
    with pytest.raises(ValueError, match="levels"):
        EF21(levels=200)
    with pytest.raises(ValueError, match="k"):
        EF21(k=0)


# --------------------------------------- in-process: the wire, client state --
def test_two_rounds_compress_the_uplink_and_client_g_sums_to_server_g(tmp_path):
    from bouquet.strategies.state import load_state

    config = {
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "local-steps": 2,
        "momentum": 0.0,
        "model": "mlp",
        "seed": 5,
        "plot": False,
    }
    ef21 = {**config, "algorithm": "ef21", "ef21.k": 100}
    _, path, grid = run_inprocess(
        {**ef21, "output-dir": str(tmp_path / "ef21")}, num_nodes=3
    )
    _, fedavg_path, _ = run_inprocess(
        {**config, "algorithm": "fedavg", "output-dir": str(tmp_path / "fedavg")},
        num_nodes=3,
    )
    rows = json.loads((path / "metrics.json").read_text())["rounds"][1:]
    dense = json.loads((fedavg_path / "metrics.json").read_text())["rounds"][1:]
    assert all(r["train-replies"] == 3 and r["train-dropped"] == 0 for r in rows)
    # Measured from the serialised replies: 3 x 100 x (4 + 4) bytes plus headers.
    for mine, theirs in zip(rows, dense, strict=True):
        assert 2400 <= mine["bytes-received"] <= 2400 + 3 * 2 * 128
        assert theirs["bytes-received"] > 50 * mine["bytes-received"]
        assert mine["bytes-sent"] == theirs["bytes-sent"]  # the downlink is dense

    # Every node was sampled both rounds: g = mean of the clients' g_i.
    server_g = load_state(path / "checkpoint").strategy["aggregator"]["combine"]
    client_g = [c.state["ef21.g"]["g"].numpy() for c in grid.contexts.values()]
    assert len(client_g) == 3
    flat = np.concatenate([server_g[k].reshape(-1) for k in server_g])
    np.testing.assert_allclose(flat, np.mean(client_g, axis=0), rtol=1e-6, atol=1e-9)
    assert np.count_nonzero(flat) <= 3 * 2 * 100
