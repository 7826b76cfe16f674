"""The shared SAM-style step and gradient-clip hooks on their own."""

import math

import numpy as np
import torch

from bouquet.clientapps.hooks import ClipGradNorm, SharpnessAwareStep
from bouquet.clientapps.loop import TrainSettings, train_local


def _step(hooks, lr=0.1):
    # x = (1, 0), label 0, W = 0 (see test_fedspeed_recipe for the derivation).
    model = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    calls = []
    forward = model.forward
    model.forward = lambda x: (calls.append(1), forward(x))[1]
    train_local(
        model,
        (torch.tensor([[1.0, 0.0]]), torch.tensor([0])),
        TrainSettings(batch_size=1, lr=lr),
        hooks,
        generator=torch.Generator().manual_seed(0),
    )
    return model.weight.detach().numpy(), len(calls)


def test_sam_step_uses_the_gradient_at_the_ascent_point():
    w, passes = _step([SharpnessAwareStep(rho=math.log(3.0) / math.sqrt(2.0))])
    np.testing.assert_allclose(w, [[0.075, 0.0], [-0.075, 0.0]], atol=1e-6)
    assert passes == 2


def test_sam_with_rho_zero_is_one_plain_pass():
    w, passes = _step([SharpnessAwareStep(rho=0.0)])
    np.testing.assert_allclose(w, [[0.05, 0.0], [-0.05, 0.0]], atol=1e-7)
    assert passes == 1


def test_clip_grad_norm():
    # g = [[-.5, 0], [.5, 0]], ||g|| = 1/sqrt(2); clipped to .1
    w, _ = _step([ClipGradNorm(0.1)], lr=1.0)
    np.testing.assert_allclose(w, [[0.1, 0], [-0.1, 0]] / np.sqrt(2), atol=1e-6)
    w, _ = _step([ClipGradNorm(0.0)], lr=1.0)
    np.testing.assert_allclose(w, [[0.5, 0.0], [-0.5, 0.0]], atol=1e-7)
