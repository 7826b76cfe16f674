"""FedAMD's server: roles, the anchor table and the miner update, by hand."""

import numpy as np
import pytest
from flwr.app import ConfigRecord

from bouquet.simulations.inprocess import InProcessGrid, run_inprocess
from bouquet.strategies.aggregation import to_numpy, to_record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedamd import DIRECTION, ROLE, FedAMD, draw_roles
from bouquet.strategies.state import load_state
from tests.conftest import answer

X = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}


def _round(strategy, server_round, arrays, roles=None):
    """The round ``configure_train`` would have recorded: ``arrays`` sent, ``roles``."""
    ctx = RoundContext(
        server_round=server_round,
        num_rounds=None,
        phase="train",
        nodes=(),
        sampled=(),
        arrays=arrays,
        config={},
        per_node={node: {"role": role} for node, role in (roles or {}).items()},
    )
    strategy.train_round = ctx
    return ctx


def _miner_replies(reply, models):
    return [
        reply(y, {"num-examples": 5, "partition-id": i}, 10 + i, routine="fedamd")
        for i, y in enumerate(models)
    ]


def _grid(num_nodes=4):
    return InProcessGrid(lambda msg, ctx: None, num_nodes, {})


def _config():
    return ConfigRecord({"local-epochs": 2, "local-steps": 0, "lr": 0.1})


def test_miner_update_golden_numbers(reply):
    # y1 - x = (-1, 0), y2 - x = (1, -2): mean (0, -1); eta_g = 0.5 -> (1, 1.5)
    strategy = FedAMD(eta_g=0.5)
    miners = [
        {"w": np.array([0.0, 2.0], np.float32), "n": np.array(3, np.int64)},
        {"w": np.array([2.0, 0.0], np.float32), "n": np.array(3, np.int64)},
    ]
    _round(strategy, 2, dict(X))  # no roles recorded: every reply is a miner's
    arrays, _ = strategy.aggregate_train(
        2, answer(strategy, _miner_replies(reply, miners))
    )
    out = to_numpy(arrays)
    np.testing.assert_allclose(out["w"], [1.0, 1.5])
    assert out["w"].dtype == np.float32 and out["n"] == 3 and out["n"].dtype == np.int64
    # no miner this round: the model does not move
    ctx = _round(strategy, 3, dict(X))
    assert strategy.aggregate([], ctx)["w"] is X["w"]


def test_eta_g_one_is_the_plain_mean_of_miner_models(reply):
    miners = [{"w": np.array([0.0, 4.0])}, {"w": np.array([2.0, 0.0])}]
    strategy = FedAMD(eta_g=1.0)
    _round(strategy, 2, {"w": np.array([9.0, 9.0])})
    arrays, _ = strategy.aggregate_train(
        2, answer(strategy, _miner_replies(reply, miners))
    )
    np.testing.assert_allclose(to_numpy(arrays)["w"], [1.0, 2.0])


def test_roles_probability_and_period():
    rng = np.random.default_rng(0)
    assert draw_roles(5, 0.0, 7, rng) == ["miner"] * 5
    assert draw_roles(3, 3, 4, rng) == ["anchor"] * 3  # (4 - 1) % 3 == 0
    assert draw_roles(3, 3, 5, rng) == ["miner"] * 3
    drawn = draw_roles(10_000, 0.2, 2, np.random.default_rng(1))
    assert drawn.count("anchor") / 10_000 == pytest.approx(0.2, abs=0.02)
    with pytest.raises(ValueError, match=r"fedamd\.p"):
        FedAMD(p=1.0)
    with pytest.raises(ValueError, match=r"fedamd\.p"):
        FedAMD(p=2.5)


