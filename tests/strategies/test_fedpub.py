"""FED-PUB: similarities, personalised weights and per-node models on hand-made replies."""

import numpy as np
import pytest

from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedpub import (
    EMBEDDING,
    EMBEDDING_KEY,
    STATE,
    FedPub,
    aggregation_weights,
    cosine_similarity,
)
from bouquet.strategies.validation import ClientReply

# Nodes 0 and 1 respond alike on the proxy graph, node 2 orthogonally.
EMBEDDINGS = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
MODELS = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 20.0]])
SIZES = (1, 1, 2)


def _ctx(nodes=(10, 11, 12)):
    return RoundContext(
        server_round=1,
        num_rounds=None,
        phase="train",
        nodes=nodes,
        sampled=nodes,
        arrays={
            "w": np.zeros(2, np.float32),
            "w.mask": np.ones(2, np.float32),
            "steps": np.zeros((), np.int64),
        },
        config={},
        personal=("w.mask",),
    )


def _replies():
    return [
        ClientReply(
            node=10 + i,
            partition=i,
            num_examples=SIZES[i],
            metrics={},
            arrays={"w": MODELS[i].astype(np.float32), "steps": np.array(i)},
            records={EMBEDDING: {EMBEDDING_KEY: EMBEDDINGS[i]}},
        )
        for i in range(3)
    ]


def test_cosine_similarity_by_hand():
    s = cosine_similarity(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    np.testing.assert_allclose(s[0], [1.0, 1 / np.sqrt(2), 0.0])  # zero row: 0
    np.testing.assert_allclose(s, s.T)


def test_exp_weights_are_a_softmax_of_tau_times_similarity():
    s = np.array([[1.0, 0.0], [0.0, 1.0]])
    tau = np.log(3.0)  # exp(tau) = 3
    np.testing.assert_allclose(
        aggregation_weights(s, tau), [[0.75, 0.25], [0.25, 0.75]]
    )
    # tau = 0: no personalisation, the unweighted mean
    np.testing.assert_allclose(aggregation_weights(s, 0.0), np.full((2, 2), 0.5))
    # tau large: each node keeps its own model
    np.testing.assert_allclose(aggregation_weights(s, 1e4), np.eye(2), atol=1e-12)


def test_cosine_weights_are_row_normalised_similarities():
    s = np.array([[1.0, 0.5], [0.5, 1.0]])
    np.testing.assert_allclose(
        aggregation_weights(s, 10.0, "cosine"), [[2 / 3, 1 / 3], [1 / 3, 2 / 3]]
    )
    # a row summing to <= 0 falls back to uniform
    bad = np.array([[0.0, 0.0], [-1.0, 0.5]])
    np.testing.assert_allclose(aggregation_weights(bad, 1.0, "cosine")[1], [0.5, 0.5])


def test_each_node_gets_its_similarity_weighted_model_and_the_global_is_fedavg():
    # Prepare: tau = ln 3, S = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    strategy = FedPub(norm_scale=float(np.log(3.0)))
    ctx = _ctx()
    # Execute
    global_arrays = strategy.aggregate(_replies(), ctx)
    # Assert: global = examples-weighted mean (1, 1, 2)
    w_g = (MODELS[0] + MODELS[1] + 2 * MODELS[2]) / 4
    np.testing.assert_allclose(global_arrays["w"], w_g, rtol=1e-6)
    # alpha_0 = (3, 3, 1) / 7, alpha_2 = (1, 1, 3) / 5
    models = strategy.state[STATE]["models"]
    want_0 = (3 * MODELS[0] + 3 * MODELS[1] + MODELS[2]) / 7
    want_2 = (MODELS[0] + MODELS[1] + 3 * MODELS[2]) / 5
    np.testing.assert_allclose(models["10"]["w"], want_0, rtol=1e-6)
    np.testing.assert_allclose(models["11"]["w"], want_0, rtol=1e-6)
    np.testing.assert_allclose(models["12"]["w"], want_2, rtol=1e-6)
    assert models["10"]["w"].dtype == np.float32
    # personal and integer entries are not mixed: the global (server's) value
    np.testing.assert_array_equal(models["12"]["w.mask"], global_arrays["w.mask"])
    np.testing.assert_array_equal(models["12"]["steps"], global_arrays["steps"])
    metrics = strategy.train_metrics(_replies(), ctx)
    assert metrics["fedpub-self-weight"] == pytest.approx((3 / 7 * 2 + 3 / 5) / 3)
    assert metrics["fedpub-similarity"] == pytest.approx(2 / 6)


def test_nodes_absent_from_a_round_keep_their_model_and_get_it_next():
    # Prepare
    strategy = FedPub()
    strategy.aggregate(_replies(), _ctx())
    kept = strategy.state[STATE]["models"]["12"]["w"].copy()
    # Execute: a round where only nodes 10 and 11 reply
    strategy.aggregate(_replies()[:2], _ctx(nodes=(10, 11)))
    # Assert
    np.testing.assert_array_equal(strategy.state[STATE]["models"]["12"]["w"], kept)
    sent = strategy.node_arrays(12)
    np.testing.assert_array_equal(sent["w"].numpy(), kept)
    assert strategy.node_arrays(99) is None  # never replied: the global model


def test_the_embedding_record_is_sized_by_the_classifier_input():
    ctx = _ctx()
    ctx.arrays = {
        "conv.weight": np.zeros((4, 3), np.float32),
        "clsif.weight": np.zeros((7, 5), np.float32),
        "clsif.bias": np.zeros(7, np.float32),
    }
    specs = FedPub().record_specs(ctx, {})
    assert specs == {EMBEDDING: {EMBEDDING_KEY: ((5,), "float32")}}
