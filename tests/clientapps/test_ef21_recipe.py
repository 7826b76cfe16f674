"""EF21's client hook against a step-by-step NumPy reference on a tiny model.

One full-batch SGD step of a linear softmax model: ``v_i = -lr grad f_i(x)``
computed by hand, then ``c = TopK(v - g)``, ``g <- g + c`` over three rounds
(``g`` kept in ``Context.state``); with the identity compressor the reply is
the gradient step itself (EF21 reduces to gradient descent).
"""

import numpy as np
import pytest
import torch

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.ef21 import EF21Uplink, make_hooks
from bouquet.clientapps.state import load_arrays, save_arrays
from bouquet.tasks import compression, wire

RNG = np.random.default_rng(0)
X = RNG.standard_normal((6, 3)).astype(np.float32)
Y = np.array([0, 1, 1, 0, 1, 0])
LR = 0.3


def gradient(w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean cross-entropy gradient of ``softmax(X w^T + b)``, flattened (w, b)."""
    logits = X.astype(np.float64) @ w.T + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(Y)), Y] -= 1.0
    p /= len(Y)
    return np.concatenate([(p.T @ X).reshape(-1), p.sum(axis=0)])


def client_round(w, b, config, state):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(w))
        model.bias.copy_(torch.as_tensor(b))
    settings = TrainSettings(batch_size=64, lr=LR, momentum=0.0, max_steps=1)
    result = train_local(
        model,
        (torch.as_tensor(X), torch.as_tensor(Y)),
        settings,
        make_hooks(config),
        generator=torch.Generator().manual_seed(0),
        config=config,
        state=state,
    )
    record = result.run.reply_records[wire.ARRAYS]
    return {k: a.numpy() for k, a in record.items()}


def test_three_rounds_of_topk_error_feedback_match_the_reference():
    config = {"ef21.compressor": "topk", "ef21.k": 3}
    state: dict = {}
    g = np.zeros(8)
    for _ in range(3):
        w = RNG.standard_normal((2, 3)).astype(np.float32)
        b = RNG.standard_normal(2).astype(np.float32)
        payload = client_round(w, b, config, state)
        v = -LR * gradient(w.astype(np.float64), b.astype(np.float64))
        target = v - g
        chosen = np.sort(np.argsort(-np.abs(target), kind="stable")[:3])
        np.testing.assert_array_equal(payload["indices"], chosen)
        assert payload["indices"].dtype == np.int32
        assert payload["values"].dtype == np.float32
        np.testing.assert_allclose(payload["values"], target[chosen], atol=1e-6)
        g[chosen] += payload["values"]
        saved = load_arrays(state, "ef21", "g")["g"]
        np.testing.assert_allclose(saved, g, atol=1e-12)
    assert np.count_nonzero(g) <= 8


def test_identity_reply_is_the_gradient_step():
    config = {"ef21.compressor": "identity"}
    state: dict = {}
    w, b = np.ones((2, 3), np.float32), np.zeros(2, np.float32)
    for _ in range(2):  # g_i = v after round 1; round 2 sends v - g_i = 0
        payload = client_round(w, b, config, state)
    np.testing.assert_allclose(payload["values"], 0.0, atol=1e-7)
    g = load_arrays(state, "ef21", "g")["g"]
    np.testing.assert_allclose(g, -LR * gradient(w, b), atol=1e-6)


@pytest.mark.parametrize("name", compression.NAMES)
def test_every_compressor_replies_with_its_declared_payload(name):
    config = {"ef21.compressor": name, "ef21.k": 2, "ef21.levels": 4}
    w, b = np.ones((2, 3), np.float32), np.zeros(2, np.float32)
    payload = client_round(w, b, config, {})
    (hook,) = make_hooks(config)
    assert isinstance(hook, EF21Uplink)
    spec = hook.compressor.spec(8)
    assert {k: (v.shape, str(v.dtype)) for k, v in payload.items()} == spec
    assert hook.compressor.alpha(8) is not None  # contractive, as EF21 needs


def test_a_state_of_another_shape_starts_from_zero():
    state = {}
    config = {"ef21.compressor": "identity"}
    w, b = np.ones((2, 3), np.float32), np.zeros(2, np.float32)
    save_arrays(state, "ef21", "g", {"g": np.ones(5)})
    payload = client_round(w, b, config, state)
    np.testing.assert_allclose(payload["values"], -LR * gradient(w, b), atol=1e-6)
