"""FedSpeed's server rule on hand-made arrays, its config, state and reductions."""

import shutil

import numpy as np
import pytest
from flwr.app import ConfigRecord

from bouquet.simulations.inprocess import InProcessGrid, ensure_task_identity
from bouquet.strategies.aggregation import to_numpy, to_record, weighted_mean
from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedspeed import FedSpeed, ProxCorrectedMean, corrected
from bouquet.strategies.pieces import Aggregator, ServerSGD, Uniform
from bouquet.strategies.validation import ClientReply
from tests.conftest import answer, make_reply


def fedspeed_update(x, clients, h, num_clients, eta_g=1.0):
    """FedSpeed's server chain on hand-made arrays -> (new arrays, new H).

    ``h`` is H before this round (None: no correction); the chain adds this
    round's updates to it, then ``x + eta_g (mean_i y_i + H / N - x)``.
    """
    ctx = RoundContext(
        server_round=1,
        num_rounds=None,
        phase="train",
        nodes=tuple(range(1, num_clients + 1)),
        sampled=tuple(range(1, len(clients) + 1)),
        arrays=x,
        config={},
    )
    replies = [
        ClientReply(node=i + 1, partition=i, num_examples=1.0, metrics={}, arrays=c)
        for i, c in enumerate(clients)
    ]
    chain = Aggregator(Uniform(), ProxCorrectedMean(h is not None), ServerSGD(eta_g))
    state = {**chain.init(), "combine": dict(h or {})}
    arrays, state = chain.update(replies, state, ctx)
    return arrays, state["combine"]


