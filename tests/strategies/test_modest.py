"""MoDeST: the hash sampler, the two hops by hand, failures, then a run that loses half."""

import hashlib
import json
import math
from types import SimpleNamespace

import numpy as np
import torch

from bouquet.clientapps.recipes.dpsgd import make_hooks
from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies.context import RoundContext
from bouquet.strategies.modest import MoDeST, sample_order
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire

NODES = tuple(range(100, 108))
ZERO = {"weight": np.zeros((1, 3), np.float32)}


def _ctx(server_round, nodes=NODES):
    return RoundContext(
        server_round=server_round,
        num_rounds=None,
        phase="train",
        nodes=tuple(nodes),
        sampled=(),
        arrays=ZERO,
        config={wire.SERVER_ROUND: server_round},
    )


def _reply(node, value):
    model = {"weight": np.full((1, 3), value, np.float32)}
    return ClientReply(node, 0, 10, {}, model, {wire.GOSSIP_MODEL: model})


def _mix(content):
    """What the node's gossip recipe makes of a message (no local step)."""
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(content[wire.ARRAYS]["weight"].numpy()))
    run = SimpleNamespace(
        model=model, incoming=content, reply_records={}, state={}, stop=False
    )
    (hook,) = make_hooks(content[wire.CONFIG])
    hook.setup(run)
    hook.finish(run)
    return run.reply_records[wire.GOSSIP_MODEL]["weight"].numpy(), run.stop


def test_the_sample_is_the_first_s_nodes_in_sha256_order():
    def digest(node, k):
        return hashlib.sha256(f"7|{node}|{k}".encode()).hexdigest()

    expected = sorted(NODES, key=lambda n: digest(n, 3))
    assert sample_order(NODES, 7, 3) == expected
    assert sample_order(reversed(NODES), 7, 3) == expected  # any view order
    assert sample_order(NODES, 7, 4) != expected  # redrawn every round
    strategy = MoDeST(sample_size=3, seed=7)
    strategy.state["modest"]["failed"] = [expected[1]]
    assert strategy.sample_of(_ctx(6)) == [expected[0], *expected[2:4]]  # k = 3


def test_the_two_hops_by_hand():
    # Prepare
    strategy = MoDeST(sample_size=5, success_fraction=0.8, seed=1)  # keeps 4 of 5
    # Execute: round 1, "round 0"'s aggregator forwards the initial model.
    first = _ctx(1)
    (forwarder,) = strategy.recipients(first)
    strategy.aggregate([_reply(forwarder, 0.0)], first)
    # Round 2: Sample(1) trains it.
    train = _ctx(2)
    plan = strategy.recipients(train)
    sample = sample_order(NODES, 1, 1)[:5]
    assert list(plan) == sample
    replies = [_reply(n, float(i + 1)) for i, n in enumerate(sample)]
    average = strategy.aggregate(replies, train)
    # Round 3: the first kept trainer averages the 4 kept models.
    hop = _ctx(3)
    ((aggregator, content),) = strategy.recipients(hop).items()
    mixed, stopped = _mix(content)
    # Assert
    np.testing.assert_allclose(average["weight"], np.full((1, 3), 2.5))  # (1+2+3+4)/4
    assert aggregator == sample[0] and stopped  # no local step in this hop
    assert content[wire.CONFIG][wire.GOSSIP_WEIGHTS] == [0.0] + [0.25] * 4
    np.testing.assert_allclose(mixed, np.full((1, 3), 2.5))
    strategy.aggregate([_reply(aggregator, 2.5)], hop)
    plan = strategy.recipients(_ctx(4))  # Sample(2) trains the aggregate
    assert list(plan) == sample_order(NODES, 1, 2)[:5]
    for content in plan.values():
        np.testing.assert_allclose(content[wire.ARRAYS]["weight"].numpy(), 2.5)
    metrics = strategy.train_metrics(replies, train)
    assert metrics["modest-transfers"] == 5  # one model to each trainer
    assert metrics["gossip-bytes-per-node"] == 5 * 12 / len(NODES)
    assert math.isclose(metrics["consensus-distance"], 3 * 2.0)  # var of 1..5, x3


def test_silent_nodes_leave_the_view_and_a_lost_aggregator_is_skipped():
    strategy = MoDeST(sample_size=4, success_fraction=1.0, seed=2)
    first = _ctx(1)
    (forwarder,) = strategy.recipients(first)
    strategy.aggregate([_reply(forwarder, 1.0)], first)
    train = _ctx(2)
    sample = list(strategy.recipients(train))
    strategy.aggregate([_reply(n, 3.0) for n in sample[1:]], train)  # one silent
    assert strategy.state["modest"]["failed"] == [sample[0]]
    hop = _ctx(3)
    ((aggregator, content),) = strategy.recipients(hop).items()
    assert aggregator == sample[1]
    assert len(content[wire.CONFIG][wire.GOSSIP_WEIGHTS]) == 4  # three models
    strategy.skipped(hop)  # the aggregator failed too
    plan = strategy.recipients(_ctx(4))
    assert not {sample[0], sample[1]} & set(plan)
    for content in plan.values():  # the last aggregate that arrived
        np.testing.assert_allclose(content[wire.ARRAYS]["weight"].numpy(), 1.0)


def test_a_run_goes_on_after_half_the_nodes_die(tmp_path):
    from bouquet.clientapps.app import app

    dead = set()

    def client(msg, context):
        if msg.content[wire.CONFIG][wire.SERVER_ROUND] >= 3:
            dead.update({1000, 1001})  # half of the four nodes stop replying
        if context.node_id in dead:
            raise RuntimeError("node killed")
        return app(msg, context)

    config = {
        "algorithm": "modest",
        "num-server-rounds": 6,
        "local-steps": 2,
        "model": "mlp",
        "seed": 1,
        "plot": False,
        "fraction-evaluate": 0.0,
        "modest.sample-size": 3,
        "output-dir": str(tmp_path),
    }
    result, path, _ = run_inprocess(config, num_nodes=4, client_app=client)
    rows = json.loads((path / "metrics.json").read_text())["rounds"][1:]
    assert all(np.isfinite(a.numpy()).all() for a in result.arrays.values())
    # Rounds 5 and 6 sample only the two live nodes: nothing is lost any more.
    assert [r["train-replies"] for r in rows[4:]] == [1, 2]
    assert rows[-1]["train-modest-view"] == 2
