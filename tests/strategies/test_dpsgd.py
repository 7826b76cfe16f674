"""D-PSGD and the gossip relay: hand-made models through both halves, then a run."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Message

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.recipes.dpsgd import GossipMix, make_hooks, read_weights
from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies.context import RoundContext
from bouquet.strategies.dpsgd import DPSGD
from bouquet.strategies.gossip import STATE
from bouquet.strategies.topology import consensus_distance, make_graph, mixing_matrix
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire

NODES = (10, 11, 12, 13, 14)
HELD = {"bouquet.personal": "the node's model"}
X = np.arange(15, dtype=np.float32).reshape(5, 1, 3) ** 1.5  # one model per vertex


def _strategy(**kwargs):
    strategy = DPSGD(**kwargs)
    strategy.state[STATE] = {
        "nodes": list(NODES),
        "models": {str(v): {"weight": X[v]} for v in range(len(NODES))},
        "silent": [],
        "initial": {"weight": np.zeros((1, 3), np.float32)},
    }
    return strategy


def _ctx(nodes=NODES, server_round=2):
    return RoundContext(
        server_round=server_round,
        num_rounds=None,
        phase="train",
        nodes=tuple(nodes),
        sampled=(),
        arrays={"weight": np.zeros((1, 3), np.float32)},
        config={wire.SERVER_ROUND: server_round},
    )


def _mix_on_nodes(strategy, ctx):
    """Each node's model after GossipMix, from the messages ``recipients`` plans."""
    plan = strategy.recipients(ctx)
    mixed = {}
    for node, content in plan.items():
        vertex = NODES.index(node)
        model = torch.nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.from_numpy(X[vertex]))  # the node's own model
        run = SimpleNamespace(
            model=model, incoming=content, reply_records={}, state=HELD, stop=False
        )
        (hook,) = make_hooks(content[wire.CONFIG])
        hook.setup(run)
        hook.finish(run)
        mixed[node] = run.reply_records[wire.GOSSIP_MODEL]["weight"].numpy()
    return plan, mixed


@pytest.mark.parametrize("mixing", ["metropolis-hastings", "uniform"])
@pytest.mark.parametrize("topology", ["ring", "complete", "exponential"])
def test_gossip_through_the_relay_equals_w_times_x(topology, mixing):
    # Prepare
    strategy = _strategy(topology=topology, mixing=mixing)
    w = mixing_matrix(make_graph(topology, len(NODES)), mixing)
    # Execute
    plan, mixed = _mix_on_nodes(strategy, _ctx())
    # Assert
    expected = np.einsum("ij,jkl->ikl", w, X.astype(np.float64))
    for v, node in enumerate(NODES):
        np.testing.assert_allclose(mixed[node], expected[v], rtol=1e-6)
        assert len(plan[node][wire.ARRAYS]) == 0  # the node holds its own model
    if topology == "complete" and mixing == "uniform":  # FedAvg's uniform mean
        for node in NODES:
            np.testing.assert_allclose(mixed[node], X.mean(axis=0), rtol=1e-6)


def test_the_first_round_sends_the_initial_model_and_no_neighbours():
    strategy = DPSGD()
    plan = strategy.recipients(_ctx(server_round=1))
    assert sorted(plan) == list(NODES)
    for content in plan.values():
        assert content[wire.CONFIG][wire.GOSSIP_WEIGHTS] == [1.0]
        assert list(content[wire.ARRAYS]) == ["weight"]
        assert not [k for k in content if k.startswith("gossip.neighbor")]


def test_a_node_that_left_is_dropped_from_its_neighbours_views():
    strategy = _strategy(topology="ring", mixing="metropolis-hastings")
    left = 12  # vertex 2: a ring of 5 becomes the path 3-4-0-1
    plan, mixed = _mix_on_nodes(strategy, _ctx(nodes=[n for n in NODES if n != left]))
    assert left not in plan
    alive = [0, 1, 3, 4]
    w = mixing_matrix(make_graph("ring", 5)[np.ix_(alive, alive)])
    expected = np.einsum("ij,jkl->ikl", w, X[alive].astype(np.float64))
    for i, v in enumerate(alive):
        np.testing.assert_allclose(mixed[NODES[v]], expected[i], rtol=1e-6)
    assert len(plan[11][wire.CONFIG][wire.GOSSIP_WEIGHTS]) == 2  # only vertex 0 left


