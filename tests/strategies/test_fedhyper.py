"""FedHyper's server schedulers: hand-computed rounds, clips, reductions, resume."""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from bouquet.simulations.inprocess import ensure_task_identity
from bouquet.strategies.aggregation import to_numpy, to_record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.fedhyper import GLOBAL_UPDATE, FedHyper, dot, trainable_keys
from tests.conftest import answer


class FakeGrid:
    def get_node_ids(self):
        return [11, 12]


def x(w, running=0.0):
    # "bn.running_mean" must be ignored by the dot products and take the plain mean
    return {
        "w": np.asarray(w, np.float32),
        "bn.running_mean": np.asarray([running], np.float32),
        "bn.num_batches_tracked": np.asarray(3, np.int64),
    }


def schedule(strategy):
    """The hypergradient optimizer's state: ``alpha``, ``previous``, ``momentum``."""
    return strategy.state["aggregator"]["optimizer"]


def step(strategy, reference, mean):
    """One server step from the FedAvg ``mean`` of a round that sent ``reference``.

    Runs the strategy's server optimizer (the hypergradient schedule) on
    ``Delta = mean - reference`` and keeps its new state; returns ``x_{t+1}``.
    """
    ctx = RoundContext(
        server_round=1,
        num_rounds=None,
        phase="train",
        nodes=(),
        sampled=(),
        arrays=reference,
        config={},
    )
    delta = {
        k: mean[k].astype(np.float64) - reference[k].astype(np.float64)
        for k in reference
    }
    optimizer = strategy.aggregator.optimizer
    arrays, new_state = optimizer.update(delta, schedule(strategy), ctx)
    strategy.state["aggregator"]["optimizer"] = new_state
    return arrays


def play(strategy, rnd, global_arrays, client_ws, reply, lr=0.01):
    """One round: configure, two equal-sized replies, aggregate -> (arrays, config)."""
    ensure_task_identity()
    messages = strategy.configure_train(
        rnd, to_record(global_arrays), ConfigRecord({"lr": lr}), FakeGrid()
    )
    replies = [
        reply(
            x(w, running=100.0 * (i + 1)),
            {"num-examples": 5, "partition-id": i},
            node_id=100 + i,
            routine=strategy.routine,
        )
        for i, w in enumerate(client_ws)
    ]
    arrays, metrics = strategy.aggregate_train(rnd, answer(strategy, replies))
    return to_numpy(arrays), messages[0].content, metrics


def test_trainable_keys_and_dot():
    assert trainable_keys(x([1, 2])) == ["w"]
    a = {"a": np.ones(2), "b": np.full((1, 1), 2.0)}
    assert dot(a, {"a": np.array([1, 2]), "b": np.array([[3]])}) == 9.0


def test_g_golden_rounds(reply):
    # Round 1: mean (1, 2) = FedAvg, Delta_0 = (1, 2).
    # Round 2: mean (2, 3), Delta_1 = (1, 1), a = <(1,1),(1,2)> = 3 -> x = (1,2) + 4(1,1).
    # Round 3: mean (4, 6), Delta_2 = (-1, 0), a = 3 - 1 = 2 -> x = (5,6) + 3(-1,0).
    s = FedHyper(scheduler="g", seed=0)
    a1, _, _ = play(s, 1, x([0, 0]), [[0, 1], [2, 3]], reply)
    np.testing.assert_allclose(a1["w"], [1, 2])
    a2, _, m2 = play(s, 2, a1, [[1, 2], [3, 4]], reply)
    np.testing.assert_allclose(a2["w"], [5, 6])
    assert s.alpha == pytest.approx(3.0) and m2["fedhyper.global-lr"] == pytest.approx(
        4
    )
    a3, _, _ = play(s, 3, a2, [[3, 5], [5, 7]], reply)
    np.testing.assert_allclose(a3["w"], [2, 6])
    assert s.alpha == pytest.approx(2.0)
    # BN statistics: plain mean of 100 and 200; the integer counter stays an integer
    assert a3["bn.running_mean"] == pytest.approx(150.0)
    assert a3["bn.num_batches_tracked"].dtype == np.int64


def test_gm_golden_rounds():
    # Round 2: Delta_1 = (1, 1), m_0 = (1, 2): a = 3,
    #   x = (1,2) + 4 (1,1) + .9 * 3 (1,2) = (7.7, 11.4), m_1 = (1.9, 2.8).
    # Round 3: Delta_2 = (0, -1): a = 3 - 2.8 = .2,
    #   x = (7.7, 11.4) + 1.2 (0,-1) + .9 * .2 (1.9, 2.8) = (8.042, 10.704).
    s = FedHyper(scheduler="gm", seed=0)
    x1 = step(s, {"w": np.zeros(2)}, {"w": np.array([1.0, 2.0])})
    np.testing.assert_allclose(x1["w"], [1, 2])
    np.testing.assert_allclose(schedule(s)["momentum"]["w"], [1, 2])
    x2 = step(s, x1, {"w": np.array([2.0, 3.0])})
    np.testing.assert_allclose(x2["w"], [7.7, 11.4])
    np.testing.assert_allclose(schedule(s)["momentum"]["w"], [1.9, 2.8])
    x3 = step(s, x2, {"w": np.array([7.7, 10.4])})
    assert s.alpha == pytest.approx(0.2)
    np.testing.assert_allclose(x3["w"], [8.042, 10.704])
    np.testing.assert_allclose(schedule(s)["momentum"]["w"], [1.71, 1.52])


