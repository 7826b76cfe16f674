"""ClusterPFL: Ward clustering once, then a Reptile step per cluster, by hand."""

import json

import numpy as np
import pytest

from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies.clusterpfl import STATE, ClusterPFL, ward_clusters
from bouquet.strategies.context import RoundContext
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire

NODES = (10, 11, 12, 13)
W = np.array([[0.0, 0.0], [1.0, 0.0], [20.0, 20.0], [21.0, 21.0]], np.float32)


def _ctx(server_round, sampled=NODES, num_rounds=5):
    return RoundContext(
        server_round=server_round,
        num_rounds=num_rounds,
        phase="train",
        nodes=NODES,
        sampled=sampled,
        arrays={"w": np.full(2, 5.0, np.float32)},
        config={},
    )


def _reply(node, w, n=1):
    return ClientReply(
        node=node,
        partition=NODES.index(node),
        num_examples=n,
        metrics={},
        arrays={"w": np.asarray(w, np.float32)},
    )


def test_ward_clusters_cut_by_distance_or_count():
    points = np.array([[0.0], [0.5], [10.0], [10.5], [30.0]])
    assert ward_clusters(points, 2.0, 0).tolist() == [0, 0, 1, 1, 2]
    assert ward_clusters(points, 2.0, 2).tolist() == [0, 0, 0, 0, 1]
    assert ward_clusters(points[:1], 2.0, 0).tolist() == [0]


def test_clustering_round_then_reptile_steps_in_round_robin():
    # Prepare: no warm-up, so round 1 clusters
    strategy = ClusterPFL(warmup_rounds=0, meta_batch=1, meta_lr=0.5)
    ctx = _ctx(1)
    plan = strategy.recipients(ctx)
    assert sorted(plan) == list(NODES)
    replies = [_reply(n, W[i], n=1 + i) for i, n in enumerate(NODES)]

    # Execute: the clustering round
    arrays = strategy.aggregate(replies, ctx)

    # Assert: two clusters, each the sample-weighted mean of its members
    own = strategy.state[STATE]
    assert own["assignment"] == {"10": 0, "11": 0, "12": 1, "13": 1}
    theta0 = (1 * W[0] + 2 * W[1]) / 3
    theta1 = (3 * W[2] + 4 * W[3]) / 7
    np.testing.assert_allclose(own["models"]["0"]["w"], theta0, rtol=1e-6)
    np.testing.assert_allclose(own["models"]["1"]["w"], theta1, rtol=1e-6)
    np.testing.assert_allclose(arrays["w"], (theta0 + theta1) / 2, rtol=1e-6)

    # Meta round 2: one member per cluster, each sent its cluster's model
    ctx2 = _ctx(2)
    plan = strategy.recipients(ctx2)
    assert sorted(plan) == [10, 12]
    np.testing.assert_allclose(plan[12][wire.ARRAYS]["w"].numpy(), theta1, rtol=1e-6)
    phi = np.array([3.0, 3.0], np.float32)
    strategy.aggregate([_reply(10, phi)], ctx2)
    # eps_0 = 0.5 (1 - 0 / T), T = 5 - 0 - 1 = 4; cluster 1 had no reply
    np.testing.assert_allclose(
        strategy.state[STATE]["models"]["0"]["w"], theta0 + 0.5 * (phi - theta0)
    )
    np.testing.assert_allclose(strategy.state[STATE]["models"]["1"]["w"], theta1)
    metrics = strategy.train_metrics([_reply(10, phi)], ctx2)
    assert metrics == {"clusterpfl-clusters": 2.0, "clusterpfl-meta-lr": 0.5}

    # Round 3: the cursor moved on in cluster 0; eps_1 = 0.5 * (1 - 1/4)
    ctx3 = _ctx(3)
    assert sorted(strategy.recipients(ctx3)) == [11, 12]
    assert strategy.step_size(1, ctx3) == pytest.approx(0.375)


def test_a_run_clusters_and_evaluates_each_node_on_its_cluster_model(tmp_path):
    config = {
        "algorithm": "clusterpfl",
        "clusterpfl.warmup-rounds": 0,
        "clusterpfl.num-clusters": 2,
        "partitioner": "grouped",
        "num-groups": 2,
        "num-server-rounds": 2,
        "local-steps": 2,
        "finetune-steps": 2,
        "plot": False,
        "output-dir": str(tmp_path),
    }
    _, path, _ = run_inprocess(config, num_nodes=4)
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    assert rows[-1]["train-clusterpfl-clusters"] == 2
    assert 0 < rows[-1]["node-accuracy-worst10"] <= rows[-1]["node-accuracy-mean"]
