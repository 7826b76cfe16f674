"""Aggregation pieces: hand-computed cases, values as state, and Flower parity.

FedAvg, FedAvgM and FedAdam are one chain with three server optimizers; each
is checked against Flower's own strategy on the same replies, round after
round (FedAvg bit for bit: it sums as Flower does).
"""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import strategy as flwr_strategy

from bouquet.strategies.aggregation import to_record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedadam import FedAdam
from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.fedavgm import FedAvgM
from bouquet.strategies.pieces import (
    Aggregator,
    ByExamples,
    CoordinateMedian,
    ServerAdagrad,
    ServerAdam,
    ServerSGD,
    ServerYogi,
    Uniform,
    WeightedMean,
)
from bouquet.strategies.validation import ClientReply

NODES = (11, 12, 13)


class Grid:
    def get_node_ids(self):
        return list(NODES)


def _ctx(x, personal=(), server_round=1):
    return RoundContext(
        server_round, None, "train", NODES, NODES, x, {}, personal=personal
    )


def _reply(node, arrays, n):
    return ClientReply(
        node=node, partition=node, num_examples=n, metrics={}, arrays=arrays
    )


X = {"w": np.array([1.0, -2.0], np.float32), "b": np.array([0.5], np.float32)}
Y = [
    {"w": np.array([3.0, 0.0], np.float32), "b": np.array([1.5], np.float32)},
    {"w": np.array([0.0, -5.0], np.float32), "b": np.array([0.5], np.float32)},
]


def test_weighted_mean_by_examples_golden():
    replies = [_reply(11, Y[0], 30), _reply(12, Y[1], 10)]
    chain = Aggregator(ByExamples(), WeightedMean(), ServerSGD())
    new, _ = chain.update(replies, chain.init(), _ctx(X))
    # 0.75 * y0 + 0.25 * y1
    np.testing.assert_allclose(new["w"], [2.25, -1.25])
    np.testing.assert_allclose(new["b"], [1.25])
    assert new["w"].dtype == np.float32


def test_updates_and_step_size_and_personal_entries():
    deltas = [{"w": np.array([1.0, 1.0])}, {"w": np.array([3.0, -1.0])}]
    replies = [_reply(11, deltas[0], 1), _reply(12, deltas[1], 1)]
    x = {"w": np.array([0.0, 0.0]), "head": np.array([7.0])}
    chain = Aggregator(Uniform(), WeightedMean(of="updates"), ServerSGD(lr=0.5))
    new, _ = chain.update(replies, chain.init(), _ctx(x, personal=("head",)))
    np.testing.assert_allclose(new["w"], [1.0, 0.0])  # 0.5 * mean(deltas)
    assert new["head"] is x["head"]  # personal entries are never aggregated


def test_median_ignores_weights():
    replies = [
        _reply(n, {"w": np.array([v])}, w)
        for n, v, w in ((1, 1.0, 99), (2, 5.0, 1), (3, 2.0, 1))
    ]
    chain = Aggregator(ByExamples(), CoordinateMedian(), ServerSGD())
    new, _ = chain.update(replies, chain.init(), _ctx({"w": np.array([0.0])}))
    np.testing.assert_allclose(new["w"], [2.0])


def test_state_is_a_value():
    chain = Aggregator(ByExamples(), WeightedMean(), ServerAdam(0.1, 0.9, 0.99, 1e-3))
    state = chain.init()
    replies = [_reply(11, Y[0], 1), _reply(12, Y[1], 1)]
    _, first = chain.update(replies, state, _ctx(X))
    assert state == {
        "weighting": None,
        "combine": None,
        "optimizer": {"m": {}, "v": {}},
    }
    _, second = chain.update(replies, state, _ctx(X))
    np.testing.assert_array_equal(
        first["optimizer"]["m"]["w"], second["optimizer"]["m"]["w"]
    )


