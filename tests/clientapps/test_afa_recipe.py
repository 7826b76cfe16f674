"""The AFA worker: self-chosen K_i, averaged gradient, same batches as plain SGD."""

import numpy as np
import pytest
import torch

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.afa import AnarchicSteps, draw_local_steps, make_hooks

GEN = torch.Generator().manual_seed(0)
X = torch.randn(40, 3, generator=GEN)
Y = torch.randint(0, 2, (40,), generator=GEN)
SETTINGS = TrainSettings(epochs=10, batch_size=8, lr=0.2, momentum=0.0, max_steps=10)


def _model():
    torch.manual_seed(3)
    return torch.nn.Linear(3, 2)


def _run(hooks, settings=SETTINGS, seed=11):
    model = _model()
    result = train_local(
        model, (X, Y), settings, hooks, generator=torch.Generator().manual_seed(seed)
    )
    return model, result


def test_local_steps_are_drawn_from_the_seed_within_bounds():
    draws = [draw_local_steps(s, 2, 6) for s in range(400)]
    assert set(draws) == {2, 3, 4, 5, 6}
    assert draws == [draw_local_steps(s, 2, 6) for s in range(400)]
    assert {draw_local_steps(s, 4, 4) for s in range(20)} == {4}
    with pytest.raises(ValueError, match="k-min"):
        AnarchicSteps(k=3, k_min=4)


def test_reply_is_the_mean_gradient_of_the_steps_taken():
    hook = AnarchicSteps(k=10, k_min=1)
    model, result = _run([hook])
    k_i = draw_local_steps(11, 1, 10)
    assert result.steps == hook.steps == k_i
    assert result.run.metrics["afa.local-steps"] == k_i
    # Plain SGD with the same seed and K_i steps takes the same batches.
    plain, _ = _run([], TrainSettings(epochs=10, batch_size=8, lr=0.2, max_steps=k_i))
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    # Momentum 0: G = (x - y_K) / (lr * K_i)
    start = _model().state_dict()
    reply = result.run.reply_records["arrays"]
    for key, value in model.state_dict().items():
        expected = (start[key] - value) / (0.2 * k_i)
        np.testing.assert_allclose(reply[key].numpy(), expected.numpy(), atol=1e-6)


def test_unnormalised_reply_is_the_model_change():
    model, result = _run(
        make_hooks({"afa.k": 5, "afa.k-min": 5, "afa.normalize": False})
    )
    assert result.steps == 5
    start = _model().state_dict()
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(
            result.run.reply_records["arrays"][key].numpy(),
            (start[key] - value).numpy(),
            atol=1e-7,
        )
