"""FAL's adversarial step against a step-by-step PGD + SGD reference."""

import numpy as np
import pytest
import torch
from torch.nn import functional

from bouquet.clientapps.attacks import LabelFlip
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.fal import AdversarialStep, make_hooks
from bouquet.tasks.wire import derive_seed

N, D, C = 6, 4, 3


def _data():
    g = torch.Generator().manual_seed(5)
    return torch.rand(N, D, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(D, C)


def _train(hooks, epochs=1):
    model = _model()
    settings = TrainSettings(batch_size=3, lr=0.5, epochs=epochs)
    result = train_local(
        model,
        _data(),
        settings,
        hooks,
        generator=torch.Generator().manual_seed(0),
    )
    return model, result


def reference(rho, alpha, steps, k_prop=1.0, random_start=False, flip=False):
    """PGD then SGD, written out with explicit weights."""
    x_all, y_all = _data()
    model = _model()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    low_x, high_x = float(x_all.min()), float(x_all.max())
    loop = torch.Generator().manual_seed(0)
    noise = torch.Generator().manual_seed(derive_seed(0, "fal"))
    order = torch.randperm(N, generator=loop)
    losses = []
    for start in range(0, N, 3):
        x, y = x_all[order[start : start + 3]], y_all[order[start : start + 3]]
        y = C - 1 - y if flip else y
        count = int(np.ceil(k_prop * len(x)))
        adv = x[:count].clone()
        if random_start:
            adv = adv + (2 * torch.rand(adv.shape, generator=noise) - 1) * rho
        adv = adv.clamp(low_x, high_x)
        for _ in range(steps):
            adv = adv.clone().requires_grad_(True)
            loss = functional.cross_entropy(adv @ w.T + b, y[:count])
            (grad,) = torch.autograd.grad(loss, adv)
            adv = adv.detach() + alpha * grad.sign()
            adv = torch.max(torch.min(adv, x[:count] + rho), x[:count] - rho)
            adv = adv.clamp(low_x, high_x)
        batch = torch.cat([adv, x[count:]])
        w_, b_ = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = functional.cross_entropy(batch @ w_.T + b_, y)
        gw, gb = torch.autograd.grad(loss, (w_, b_))
        w, b = w - 0.5 * gw, b - 0.5 * gb
        losses.append(float(loss.detach()))
    return w, b, losses


@pytest.mark.parametrize(
    "k_prop, random_start", [(1.0, False), (1.0, True), (0.5, True)]
)
def test_matches_step_by_step_pgd_and_sgd(k_prop, random_start):
    config = {
        "fal.rho": 0.2,
        "fal.alpha": 0.05,
        "fal.pgd-steps": 3,
        "fal.k-prop": k_prop,
        "fal.random-start": random_start,
    }
    model, result = _train(make_hooks(config))
    w, b, losses = reference(0.2, 0.05, 3, k_prop, random_start)
    torch.testing.assert_close(model.weight.detach(), w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model.bias.detach(), b, atol=1e-6, rtol=1e-6)
    assert result.loss_first == pytest.approx(losses[0], rel=1e-6)


def test_zero_radius_is_the_plain_step():
    plain, _ = _train([])
    adversarial, _ = _train([AdversarialStep(0.0, 0.05, 3)])
    torch.testing.assert_close(plain.weight, adversarial.weight, atol=0, rtol=0)


def test_perturbation_stays_in_the_ball_and_the_range():
    hook = AdversarialStep(0.3, 1.0, 2)  # large steps: projection must bite
    model = _model()
    x, y = _data()
    _, run = _train([hook])
    run = run.run
    run.model = model
    adv = hook.perturb(run, x, y)
    assert torch.all((adv - x).abs() <= 0.3 + 1e-6)
    assert adv.min() >= x.min() and adv.max() <= x.max()
    assert not torch.equal(adv, x)


def test_attacks_on_the_transformed_batch():
    # A label-flipping attacker after the recipe: PGD must see flipped labels.
    flipped = [AdversarialStep(0.2, 0.05, 2, random_start=False), LabelFlip(C)]
    model, _ = _train(flipped)
    w, _, _ = reference(0.2, 0.05, 2, flip=True)
    torch.testing.assert_close(model.weight.detach(), w, atol=1e-6, rtol=1e-6)