def test_first_round_makes_every_node_an_anchor_then_miners_get_v_t(reply):
    strategy = FedAMD(seed=3, p=0.0, k=5, fraction_train=0.5)
    grid = _grid(4)
    messages = list(strategy.configure_train(1, to_record(X), _config(), grid))
    assert len(messages) == 4  # init round: all nodes, whatever fraction_train
    for msg in messages:
        cfg = msg.content["config"]
        assert cfg[ROLE] == "anchor" and cfg["local-steps"] == 0
        assert cfg["local-epochs"] == 1 and DIRECTION not in msg.content
    # Anchors report gradients (1, 0), (3, 2), (0, 0), (0, 6): v = (1, 2)
    grads = [[1.0, 0.0], [3.0, 2.0], [0.0, 0.0], [0.0, 6.0]]
    replies = [
        reply(
            {"w": np.array(g, np.float32), "n": np.array(0, np.int64)},
            {"num-examples": 5, "partition-id": i},
            node_id=msg.metadata.dst_node_id,
            routine="fedamd",
        )
        for i, (g, msg) in enumerate(zip(grads, messages, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
    np.testing.assert_array_equal(to_numpy(arrays)["w"], X["w"])  # anchors only
    assert sorted(strategy.state["table"]) == ["0", "1", "2", "3"]

    messages = list(strategy.configure_train(2, arrays, _config(), grid))
    assert len(messages) == 2  # fraction_train = 0.5 from round 2 on
    for msg in messages:
        cfg = msg.content["config"]
        assert cfg[ROLE] == "miner" and cfg["local-steps"] == cfg["local-epochs"] == 5
        np.testing.assert_allclose(to_numpy(msg.content[DIRECTION])["w"], [1.0, 2.0])
    assert cfg["lr"] == 0.1  # shared keys pass through


def test_anchor_reply_overwrites_only_its_own_entry(reply):
    strategy = FedAMD(seed=0, p=0.0, min_train_nodes=1)
    strategy.state["table"] = {"0": {"w": np.zeros(2)}, "1": {"w": np.ones(2)}}
    _round(strategy, 3, {"w": np.zeros(2)}, roles={7: "anchor"})
    good = reply(
        {"w": np.array([4.0, 4.0])},
        {"num-examples": 1, "partition-id": 1},
        7,
        routine="fedamd",
    )
    arrays, _ = strategy.aggregate_train(3, answer(strategy, [good]))
    np.testing.assert_array_equal(to_numpy(arrays)["w"], [0.0, 0.0])  # anchor only
    np.testing.assert_allclose(strategy.state["table"]["0"]["w"], [0.0, 0.0])
    np.testing.assert_allclose(strategy.state["table"]["1"]["w"], [4.0, 4.0])
    np.testing.assert_allclose(strategy.direction()["w"], [2.0, 2.0])


def test_state_roundtrip():
    strategy = FedAMD()
    strategy.state["table"] = {"0": {"w": np.arange(3.0)}, "2": {"w": -np.arange(3.0)}}
    fresh = FedAMD()
    fresh.load_state(strategy.export_state())
    assert sorted(fresh.state["table"]) == ["0", "2"]
    np.testing.assert_array_equal(fresh.state["table"]["2"]["w"], -np.arange(3.0))


def test_inprocess_run_fills_the_table_and_learns(tmp_path):
    config = {
        "algorithm": "fedamd",
        "num-server-rounds": 4,
        "fraction-train": 0.5,
        "fraction-evaluate": 0.0,
        "output-dir": str(tmp_path),
        "model": "logreg",
        "momentum": 0.0,
        "fedamd.p": 0.3,
        "fedamd.k": 5,
    }
    result, path, grid = run_inprocess(config, num_nodes=4)
    state = load_state(path / "checkpoint")
    assert sorted(state.strategy["table"]) == ["0", "1", "2", "3"]
    trains = [node for node, kind in grid.calls if kind == "train"]
    assert len(trains) == 4 + 3 * 2  # init round on all nodes, then 2 per round
    accuracy = result.evaluate_metrics_serverapp
    assert accuracy[4]["accuracy"] > accuracy[0]["accuracy"]