def test_update_golden_numbers():
    x = {"w": np.zeros(2)}
    clients = [{"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, -2.0])}]
    # H = 0 + deltas (1, 2) + (3, -2) = (4, 0)
    # mean y = (2, 0); + H/N = (4, 0)/4 -> (3, 0)
    out, h = fedspeed_update(x, clients, {}, 4)
    np.testing.assert_allclose(out["w"], [3.0, 0.0])
    np.testing.assert_allclose(h["w"], [4.0, 0.0])
    # eta_g = .5: x + .5 (3, 0 - x)
    np.testing.assert_allclose(
        fedspeed_update(x, clients, {}, 4, eta_g=0.5)[0]["w"], [1.5, 0.0]
    )
    # H from earlier rounds (2, 2) -> (6, 2): (2, 0) + (6, 2)/4
    out, h = fedspeed_update(x, clients, {"w": np.array([2.0, 2.0])}, 4)
    np.testing.assert_allclose(out["w"], [3.5, 0.5])
    np.testing.assert_allclose(h["w"], [6.0, 2.0])
    out, h = fedspeed_update(x, clients, None, 4)
    np.testing.assert_allclose(out["w"], [2.0, 0.0])
    assert h == {}


class FakeGrid:
    def __init__(self, num_nodes):
        self.ids = list(range(1, num_nodes + 1))

    def get_node_ids(self):
        return list(self.ids)


def _round(strategy, reference, clients, rnd=1, num_clients=None):
    """One round sent to ``num_clients`` connected nodes, replies from the first."""
    ensure_task_identity()
    grid = FakeGrid(num_clients or len(clients))
    strategy.configure_train(rnd, to_record(reference), ConfigRecord(), grid)
    replies = [
        make_reply(
            c,
            {"num-examples": 10 * (i + 1), "partition-id": i},
            node_id=i + 1,
            routine="fedspeed",
        )
        for i, c in enumerate(clients)
    ]
    arrays, metrics = strategy.aggregate_train(rnd, answer(strategy, replies))
    return to_numpy(arrays), metrics


def correction_sum(strategy):
    """H: the state of FedSpeed's combine piece."""
    return strategy.state["aggregator"]["combine"]


def _model(w, rm, n):
    return {
        "w": np.asarray(w, np.float32),
        "bn.running_mean": np.asarray(rm, np.float32),
        "bn.num_batches_tracked": np.array(n, np.int64),
    }


def test_two_rounds_accumulate_h_over_all_clients():
    strategy = FedSpeed(seed=0)
    x0 = _model([0, 0], [0, 0], 0)
    # N = 4. Round 1: deltas (1, 2), (3, -2) -> H = (4, 0); x1 = (2, 0) + (1, 0)
    x1, _ = _round(
        strategy,
        x0,
        [_model([1, 2], [1, 1], 3), _model([3, -2], [3, 1], 4)],
        num_clients=4,
    )
    np.testing.assert_allclose(x1["w"], [3.0, 0.0])
    np.testing.assert_allclose(x1["bn.running_mean"], [2.0, 1.0])  # plain mean
    assert x1["bn.num_batches_tracked"] == 4 and x1["w"].dtype == np.float32
    assert set(correction_sum(strategy)) == {"w"}
    # Round 2 from x1 = (3, 0): deltas (0, 1), (2, 1) -> H = (6, 2);
    # x2 = mean y (4, 1) + H/4 (1.5, .5)
    x2, _ = _round(
        strategy,
        x1,
        [_model([3, 1], [2, 1], 5), _model([5, 1], [2, 1], 5)],
        rnd=2,
        num_clients=4,
    )
    np.testing.assert_allclose(x2["w"], [5.5, 1.5])
    np.testing.assert_allclose(correction_sum(strategy)["w"], [6.0, 2.0])


def test_state_roundtrip_continues_identically():
    first = FedSpeed(seed=0)
    x0 = {"w": np.zeros(3, np.float32)}
    clients = [{"w": np.array([1, 2, 3], np.float32)}, {"w": np.ones(3, np.float32)}]
    _round(first, x0, clients, num_clients=3)
    fresh = FedSpeed(seed=0)
    fresh.load_state(first.export_state())
    np.testing.assert_array_equal(
        correction_sum(fresh)["w"], correction_sum(first)["w"]
    )
    a, _ = _round(first, x0, clients, rnd=2, num_clients=3)
    b, _ = _round(fresh, x0, clients, rnd=2, num_clients=3)
    np.testing.assert_array_equal(a["w"], b["w"])


def test_lambda_zero_is_the_unweighted_mean_and_keeps_no_state():
    strategy = FedSpeed(seed=0, lambda_=0.0)
    x0 = _model([0, 0], [0, 0], 0)
    clients = [_model([1, 2], [1, 1], 3), _model([3, -2], [3, 1], 4)]
    for rnd in (1, 2):
        out, _ = _round(strategy, x0, clients, rnd, num_clients=10)
        expected = weighted_mean(clients)
        for key, value in expected.items():
            np.testing.assert_array_equal(out[key], value)
    assert not correction_sum(strategy)  # no H kept


def test_sampled_rule_is_the_mean_of_the_corrected_models():
    strategy = FedSpeed(seed=0, server_rule="sampled")
    x0 = {"w": np.zeros(2)}
    clients = [{"w": np.array([1.0, 2.0])}, {"w": np.ones(2)}]
    out, _ = _round(strategy, x0, clients, num_clients=10)
    np.testing.assert_allclose(out["w"], [1.0, 1.5])
    assert not correction_sum(strategy)  # no H kept


def test_configure_train_sends_keys_and_decays_lr_without_compounding():
    strategy = FedSpeed(seed=0, rho=0.2, lambda_=0.3, lr_decay=0.5, fraction_train=1.0)
    grid = InProcessGrid(lambda msg, ctx: msg, num_nodes=3, run_config={})
    config = ConfigRecord({"lr": 0.1})
    arrays = to_record({"w": np.zeros(2, np.float32)})
    for rnd, lr in ((1, 0.1), (3, 0.025), (3, 0.025)):
        messages = list(strategy.configure_train(rnd, arrays, config, grid))
        assert len(messages) == 3 and strategy.train_round.population == 3
        sent = messages[0].content["config"]
        assert sent["lr"] == pytest.approx(lr)
        assert sent["fedspeed.rho"] == 0.2 and sent["fedspeed.lambda"] == 0.3
        assert sent["fedspeed.server-rule"] == "all-clients"
    assert config["lr"] == 0.1


def test_corrected_entries_and_bad_options():
    assert corrected("conv.weight", np.zeros(2, np.float32))
    assert not corrected("bn.running_var", np.zeros(2, np.float32))
    assert not corrected("bn.num_batches_tracked", np.array(1, np.int64))
    with pytest.raises(ValueError, match="server-rule"):
        FedSpeed(server_rule="nope")
    with pytest.raises(ValueError, match="rho"):
        FedSpeed(rho=-0.1)


# ----------------------------------------------- in-process: client state, resume --
def _config(tmp_path, rounds, **extra):
    return {
        "algorithm": "fedspeed",
        "num-server-rounds": rounds,
        "fraction-train": 0.5,
        "min-train-nodes": 2,
        "fraction-evaluate": 0.0,
        "local-epochs": 1,
        "batch-size": 32,
        "momentum": 0.0,
        "seed": 3,
        "output-dir": str(tmp_path),
        **extra,
    }


def _run(grid, config):
    from bouquet.serverapps.run import run_server
    from bouquet.simulations.inprocess import app_defaults

    return run_server(grid, {**app_defaults(), **config}, settle=0.0)


def _grid(config, num_nodes=4):
    from bouquet.clientapps.app import app
    from bouquet.simulations.inprocess import app_defaults

    return InProcessGrid(app, num_nodes, {**app_defaults(), **config})


def test_client_h_lives_in_context_state_and_sums_to_server_h(tmp_path):
    from bouquet.strategies.state import load_state

    config = _config(tmp_path, 2, **{"fraction-train": 0.34})
    grid = _grid(config, num_nodes=6)
    _, path = _run(grid, config)
    trained = {node for node, kind in grid.calls if kind == "train"}
    assert 2 <= len(trained) <= 4  # 2 of 6 per round: some never sampled
    total = None
    for node, context in grid.contexts.items():
        h = context.state.get("fedspeed.h")
        assert (h is not None) == (node in trained)
        if h is not None:
            arrays = {k: v.numpy().astype(np.float64) for k, v in h.items()}
            total = (
                arrays if total is None else {k: total[k] + arrays[k] for k in total}
            )
    state = load_state(path / "checkpoint").strategy
    server_h = state["aggregator"]["combine"]
    assert set(server_h) == set(total)
    for key, value in total.items():
        np.testing.assert_allclose(server_h[key], value, rtol=1e-4, atol=1e-6)


def test_resume_on_the_same_nodes_equals_an_uninterrupted_run(tmp_path):
    straight = _config(tmp_path / "a", 4, **{"fraction-train": 0.75})
    result, _ = _run(_grid(straight), straight)

    first = _config(tmp_path / "b", 2, **{"fraction-train": 0.75})
    grid = _grid(first)  # the nodes (and their Context.state) survive the restart
    _, path = _run(grid, first)
    copy = shutil.copytree(path, tmp_path / "copy")
    resumed, _ = _run(grid, {**first, "num-server-rounds": 4, "resume": str(path)})
    for key, value in result.arrays.items():
        np.testing.assert_array_equal(value.numpy(), resumed.arrays[key].numpy())
    # The clients' h_i matter: fresh nodes (empty Context.state) give another model.
    lost, _ = _run(_grid(first), {**first, "num-server-rounds": 4, "resume": str(copy)})
    assert any(
        not np.array_equal(value.numpy(), lost.arrays[key].numpy())
        for key, value in result.arrays.items()
    )