def _rounds(ours, theirs, rounds=3, seed=0):
    """Drive ours and Flower's strategy on the same replies; yield both results."""
    from bouquet.simulations.inprocess import ensure_task_identity
    from tests.conftest import answer, make_reply

    ensure_task_identity()
    rng = np.random.default_rng(seed)
    x = {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "n": np.array(2, np.int64),
    }
    mine = theirs_arrays = to_record(x)
    for rnd in range(1, rounds + 1):
        config = ConfigRecord({"num-server-rounds": rounds})
        list(ours.configure_train(rnd, mine, ConfigRecord(dict(config)), Grid()))
        if hasattr(theirs, "current_arrays"):
            theirs.configure_train(rnd, theirs_arrays, ConfigRecord(), _FlowerGrid())
        replies = []
        for node in NODES:
            local = {
                "w": (x["w"] + rng.standard_normal((3, 4))).astype(np.float32),
                "n": np.array(rnd + 2, np.int64),
            }
            metrics = {"num-examples": int(rng.integers(5, 50))}
            replies.append(make_reply(local, metrics, node_id=node))
        mine, _ = ours.aggregate_train(rnd, answer(ours, replies))
        flower, _ = theirs.aggregate_train(rnd, replies)
        # Flower's FedAdam returns float64 arrays (and int entries as float):
        # keep the dtypes sent, as a Flower app that casts them back would.
        theirs_arrays = to_record(
            {k: v.numpy().astype(x[k].dtype) for k, v in flower.items()}
        )
        yield rnd, mine, theirs_arrays


class _FlowerGrid(Grid):
    pass


def test_fedavg_is_flowers_fedavg_bit_for_bit():
    for _, mine, theirs in _rounds(FedAvg(min_train_nodes=1), flwr_strategy.FedAvg()):
        np.testing.assert_array_equal(mine["w"].numpy(), theirs["w"].numpy())
        assert mine["n"].numpy().dtype == np.int64  # dtypes kept, unlike Flower's


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            FedAvgM(server_learning_rate=0.7, server_momentum=0.9, min_train_nodes=1),
            flwr_strategy.FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
        ),
        (
            FedAdam(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3, min_train_nodes=1),
            flwr_strategy.FedAdam(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3),
        ),
    ],
    ids=["fedavgm", "fedadam"],
)
def test_server_optimizers_match_flower_bit_for_bit(ours, theirs):
    for _, mine, flower in _rounds(ours, theirs):
        np.testing.assert_array_equal(mine["w"].numpy(), flower["w"].numpy())


@pytest.mark.parametrize(
    ("piece", "flower"),
    [
        (
            ServerYogi(0.05, 0.9, 0.99, 1e-3, precision="wire"),
            flwr_strategy.FedYogi(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3),
        ),
        (  # Flower's FedAdagrad has no first moment: beta_1 = 0
            ServerAdagrad(0.05, 0.0, 0.0, 1e-3, precision="wire"),
            flwr_strategy.FedAdagrad(eta=0.05, tau=1e-3),
        ),
    ],
    ids=["yogi", "adagrad"],
)
def test_yogi_and_adagrad_pieces_match_flower(piece, flower):
    class Composed(FedAvg):
        name = "composed"

        def make_aggregator(self):
            return Aggregator(ByExamples(), WeightedMean(accumulate="wire"), piece)

    for _, mine, flower_arrays in _rounds(Composed(min_train_nodes=1), flower):
        np.testing.assert_array_equal(mine["w"].numpy(), flower_arrays["w"].numpy())


def test_float64_precision_differs_from_flowers_by_rounding_only():
    x = {"w": np.array([1.0, -2.0], np.float32)}
    delta = {"w": np.array([0.1, 0.3])}
    for piece in (ServerAdam(0.05), ServerSGD(0.7, 0.9)):
        exact, _ = piece.update(delta, piece.init(), _ctx(x))
        wire = type(piece)(**{**piece.__dict__, "precision": "wire"})
        flower, _ = wire.update(delta, wire.init(), _ctx(x))
        np.testing.assert_allclose(exact["w"], flower["w"], rtol=1e-6)
    with pytest.raises(ValueError, match="precision"):
        ServerSGD(precision="half").update(delta, None, _ctx(x))


def test_flower_accumulation_differs_from_float64_by_rounding_only():
    replies = [_reply(11, Y[0], 3), _reply(12, Y[1], 7)]
    ctx = _ctx(X)
    w = np.array([0.3, 0.7])
    wire, _ = WeightedMean(accumulate="wire").update(replies, w, None, ctx)
    exact, _ = WeightedMean().update(replies, w, None, ctx)
    for key in exact:
        np.testing.assert_allclose(wire[key], exact[key], atol=1e-6)


def test_array_record_roundtrip_of_pieces_output():
    chain = Aggregator(ByExamples(), WeightedMean(), ServerSGD())
    new, _ = chain.update([_reply(1, Y[0], 1)], chain.init(), _ctx(X))
    record = to_record(new)
    assert isinstance(record, ArrayRecord) and list(record) == ["w", "b"]
