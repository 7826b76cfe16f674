"""FedSpeed's client hooks: golden numbers for one perturbed step, reductions, state."""

import math

import numpy as np
import pytest
import torch

from bouquet.clientapps.hooks import ClipGradNorm, ProximalTerm, SharpnessAwareStep
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.fedspeed import ProxCorrection, make_hooks
from bouquet.clientapps.state import load_arrays, save_arrays

# One example x = (1, 0), label 0, W = 0: logits (0, 0), p = (.5, .5), so
# g1 = (p - e_0) x^T = [[-.5, 0], [.5, 0]] and ||g1|| = 1/sqrt(2). The radius
# rho = ln(3)/sqrt(2) makes e = rho g1/||g1|| = [[-ln3/2, 0], [ln3/2, 0]]: the
# perturbed logits are (-ln3/2, ln3/2), p' = (1/4, 3/4), g2 = [[-.75, 0], [.75, 0]].
RHO = math.log(3.0) / math.sqrt(2.0)
G1 = np.array([[-0.5, 0.0], [0.5, 0.0]])
G2 = np.array([[-0.75, 0.0], [0.75, 0.0]])
H = np.array([[1.0, 2.0], [3.0, 4.0]])


def one_step(config, state=None, lr=0.1, weight_decay=0.0):
    model = torch.nn.Linear(2, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    data = (torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    settings = TrainSettings(batch_size=1, lr=lr, weight_decay=weight_decay)
    train_local(
        model,
        data,
        settings,
        make_hooks(config),
        generator=torch.Generator().manual_seed(0),
        config=config,
        state=state if state is not None else {},
    )
    return model.weight.detach().numpy().astype(np.float64)


def cfg(**values):
    return {f"fedspeed.{k}": v for k, v in values.items()}


def test_golden_perturbed_step_first_round():
    # h = 0, x^t = 0: the correction and the extra weight decay vanish.
    w = one_step(cfg(rho=RHO, **{"lambda": 0.1}))
    np.testing.assert_allclose(w, -0.1 * G2, atol=1e-6)


def test_golden_perturbed_step_with_correction_and_alpha():
    state = {}
    save_arrays(state, "fedspeed", "h", {"weight": H})
    # alpha = .5: g = .5 g1 + .5 g2; direction = g + lambda (h - x^t), x^t = 0.
    w = one_step(cfg(rho=RHO, alpha=0.5, **{"lambda": 0.1}), state=state)
    expected = -0.1 * (0.5 * G1 + 0.5 * G2 + 0.1 * H)
    np.testing.assert_allclose(w, expected, atol=1e-6)
    # h_i <- h_i + Delta_i (Delta = w - 0), saved in the node state.
    np.testing.assert_allclose(
        load_arrays(state, "fedspeed", "h")["weight"], H + expected, atol=1e-6
    )


def test_clip_covers_the_correction_and_weight_decay_comes_after():
    state = {}
    save_arrays(state, "fedspeed", "h", {"weight": H})
    w = one_step(cfg(rho=RHO, **{"lambda": 0.1, "max-grad-norm": 0.5}), state=state)
    direction = G2 + 0.1 * H  # norm sqrt(1.725) > 0.5
    expected = -0.1 * direction * 0.5 / np.linalg.norm(direction)
    np.testing.assert_allclose(w, expected, atol=1e-6)


def test_sent_corrected_model_is_y_plus_h():
    state = {}
    save_arrays(state, "fedspeed", "h", {"weight": H})
    w = one_step(cfg(rho=RHO, **{"lambda": 0.1, "server-rule": "sampled"}), state=state)
    y = -0.1 * (G2 + 0.1 * H)
    np.testing.assert_allclose(w, y + (H + y), atol=1e-6)


def _train(hooks, config=None, state=None, rounds=1, settings=None):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    settings = settings or TrainSettings(
        epochs=2, batch_size=10, lr=0.1, momentum=0.9, weight_decay=1e-3
    )
    for r in range(rounds):
        train_local(
            model,
            (x, y),
            settings,
            hooks() if callable(hooks) else hooks,
            generator=torch.Generator().manual_seed(2 + r),
            config=config or {},
            state=state if state is not None else {},
        )
    return model.state_dict()


def test_rho_zero_lambda_zero_is_plain_sgd_exactly():
    plain = _train([])
    speed = _train(make_hooks(cfg(rho=0.0, alpha=1.0, **{"lambda": 0.0})))
    for key, value in plain.items():
        torch.testing.assert_close(value, speed[key], rtol=0, atol=0)


def test_rho_zero_first_round_is_fedprox_with_mu_lambda():
    # h = 0: lambda (h - x^t) + lambda y = lambda (y - x^t), FedProx's gradient.
    prox = _train([ProximalTerm(mu=0.3)])
    speed = _train(make_hooks(cfg(rho=0.0, **{"lambda": 0.3})))
    for key, value in prox.items():
        torch.testing.assert_close(value, speed[key], rtol=1e-5, atol=1e-6)


def test_alpha_zero_takes_the_unperturbed_gradient():
    plain = _train([])
    speed = _train([SharpnessAwareStep(rho=0.5, alpha=0.0)])
    for key, value in plain.items():
        torch.testing.assert_close(value, speed[key], rtol=1e-5, atol=1e-6)
    perturbed = _train([SharpnessAwareStep(rho=0.5)])
    assert not torch.allclose(plain["0.weight"], perturbed["0.weight"])


def test_h_accumulates_the_updates_across_rounds():
    state = {}
    config = cfg(rho=0.05, **{"lambda": 0.1, "max-grad-norm": 10.0})
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    model = torch.nn.Linear(5, 3)
    deltas = []
    for r in range(3):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train_local(
            model,
            (x, y),
            TrainSettings(batch_size=10, lr=0.1),
            make_hooks(config),
            generator=torch.Generator().manual_seed(r),
            config=config,
            state=state,
        )
        deltas.append({k: model.state_dict()[k] - before[k] for k in before})
    h = load_arrays(state, "fedspeed", "h")
    assert set(h) == {"weight", "bias"}
    for key in h:
        np.testing.assert_allclose(
            h[key], sum(d[key] for d in deltas).numpy(), atol=1e-6
        )


def test_recipe_order_and_validation():
    hooks = make_hooks(cfg(rho=0.1, **{"lambda": 0.1, "max-grad-norm": 10.0}))
    assert [type(h) for h in hooks] == [
        SharpnessAwareStep,
        ProxCorrection,
        ClipGradNorm,
    ]
    with pytest.raises(ValueError, match="rho"):
        SharpnessAwareStep(rho=-1.0)