def _reply(node, model):
    return ClientReply(
        node=node,
        partition=NODES.index(node),
        num_examples=10,
        metrics={},
        arrays={},
        records={wire.GOSSIP_MODEL: {"weight": model}},
    )


def test_aggregate_relays_models_and_reports_the_average_as_a_metric():
    strategy = _strategy()
    ctx = _ctx()
    strategy.recipients(ctx)
    new = X + 1.0
    replies = [_reply(n, new[v]) for v, n in enumerate(NODES) if n != 13]
    average = strategy.aggregate(replies, ctx)
    own = strategy.state[STATE]
    np.testing.assert_array_equal(own["models"]["0"]["weight"], new[0])
    np.testing.assert_array_equal(own["models"]["3"]["weight"], X[3])  # stale
    assert own["silent"] == [3]
    answered = new[[0, 1, 2, 4]]
    np.testing.assert_allclose(average["weight"], answered.mean(axis=0), rtol=1e-6)
    metrics = strategy.train_metrics(replies, ctx)
    flat = answered.reshape(4, -1).astype(np.float64)
    mean = flat.mean(axis=0)
    distance = np.mean([np.sum((x - mean) ** 2) for x in flat])
    assert metrics["consensus-distance"] == pytest.approx(distance)
    assert metrics["gossip-edges"] == 5  # the ring of 5
    assert metrics["gossip-bytes-per-node"] == 2 * 3 * 4  # two float32 (1, 3) models
    assert consensus_distance(flat) == pytest.approx(distance)
    # The silent vertex is out of the next round's graph, its node still trains.
    plan = strategy.recipients(_ctx(server_round=3))
    assert plan[13][wire.CONFIG][wire.GOSSIP_WEIGHTS] == [1.0]
    assert len(plan[12][wire.CONFIG][wire.GOSSIP_WEIGHTS]) == 2


def test_the_client_refuses_bad_weights_and_missing_neighbours():
    for bad in ([0.5, 0.6], [float("nan")], [True], "1", [], [1.2, -0.2]):
        with pytest.raises(ConfigError, match=wire.GOSSIP_WEIGHTS):
            read_weights({wire.GOSSIP_WEIGHTS: bad})
    assert read_weights({}) == [1.0]
    run = SimpleNamespace(
        model=torch.nn.Linear(3, 1),
        incoming={},
        reply_records={},
        state=HELD,
        stop=False,
    )
    with pytest.raises(ConfigError, match=r"gossip\.neighbor-0"):
        GossipMix([0.5, 0.5]).setup(run)
    run.state = {}  # a node that lost its model and has no neighbours
    with pytest.raises(ConfigError, match="arrays"):
        GossipMix([1.0]).setup(run)


def test_a_node_that_lost_its_model_rejoins_from_its_neighbours():
    strategy = _strategy(topology="ring", mixing="metropolis-hastings")
    content = strategy.recipients(_ctx())[10]  # vertex 0: neighbours 1 and 4
    model = torch.nn.Linear(3, 1, bias=False)
    run = SimpleNamespace(
        model=model, incoming=content, reply_records={}, state={}, stop=False
    )
    (hook,) = make_hooks(content[wire.CONFIG])
    hook.setup(run)
    expected = (X[1] + X[4]) / 2  # W_01 = W_04 = 1/3, renormalised
    np.testing.assert_allclose(model.weight.detach().numpy(), expected, rtol=1e-6)


