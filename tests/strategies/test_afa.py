"""AFA-CD / AFA-CS servers: golden steps, simulated staleness and arrivals."""

from collections import Counter

import numpy as np
import pytest
from flwr.app import ConfigRecord

from bouquet.simulations.inprocess import InProcessGrid, run_inprocess
from bouquet.strategies.afa import AFACD, AFACS
from bouquet.strategies.aggregation import to_numpy, to_record
from bouquet.strategies.context import RoundContext
from tests.conftest import answer

X = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}


def _reply(reply, g, pid):
    arrays = {"w": np.array(g, np.float32), "n": np.array(0, np.int64)}
    return reply(
        arrays,
        {"num-examples": 5, "partition-id": pid},
        node_id=100 + pid,
        routine="afa",
    )


def _prepare(strategy, server_round, versions=None):
    """The round ``configure_train`` would have recorded: ``X`` sent, at ``versions``."""
    strategy.train_round = RoundContext(
        server_round=server_round,
        num_rounds=None,
        phase="train",
        nodes=(),
        sampled=(),
        arrays=dict(X),
        config={},
        per_node={node: {"version": v} for node, v in (versions or {}).items()},
    )
    return strategy


def test_afa_cd_golden_step(reply):
    # mean G = ((1, 0) + (3, 4)) / 2 = (2, 2); eta = 0.5 -> x - (1, 1) = (0, 1)
    strategy = _prepare(AFACD(eta=0.5), 4, {100: 1, 101: 3})  # ages 3 and 1
    out, metrics = strategy.aggregate_train(
        4, answer(strategy, [_reply(reply, [1, 0], 0), _reply(reply, [3, 4], 1)])
    )
    assert metrics["afa.staleness"] == 2.0
    out = to_numpy(out)
    np.testing.assert_allclose(out["w"], [0.0, 1.0])
    assert out["w"].dtype == np.float32 and out["n"] == 3 and out["n"].dtype == np.int64


def test_afa_cs_golden_step_uses_stale_entries(reply):
    strategy = _prepare(AFACS(eta=0.5), 5)
    table = {"0": {"w": np.array([2.0, 2.0]), "n": np.array(0)}}
    table["1"] = {"w": np.array([9.0, 9.0]), "n": np.array(0)}
    strategy.state["aggregator"]["combine"] = table
    replies = [_reply(reply, [4, 0], 1), _reply(reply, [0, 6], 2)]
    out, _ = strategy.aggregate_train(5, answer(strategy, replies))
    # table: 0 -> (2, 2) stale, 1 -> (4, 0) overwritten, 2 -> (0, 6) new
    # mean (2, 8/3); x - 0.5 * mean = (0, 2/3)
    np.testing.assert_allclose(to_numpy(out)["w"], [0.0, 2.0 / 3.0], rtol=1e-6)
    table = strategy.state["aggregator"]["combine"]
    assert sorted(table) == ["0", "1", "2"]
    np.testing.assert_allclose(table["0"]["w"], [2.0, 2.0])
    np.testing.assert_allclose(table["1"]["w"], [4.0, 0.0])
    # first report of everyone: AFA-CS equals AFA-CD
    cd, cs = _prepare(AFACD(eta=0.5), 1), _prepare(AFACS(eta=0.5), 1)
    for s in (cd, cs):
        s.out = to_numpy(s.aggregate_train(1, answer(s, replies))[0])["w"]
    np.testing.assert_array_equal(cd.out, cs.out)


def test_eta_lr_k_on_normalised_gradients_is_the_mean_local_model(reply):
    # Reduction to FedAvg: workers at x with K steps of lr return (x - y_i)/(lr K);
    # eta = lr * K gives mean_i y_i.
    lr, k = 0.1, 4
    ys = [np.array([0.0, 4.0]), np.array([2.0, 1.0])]
    gs = [(X["w"] - y) / (lr * k) for y in ys]
    strategy = _prepare(AFACD(eta=lr * k), 1)
    out, _ = strategy.aggregate_train(
        1, answer(strategy, [_reply(reply, g, i) for i, g in enumerate(gs)])
    )
    np.testing.assert_allclose(to_numpy(out)["w"], np.mean(ys, axis=0), rtol=1e-6)


