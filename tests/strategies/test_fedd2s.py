"""FedD2S's server: the head's step by hand, the schedule, soft labels per node."""

import numpy as np
import pytest

from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedd2s import (
    SOFT_LABELS,
    UPLOAD,
    FedD2S,
    cut_shape,
    softmax,
    train_head,
)
from bouquet.strategies.validation import ClientReply

# An MLP's entries: 6 -> 5 -> 4 -> 3 classes (weights and biases).
SPEC = {
    "0.weight": ((5, 6), "float32"),
    "0.bias": ((5,), "float32"),
    "2.weight": ((4, 5), "float32"),
    "2.bias": ((4,), "float32"),
    "4.weight": ((3, 4), "float32"),
    "4.bias": ((3,), "float32"),
}


def test_one_head_step_by_hand():
    # Prepare: zero head, two samples, two classes: every softmax is (1/2, 1/2).
    h = np.array([[1.0, 0.0], [0.0, 2.0]])
    y = np.array([0, 1])
    z = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])  # teacher (1/2, 1/2), (3/4, 1/4)
    head = {"w": np.zeros((2, 2)), "b": np.zeros(2)}
    # Execute
    new = train_head(head, h, y, z, temperature=1.0, beta=2.0, steps=1, lr=0.5)
    # Assert: grad_a = softmax(a) - onehot + beta T (softmax(a/T) - teacher), / n;
    # step = lr / max(1, mean ||h||^2) = 0.5 / 2.5.
    grad = np.array([[-0.5, 0.5], [0.5, -0.5]]) + 2.0 * np.array(
        [[0.0, 0.0], [-0.25, 0.25]]
    )
    grad /= 2
    step = 0.5 / 2.5
    np.testing.assert_allclose(new["w"], -step * grad.T @ h, rtol=1e-6)
    np.testing.assert_allclose(new["b"], -step * grad.sum(axis=0), rtol=1e-6)


def test_the_cut_moves_one_layer_shallower_every_drop_every_rounds():
    strategy = FedD2S(deepest_cut=1, shallowest_cut=3, drop_every=2)
    assert [strategy.cut(r) for r in range(1, 8)] == [1, 1, 2, 2, 3, 3, 3]


def test_cut_shape_counts_weighted_layers_from_the_output():
    assert cut_shape(SPEC, 1) == (4, 3)
    assert cut_shape(SPEC, 2) == (5, 3)
    with pytest.raises(ValueError, match="shallowest-cut"):
        cut_shape(SPEC, 3)  # nothing would be left below the cut


def test_a_dropping_set_upside_down_is_refused():
    with pytest.raises(ValueError, match="shallowest-cut"):
        FedD2S(deepest_cut=2, shallowest_cut=1)


def test_aggregate_trains_the_head_and_keeps_each_nodes_soft_labels():
    # Prepare
    strategy = FedD2S(samples=2, head_steps=3, temperature=2.0)
    arrays = {k: np.zeros(shape, np.float32) for k, (shape, _) in SPEC.items()}
    ctx = RoundContext(1, None, "train", (5, 6), (5, 6), arrays, {})
    rng = np.random.default_rng(0)
    uploads = [
        {
            "ids": np.array([3, 1]),
            "labels": np.array([0, 2]),
            "features": rng.normal(size=(2, 4)).astype(np.float32),
            "logits": rng.normal(size=(2, 3)).astype(np.float32),
        }
        for _ in range(2)
    ]
    replies = [
        ClientReply(
            node=n, partition=i, num_examples=2, metrics={}, records={UPLOAD: u}
        )
        for i, (n, u) in enumerate(zip((5, 6), uploads, strict=True))
    ]
    # Execute
    new = strategy.aggregate(replies, ctx)
    # Assert: arrays untouched; the head is the one trained on both uploads.
    assert all(np.array_equal(new[k], arrays[k]) for k in arrays)
    head = train_head(
        {"w": np.zeros((3, 4)), "b": np.zeros(3)},
        np.concatenate([u["features"] for u in uploads]),
        np.array([0, 2, 0, 2]),
        np.concatenate([u["logits"] for u in uploads]),
        temperature=2.0,
        beta=1.0,
        steps=3,
        lr=0.5,
    )
    state = strategy.state["fedd2s"]
    np.testing.assert_allclose(state["heads"]["1"]["w"], head["w"], rtol=1e-6)
    want = softmax((uploads[1]["features"] @ head["w"].T + head["b"]) / 2.0)
    np.testing.assert_allclose(state["pending"]["6"]["probs"], want, rtol=1e-5)
    # The next round sends node 6 its soft labels keyed by its sample ids.
    ctx2 = RoundContext(2, None, "train", (5, 6), (), arrays, {})
    plan = strategy.recipients(ctx2)
    record = plan[6][SOFT_LABELS]
    assert list(record.keys()) == ["3", "1"]
    np.testing.assert_allclose(record["1"].numpy(), want[1], rtol=1e-6)
    spec = strategy.record_specs(ctx2, {})[UPLOAD]
    assert spec["features"] == ((2, 4), "float32") and spec["ids"] == ((2,), "int64")
