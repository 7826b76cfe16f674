"""EF21-W's client half: ``L_i`` against the closed form, the scaled error feedback.

Richtarik, Gasanov, Burlachenko, "Error Feedback Reloaded", ICLR 2024,
https://arxiv.org/abs/2402.10774: the logistic loss's smoothness constant
``L_i = lambda_max(A_i^T A_i) / (4 m_i)`` (plus the L2 coefficient), and the
client's ``c'_i = C(v_i / L_i - h_i)`` with ``h_i <- h_i + c'_i``.
"""

import numpy as np
import torch

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.ef21 import logistic_smoothness, make_hooks
from bouquet.clientapps.state import load_arrays
from bouquet.tasks import wire
from tests.clientapps.test_ef21_recipe import LR, X, Y, gradient


def test_smoothness_of_a_tiny_set_is_the_closed_form():
    # A = [x, 1] = [[1, 1], [-1, 1], [2, 1], [-2, 1]]: A^T A = diag(10, 4).
    x = torch.tensor([[1.0], [-1.0], [2.0], [-2.0]])
    assert logistic_smoothness(x) == 10.0 / (4 * 4)
    assert logistic_smoothness(x, weight_decay=0.01) == 10.0 / 16 + 0.01
    # ||A||_2^2 / (4 m), the brief's form, on both sides of the m < d switch.
    for shape in [(9, 3), (2, 5), (3, 2, 2)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        a = np.concatenate([x.reshape(len(x), -1).numpy(), np.ones((len(x), 1))], 1)
        expected = np.linalg.norm(a.astype(np.float64), 2) ** 2 / (4 * len(x))
        np.testing.assert_allclose(logistic_smoothness(x), expected, rtol=1e-10)


def test_smoothness_is_the_logistic_hessian_at_zero():
    # At w = 0 the sigmoid's slope is exactly 1/4: the bound is attained.
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(2))
    y = (torch.arange(12) % 2).to(torch.float64)
    a = torch.cat([x.to(torch.float64), torch.ones(12, 1, dtype=torch.float64)], 1)

    def loss(w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(a @ w, y)

    hessian = torch.autograd.functional.hessian(loss, torch.zeros(4, dtype=a.dtype))
    top = float(torch.linalg.eigvalsh(hessian)[-1])
    np.testing.assert_allclose(logistic_smoothness(x), top, rtol=1e-10)


def _round(w, b, config, state):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(w))
        model.bias.copy_(torch.as_tensor(b))
    result = train_local(
        model,
        (torch.as_tensor(X), torch.as_tensor(Y)),
        TrainSettings(batch_size=64, lr=LR, momentum=0.0, max_steps=1),
        make_hooks(config),
        generator=torch.Generator().manual_seed(0),
        config=config,
        state=state,
    )
    record = result.run.reply_records[wire.ARRAYS]
    return {k: a.numpy() for k, a in record.items()}, result.run.metrics


def test_three_rounds_of_scaled_topk_error_feedback_match_the_reference():
    config = {"ef21.compressor": "topk", "ef21.k": 3, "ef21.smoothness": "logistic"}
    smoothness = logistic_smoothness(torch.as_tensor(X))
    rng = np.random.default_rng(4)
    state: dict = {}
    h = np.zeros(8)
    for _ in range(3):
        w = rng.standard_normal((2, 3)).astype(np.float32)
        b = rng.standard_normal(2).astype(np.float32)
        payload, metrics = _round(w, b, config, state)
        assert metrics["ef21.smoothness"] == smoothness
        target = -LR * gradient(w.astype(np.float64), b.astype(np.float64))
        target = target / smoothness - h
        # A Top-3 of the target (the softmax gradient's rows are opposite, so
        # magnitudes tie up to the model's float32 rounding: either is a Top-3).
        chosen = payload["indices"]
        assert len(set(chosen.tolist())) == 3 and np.all(np.diff(chosen) > 0)
        rest = np.delete(np.abs(target), chosen)
        assert np.abs(target[chosen]).min() >= rest.max() - 1e-6
        np.testing.assert_allclose(payload["values"], target[chosen], atol=1e-6)
        h[chosen] += payload["values"]
        np.testing.assert_allclose(load_arrays(state, "ef21", "g")["g"], h, atol=1e-12)
    assert load_arrays(state, "ef21", "L")["L"][0] == smoothness  # computed once


def test_uniform_smoothness_replies_as_ef21_and_reports_one():
    w, b = np.ones((2, 3), np.float32), np.zeros(2, np.float32)
    plain, plain_metrics = _round(w, b, {"ef21.k": 2}, {})
    state: dict = {}
    config = {"ef21.k": 2, "ef21.smoothness": "uniform"}
    weighted, metrics = _round(w, b, config, state)
    assert "ef21.smoothness" not in plain_metrics and metrics["ef21.smoothness"] == 1
    for key in plain:
        np.testing.assert_array_equal(weighted[key], plain[key])
    assert load_arrays(state, "ef21", "L") is None