def _rounds(strategy, grid, rounds):
    sent = []
    for t in range(1, rounds + 1):
        arrays = to_record({"w": np.full(2, float(t), np.float32)})
        sent.append(list(strategy.configure_train(t, arrays, ConfigRecord(), grid)))
    return sent


def test_each_node_gets_a_model_of_a_bounded_random_age():
    grid = InProcessGrid(lambda m, c: None, 6, {})
    strategy = AFACD(seed=1, tau_max=2, k=7, fraction_train=0.5)
    sent = _rounds(strategy, grid, 6)
    ages = []
    for t, messages in enumerate(sent, start=1):
        assert len(messages) == 3
        for msg in messages:
            cfg, w = msg.content["config"], to_numpy(msg.content["arrays"])["w"]
            version = cfg["afa.version"]
            assert w[0] == version and t - min(2, t - 1) <= version <= t
            assert cfg["local-steps"] == cfg["local-epochs"] == cfg["afa.k"] == 7
            ages.append(t - version)
    models = strategy.state["models"]
    assert set(ages) == {0, 1, 2} and sorted(models) == ["4", "5", "6"]
    # the last round's ages feed the metrics
    assert strategy.train_round.server_round == 6
    assert len(strategy.train_round.per_node) == 3
    again = _rounds(AFACD(seed=1, tau_max=2, k=7, fraction_train=0.5), grid, 6)
    assert [[m.content["config"]["afa.version"] for m in r] for r in again] == [
        [m.content["config"]["afa.version"] for m in r] for r in sent
    ]


def test_biased_arrivals_favour_fast_nodes_and_slow_ones_are_stalest():
    grid = InProcessGrid(lambda m, c: None, 8, {})
    strategy = AFACD(seed=0, tau_max=3, arrival="biased", fraction_train=0.25)
    counts = Counter()
    for t, messages in enumerate(_rounds(strategy, grid, 200), start=1):
        for msg in messages:
            node = msg.metadata.dst_node_id
            counts[node] += 1
            if node >= 1004:  # the upper half of the sorted ids is slow
                assert msg.content["config"]["afa.version"] == t - min(3, t - 1)
    fast = sum(counts[n] for n in range(1000, 1004))
    slow = sum(counts[n] for n in range(1004, 1008))
    assert fast + slow == 400 and 2.5 < fast / slow < 6.0


def test_state_roundtrip_and_bad_options():
    strategy = AFACS()
    strategy.state["models"] = {"3": {"w": np.ones(2)}}
    strategy.state["aggregator"]["combine"] = {"0": {"w": np.arange(2.0)}}
    fresh = AFACS()
    fresh.load_state(strategy.export_state())
    table = fresh.state["aggregator"]["combine"]
    np.testing.assert_array_equal(table["0"]["w"], [0.0, 1.0])
    np.testing.assert_array_equal(fresh.state["models"]["3"]["w"], [1.0, 1.0])
    # AFA-CD keeps no table: its combine rule is stateless
    state = AFACD().export_state()
    assert set(state) == {"aggregator", "models"}
    assert state["aggregator"]["combine"] is None
    with pytest.raises(ValueError, match="k-min"):
        AFACD(k=2, k_min=3)
    with pytest.raises(ValueError, match="arrival"):
        AFACD(arrival="chaos")


def test_normalised_with_eta_lr_k_equals_raw_deltas_end_to_end(tmp_path):
    base = {
        "num-server-rounds": 3,
        "fraction-train": 0.5,
        "fraction-evaluate": 0.0,
        "model": "logreg",
        "momentum": 0.0,
        "lr": 0.1,
        "afa-cs.k": 4,
        "afa-cs.k-min": 4,
        "afa-cs.tau-max": 1,
    }
    runs = []
    for extra in ({"afa-cs.eta": 0.4}, {"afa-cs.eta": 1.0, "afa-cs.normalize": False}):
        config = {**base, **extra, "algorithm": "afa-cs", "output-dir": str(tmp_path)}
        result, _, _ = run_inprocess(config, num_nodes=4)
        runs.append({k: v.numpy() for k, v in result.arrays.items()})
    for key, value in runs[0].items():
        np.testing.assert_allclose(value, runs[1][key], rtol=1e-4, atol=1e-6)
    assert not np.allclose(runs[0]["1.weight"], 0)