@pytest.mark.parametrize(
    ("scheduler", "sign", "expected"),
    [("g", 1, 4.0), ("g", -1, -0.8), ("gm", 1, 4.0), ("gm", -1, -0.2)],
)
def test_alpha_is_clipped(scheduler, sign, expected):
    s = FedHyper(scheduler=scheduler, seed=0)
    ref = {"w": np.zeros(1)}
    step(s, ref, {"w": np.array([10.0])})
    step(s, ref, {"w": np.array([sign * 10.0])})  # dot = +-100
    assert s.alpha == pytest.approx(expected)


def test_sl_schedules_the_local_lr(reply):
    s = FedHyper(scheduler="sl", seed=0)
    a1, sent1, _ = play(s, 1, x([0, 0]), [[0, 1], [2, 3]], reply, lr=0.01)
    assert sent1["config"]["lr"] == pytest.approx(0.01)
    a2, sent2, m2 = play(s, 2, a1, [[1, 2], [3, 4]], reply, lr=0.01)
    np.testing.assert_allclose(a2["w"], [2, 3])  # the global step stays FedAvg
    assert sent2["config"]["lr"] == pytest.approx(0.01)  # no hypergradient yet
    assert m2["fedhyper.local-lr"] == pytest.approx(0.04)  # 0.01 * (1 + 3)
    _, sent3, _ = play(s, 3, a2, [[1, 2], [3, 4]], reply, lr=0.01)
    assert sent3["config"]["lr"] == pytest.approx(0.04)
    schedule(s)["alpha"] = 1e6
    assert s.local_lr(0.01) == 0.1 and s.local_lr(0.0) == 0.001


def test_cl_sends_previous_update_and_cohort_size(reply):
    s = FedHyper(scheduler="cl", seed=0)
    a1, sent1, _ = play(s, 1, x([0, 0]), [[0, 1], [2, 3]], reply)
    record = to_numpy(sent1[GLOBAL_UPDATE])
    assert list(record) == ["w"] and not record["w"].any()
    assert sent1["config"]["fedhyper.num-sampled"] == 2
    assert sent1["config"]["fedhyper.client-scheduler"] is True
    a2, sent2, _ = play(s, 2, a1, [[1, 2], [3, 4]], reply)
    np.testing.assert_allclose(to_numpy(sent2[GLOBAL_UPDATE])["w"], [1, 2])
    np.testing.assert_allclose(a2["w"], [2, 3])  # FedAvg on the server
    gm = play(FedHyper(seed=0), 1, x([0, 0]), [[0, 1], [1, 1]], reply)[1]
    assert GLOBAL_UPDATE not in gm and "fedhyper.num-sampled" not in gm["config"]


def test_callers_config_is_not_modified(reply):
    s = FedHyper(scheduler="sl", seed=0)
    schedule(s)["alpha"] = 3.0
    config = ConfigRecord({"lr": 0.01})
    ensure_task_identity()
    messages = s.configure_train(1, to_record(x([0, 0])), config, FakeGrid())
    assert dict(config) == {"lr": 0.01}
    assert messages[0].content["config"]["lr"] == pytest.approx(0.04)  # 0.01 * 4
    # The next round still schedules from the caller's eta_0 = 0.01.
    messages = s.configure_train(2, to_record(x([0, 0])), config, FakeGrid())
    assert dict(config) == {"lr": 0.01}
    assert messages[0].content["config"]["lr"] == pytest.approx(0.04)


@pytest.mark.parametrize("scheduler", ["g", "gm", "sl", "cl", "full"])
def test_hypergradient_step_zero_equals_fedavg(scheduler, reply):
    rng = np.random.default_rng(0)
    hyper, fedavg = FedHyper(scheduler=scheduler, hypergrad_lr=0.0, seed=0), FedAvg()
    a, b = x([0, 0]), x([0, 0])
    for rnd in range(1, 5):
        clients = rng.normal(size=(2, 2)).astype(np.float32)
        a, sent, _ = play(hyper, rnd, a, clients, reply)
        b, _, _ = play(fedavg, rnd, b, clients, reply)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
        assert sent["config"]["lr"] == 0.01
    assert hyper.alpha == 0.0


def test_export_load_continues_the_schedule(reply):
    rounds = [[[0, 1], [2, 3]], [[1, 2], [3, 4]], [[3, 5], [5, 7]], [[2, 9], [1, 1]]]
    straight = FedHyper(scheduler="full", seed=0)
    a = x([0, 0])
    for rnd, clients in enumerate(rounds, 1):
        a, sent, _ = play(straight, rnd, a, clients, reply)
    first = FedHyper(scheduler="full", seed=0)
    b = x([0, 0])
    for rnd, clients in enumerate(rounds[:2], 1):
        b, _, _ = play(first, rnd, b, clients, reply)
    resumed = FedHyper(scheduler="full", seed=0)
    resumed.load_state(first.export_state())
    for rnd, clients in enumerate(rounds[2:], 3):
        b, sent_b, _ = play(resumed, rnd, b, clients, reply)
    np.testing.assert_array_equal(a["w"], b["w"])
    assert resumed.alpha == straight.alpha != 0.0
    np.testing.assert_array_equal(
        to_numpy(sent[GLOBAL_UPDATE])["w"], to_numpy(sent_b[GLOBAL_UPDATE])["w"]
    )


def test_bad_options_fail():
    with pytest.raises(ValueError, match="scheduler"):
        FedHyper(scheduler="GM")
    with pytest.raises(ValueError, match="hypergrad-lr"):
        FedHyper(hypergrad_lr=-1.0)
    with pytest.raises(ValueError, match="bounds"):
        FedHyper(local_lr_min=0.2, local_lr_max=0.1)