def test_a_run_gossips_and_survives_a_node_that_fails(tmp_path):
    seen: list[Message] = []
    from bouquet.clientapps.app import app

    evaluated: list[Message] = []

    def client(msg, context):
        if msg.metadata.message_type == "evaluate":
            evaluated.append(msg)
        if msg.metadata.message_type == "train":
            seen.append(msg)
            round_ = msg.content[wire.CONFIG][wire.SERVER_ROUND]
            if context.node_id == 1002 and round_ == 2:
                raise RuntimeError("node 1002 went away")
        return app(msg, context)

    config = {
        "algorithm": "dpsgd",
        "num-server-rounds": 3,
        "local-steps": 2,
        "model": "mlp",
        "seed": 1,
        "plot": False,
        "output-dir": str(tmp_path),
    }
    result, path, _ = run_inprocess(config, num_nodes=4, client_app=client)
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    assert [r["train-replies"] for r in rows[1:]] == [4, 3, 4]
    for row in rows[1:]:
        assert row["train-consensus-distance"] > 0
        assert row["node-accuracy-mean"] is not None
    # A ring of 4 (W = 1/3 on the closed neighbourhoods): 1 - 1/3; without
    # vertex 2 in round 3 the graph is the path 1-0-3 (eigenvalues 1, 2/3, 0).
    gaps = [r["train-spectral-gap"] for r in rows[1:]]
    assert gaps == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert rows[1]["train-gossip-bytes-per-node"] == 0  # nothing to mix yet
    assert rows[2]["train-gossip-edges"] == 4
    assert rows[3]["train-gossip-edges"] == 2  # vertex 2 failed: out of the ring
    third = [m for m in seen if m.content[wire.CONFIG][wire.SERVER_ROUND] == 3]
    neighbours = {
        m.metadata.dst_node_id: len(m.content[wire.CONFIG][wire.GOSSIP_WEIGHTS]) - 1
        for m in third
    }
    assert neighbours == {1000: 2, 1001: 1, 1002: 0, 1003: 1}  # the path 1-0-3
    assert all(np.isfinite(a.numpy()).all() for a in result.arrays.values())
    last = result.evaluate_metrics_clientapp[3]
    assert 0 <= last["node-accuracy-min"] <= last["node-accuracy-mean"]
    # Nodes evaluate their own models: nothing global is sent, but the initial
    # model to the node that failed in round 2 (it ignores it: it holds its own).
    sent = {
        (m.content[wire.CONFIG][wire.SERVER_ROUND], m.metadata.dst_node_id)
        for m in evaluated
        if len(m.content[wire.ARRAYS])
    }
    assert len(evaluated) == 3 * 4 and sent == {(2, 1002)}


def test_the_time_varying_matching_is_redrawn_each_round_from_the_seed():
    strategy = DPSGD(topology="matching", seed=4)
    rounds = [strategy.graph(r, 8) for r in (1, 2, 3)]
    assert all(g.sum(axis=1).tolist() == [1] * 8 for g in rounds)
    assert not np.array_equal(rounds[0], rounds[1])
    np.testing.assert_array_equal(
        DPSGD(topology="matching", seed=4).graph(2, 8), rounds[1]
    )
    fixed = DPSGD(topology="regular", degree=3, seed=4)
    np.testing.assert_array_equal(fixed.graph(1, 8), fixed.graph(9, 8))


def test_a_user_edge_list_is_the_graph():
    strategy = DPSGD(topology="edges", edges="0-1, 1-2, 2-3")
    assert strategy.graph(1, 4).sum() == 6
    with pytest.raises(ValueError, match=r"dpsgd\.edges"):
        DPSGD(topology="edges")
    with pytest.raises(ValueError, match=r"dpsgd\.edges"):
        DPSGD(edges="0:1")


def test_flowers_own_start_drives_it_as_bouquets_driver_does():
    from bouquet.strategies.driver import Driver
    from tests.strategies.test_flower_native import _start

    flower = _start(DPSGD(), rounds=3)
    bouquet = _start(DPSGD(), driver=Driver(), rounds=3)
    for key, value in flower.arrays.items():
        np.testing.assert_array_equal(value.numpy(), bouquet.arrays[key].numpy())
    assert flower.evaluate_metrics_clientapp[3]["node-accuracy-min"] > 0.5
