"""Server rules of SCAFFOLD / FedAvg-M / SCAFFOLD-M / -VR on hand-made arrays."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from bouquet.simulations.inprocess import InProcessGrid
from bouquet.strategies.aggregation import to_record
from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.momentum import (
    SCAFFOLD,
    FedAvgMomentum,
    SCAFFOLDMomentum,
    SCAFFOLDMomentumVR,
)
from tests.conftest import answer, make_reply

X = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}


def _grid(num_nodes=4):
    return InProcessGrid(lambda msg, ctx: msg, num_nodes, {})


def _configure(strategy, server_round=1, num_nodes=4, arrays=X):
    return list(
        strategy.configure_train(
            server_round, to_record(arrays), ConfigRecord({"lr": 0.1}), _grid(num_nodes)
        )
    )


def _reply(y, node, eta_k, dc=None, num_examples=10):
    extra = {}
    if dc is not None:
        extra["momentum.dc"] = ArrayRecord(
            {"w": Array(np.asarray(dc, np.float32)), "n": Array(np.array(0, np.int64))}
        )
    return make_reply(
        {"w": np.asarray(y, np.float32), "n": np.array(5, np.int64)},
        {"num-examples": num_examples, "partition-id": node, "momentum.eta-k": eta_k},
        node_id=1000 + node,
        extra=extra,
        routine="momentum",
    )


# dy1 = (-.5, .5), dy2 = (.5, -1); mean dy = (0, -.25).
# eta K: .5 and 1 -> directions -dy/etaK = (1, -1), (-.5, 1); g = (.25, 0).
# dc1 = (.2, -.4), dc2 = (.6, 0); mean (.4, -.2); S/N = 2/4 -> c = (.2, -.1).
REPLIES = (
    ((0.5, 2.5), 0, 0.5, (0.2, -0.4)),
    ((1.5, 1.0), 1, 1.0, (0.6, 0.0)),
)


def test_scaffold_golden_numbers_and_records():
    strategy = SCAFFOLD(fraction_train=0.5, eta_g=2.0)
    first = _configure(strategy)
    assert len(first) == 2
    np.testing.assert_array_equal(first[0].content["momentum.c"]["w"].numpy(), [0, 0])
    assert "momentum.g" not in first[0].content  # SCAFFOLD has no momentum
    config = first[0].content["config"]
    assert config["momentum.scaffold"] and not config["momentum.vr"]
    assert config["momentum.beta"] == 1.0
    arrays, _ = strategy.aggregate_train(
        1, answer(strategy, [_reply(*r) for r in REPLIES])
    )
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.5])  # x + 2 * mean dy
    assert arrays["n"].numpy() == 7  # 3 + 2 * (5 - 3), integer kept
    np.testing.assert_allclose(strategy.state["c"]["w"], [0.2, -0.1])
    assert strategy.state["g"] == {}
    sent = _configure(strategy, 2)[0].content["momentum.c"]["w"].numpy()
    np.testing.assert_allclose(sent, [0.2, -0.1], rtol=1e-6)
    assert sent.dtype == np.float32


def test_scaffold_drops_reply_without_dc():
    strategy = SCAFFOLD(fraction_train=0.5, min_train_nodes=1)
    _configure(strategy)
    good, bad = _reply(*REPLIES[0]), _reply(*REPLIES[1][:3])
    arrays, _ = strategy.aggregate_train(1, answer(strategy, [good, bad]))
    np.testing.assert_allclose(arrays["w"].numpy(), [0.5, 2.5])
    np.testing.assert_allclose(strategy.state["c"]["w"], np.array([0.2, -0.4]) / 4)


def test_fedavg_m_tracks_g_in_gradient_units_and_sends_it():
    strategy = FedAvgMomentum(fraction_train=0.5, beta=0.3)
    assert "momentum.g" not in _configure(strategy)[0].content  # no g^0
    arrays, _ = strategy.aggregate_train(
        1, answer(strategy, [_reply(*r[:3]) for r in REPLIES])
    )
    np.testing.assert_allclose(arrays["w"].numpy(), [1.0, 1.75])
    np.testing.assert_allclose(strategy.state["g"]["w"], [0.25, 0.0])
    assert strategy.state["c"] == {} and strategy.reply_records == ()
    messages = _configure(strategy, 2, arrays={k: v.numpy() for k, v in arrays.items()})
    np.testing.assert_allclose(
        messages[0].content["momentum.g"]["w"].numpy(), [0.25, 0]
    )
    assert messages[0].content["config"]["momentum.beta"] == pytest.approx(0.3)
    assert "momentum.c" not in messages[0].content


@pytest.mark.parametrize(
    "strategy",
    [SCAFFOLD(), FedAvgMomentum(beta=1.0), SCAFFOLDMomentum(beta=1.0)],
    ids=["scaffold", "fedavg-m-beta1", "scaffold-m-beta1"],
)
def test_server_step_equals_fedavg_at_eta_g_one(strategy):
    # Equal num-examples: FedAvg's weighted mean is the papers' uniform mean.
    fedavg = FedAvg()
    for s in (strategy, fedavg):
        _configure(s)
    n = 4 if strategy.control_variates else 3  # dc only where SCAFFOLD expects it
    ours, _ = strategy.aggregate_train(
        1, answer(strategy, [_reply(*r[:n]) for r in REPLIES])
    )
    theirs, _ = fedavg.aggregate_train(
        1, answer(fedavg, [_reply(*r[:3]) for r in REPLIES])
    )
    assert ours is not None
    for key in X:
        np.testing.assert_allclose(ours[key].numpy(), theirs[key].numpy(), rtol=1e-6)


def test_vr_sends_previous_model_and_state_roundtrips():
    strategy = SCAFFOLDMomentumVR(fraction_train=0.5, beta=0.5)
    first = _configure(strategy)[0].content
    assert "momentum.x-prev" not in first and "momentum.g" not in first
    arrays, _ = strategy.aggregate_train(
        1, answer(strategy, [_reply(*r) for r in REPLIES])
    )
    x1 = {k: v.numpy() for k, v in arrays.items()}
    second = _configure(strategy, 2, arrays=x1)[0].content
    np.testing.assert_array_equal(second["momentum.x-prev"]["w"].numpy(), X["w"])
    np.testing.assert_allclose(second["momentum.g"]["w"].numpy(), [0.25, 0.0])

    fresh = SCAFFOLDMomentumVR(beta=0.5)
    fresh.load_state(strategy.export_state())
    for name in ("g", "c", "x_prev"):
        assert strategy.state[name]  # every part of the state is exercised
        assert set(fresh.state[name]) == set(strategy.state[name])
        for key, value in strategy.state[name].items():
            np.testing.assert_array_equal(fresh.state[name][key], value)


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="beta"):
        FedAvgMomentum(beta=0.0)
    with pytest.raises(ValueError, match="eta-g"):
        SCAFFOLD(eta_g=0.0)
