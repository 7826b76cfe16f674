"""DP-SGD on the clients (clientapps/privacy.py): steps, accounting, refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from torch import nn

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.hooks import Hook, ProximalTerm, SharpnessAwareStep
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.privacy import (
    PrivateSteps,
    calibrate,
    check_hooks,
    check_model,
    epsilon_spent,
    private_hooks,
)
from bouquet.clientapps.recipes.fedld import MarginControl
from bouquet.serverapps.settings import RunConfigError
from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies import FedAvg
from bouquet.strategies.privacy import private_training
from bouquet.strategies.validation import ClientReply, weighted_metrics
from bouquet.tasks import wire

X = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [3.0, -1.0]])
Y = torch.tensor([0, 1, 1])


def _linear() -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(2, 2)


def _seeded(seed: int = 0):
    return lambda: torch.Generator().manual_seed(seed)


def _per_example_grads(model: nn.Module, x, y, hooks=()):
    """Each example's gradient, computed one at a time by plain autograd."""
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        logits = model(x[i : i + 1])
        loss = nn.functional.cross_entropy(logits, y[i : i + 1])
        for hook in hooks:
            loss = hook.loss(None, loss, logits, x[i : i + 1], y[i : i + 1])
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


class OneByOne(PrivateSteps):
    """DP-SGD forced onto its micro-batch path."""

    def _vectorised(self, run, x, y):
        return False


@pytest.mark.parametrize("steps", [PrivateSteps, OneByOne], ids=["layers", "one"])
def test_one_step_is_the_mean_of_clipped_per_example_gradients(steps):
    # q = B / n = 1: every example joins every batch; no noise.
    clip, lr = 0.5, 0.3
    reference = _linear()
    hooks = [MarginControl(0.7)]  # FedLD's term, in its one-example version
    grads = _per_example_grads(reference, X, Y, hooks)
    expected = []
    for p, *per_example in zip(reference.parameters(), *grads, strict=True):
        total = torch.zeros_like(p)
        for g, everything in zip(per_example, grads, strict=True):
            norm = math.sqrt(sum(float((t**2).sum()) for t in everything))
            total += g * min(1.0, clip / norm)
        expected.append(p.detach() - lr * total / len(X))
    model = _linear()
    settings = TrainSettings(epochs=1, batch_size=3, lr=lr, momentum=0.0)
    train_local(
        model,
        (X, Y),
        settings,
        [*hooks, steps(clip, 0.0, 1e-5, noise=_seeded(), loss_hooks=hooks)],
        generator=torch.Generator().manual_seed(0),
    )
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e)
    assert any(
        math.sqrt(sum(float((t**2).sum()) for t in g)) > clip for g in grads
    )  # the case clips


def test_both_paths_take_the_same_noisy_steps_and_prox_terms_go_one_by_one():
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))

    def mlp():
        torch.manual_seed(2)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    settings = TrainSettings(epochs=2, batch_size=8, lr=0.2, momentum=0.5)
    margin = [MarginControl(0.3)]
    models = []
    for steps in (PrivateSteps, OneByOne):
        model = mlp()
        hook = steps(0.4, 0.8, 1e-5, noise=_seeded(9), loss_hooks=margin)
        train_local(
            model, (x, y), settings, [*margin, hook], generator=torch.Generator()
        )
        models.append(model)
        if steps is PrivateSteps:
            assert hook._fast  # the margin reads the logits only
    for a, b in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    prox = [ProximalTerm(0.1)]
    hook = PrivateSteps(0.4, 0.8, 1e-5, noise=_seeded(9), loss_hooks=prox)
    train_local(mlp(), (x, y), settings, [*prox, hook], generator=torch.Generator())
    assert hook._fast is False  # the proximal term reads the parameters


def test_without_clipping_or_noise_it_is_full_batch_gradient_descent():
    settings = TrainSettings(epochs=4, batch_size=3, lr=0.2, momentum=0.0)
    plain, private = _linear(), _linear()
    train_local(plain, (X, Y), settings, generator=torch.Generator().manual_seed(0))
    train_local(
        private,
        (X, Y),
        settings,
        [PrivateSteps(1e9, 0.0, 1e-5, noise=_seeded())],
        generator=torch.Generator().manual_seed(0),
    )
    for a, b in zip(plain.parameters(), private.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_noise_has_stdev_sigma_clip_over_batch_size():
    # A clip far below the gradients: the step is noise, sigma C / B per entry.
    model = nn.Linear(100, 100, bias=False)
    before = model.weight.detach().clone()
    x, y = torch.randn(8, 100), torch.randint(0, 100, (8,))
    sigma, clip, batch = 3.0, 1e-3, 4
    settings = TrainSettings(
        epochs=1, batch_size=batch, lr=1.0, momentum=0.0, max_steps=1
    )
    result = train_local(
        model,
        (x, y),
        settings,
        [PrivateSteps(clip, sigma, 1e-5, noise=_seeded(5))],
        generator=torch.Generator().manual_seed(0),
    )
    assert result.steps == 1
    step = (model.weight.detach() - before).flatten().numpy()
    assert np.std(step) == pytest.approx(sigma * clip / batch, rel=0.03)
    assert abs(np.mean(step)) < 3 * sigma * clip / batch / 100  # no drift


def test_batches_are_poisson_samples_of_rate_batch_over_n():
    hook = PrivateSteps(1.0, 1.0, 1e-5, noise=_seeded(1))
    model = nn.Linear(2, 2)
    sizes = []
    x, y = torch.randn(400, 2), torch.randint(0, 2, (400,))

    class Sizes(Hook):
        def after_step(self, run):
            sizes.append(len(run.batch[0]))

    train_local(
        model,
        (x, y),
        TrainSettings(epochs=2, batch_size=20, lr=0.0, momentum=0.0),
        [hook, Sizes()],
        generator=torch.Generator().manual_seed(0),
    )
    assert len(sizes) == 2 * 20  # round(n / B) batches per epoch
    assert len(set(sizes)) > 3  # sizes vary, as Poisson sampling's do
    assert np.mean(sizes) == pytest.approx(20, rel=0.1)


def _flower_epsilon(sigma, q, steps, population, delta):
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON,
        )
    )
    accountant.compose(
        GaussianPrivacyEvent(sigma, round(q * population), population), steps
    )
    return accountant.get_privacy_spent().epsilon


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 100), (2.0, 400)])
def test_integer_orders_bound_the_default_accountant_closely(sigma, steps):
    ours = epsilon_spent([(sigma, 0.1, steps)], 1e-5, 200)
    default = _flower_epsilon(sigma, 0.1, steps, 200, 1e-5)
    assert default * (1 - 1e-9) <= ours <= default * 1.1


def test_calibration_spends_the_budget_and_no_less_noise_would_do():
    sigma = calibrate(4.0, 1e-5, 0.1, 300, 200)
    assert epsilon_spent([(sigma, 0.1, 300)], 1e-5, 200) <= 4.0
    assert epsilon_spent([(sigma * 0.995, 0.1, 300)], 1e-5, 200) > 4.0


def test_accounting_composes_over_rounds_and_a_spent_budget_refuses_training():
    state: dict = {}
    settings = TrainSettings(epochs=1, batch_size=1, lr=0.1, momentum=0.0)
    config = {
        wire.DP_SGD_EPSILON: 2.0,
        wire.DP_SGD_CLIP: 1.0,
        wire.NUM_ROUNDS: 2,
    }
    spent = []
    for _ in range(2):
        hooks = private_hooks(config, state, len(X), [], settings)
        result = train_local(
            _linear(), (X, Y), settings, hooks, generator=torch.Generator(), state=state
        )
        spent.append(result.run.metrics[wire.DP_SGD_EPSILON_METRIC])
    assert spent[0] < spent[1] <= 2.0
    assert spent[1] == pytest.approx(2.0, rel=0.01)  # calibrated to the run
    hooks = private_hooks(config, state, len(X), [], settings)
    with pytest.raises(ConfigError, match="budget"):
        train_local(
            _linear(), (X, Y), settings, hooks, generator=torch.Generator(), state=state
        )


def test_hooks_that_read_data_outside_the_noisy_steps_and_batchnorm_are_refused():
    class Scoring(Hook):
        def before_training(self, run):
            pass

    with pytest.raises(ConfigError, match="Scoring overrides before_training"):
        check_hooks([MarginControl(0.1), Scoring()])
    with pytest.raises(ConfigError, match="SharpnessAwareStep overrides step"):
        check_hooks([SharpnessAwareStep(0.05)])
    check_hooks([MarginControl(0.1)])  # a loss term is computed per example
    with pytest.raises(ConfigError, match="BatchNorm"):
        check_model(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def test_a_hook_reading_the_local_data_outside_the_steps_fails_loudly():
    class Statistic(Hook):
        def finish(self, run):
            run.metrics["label-mean"] = float(run.data[1].float().mean())

    private = PrivateSteps(1.0, 1.0, 1e-5, noise=_seeded())
    with pytest.raises(ConfigError, match=r"run\.data"):
        train_local(
            _linear(),
            (X, Y),
            TrainSettings(epochs=1, batch_size=3, lr=0.1, momentum=0.0),
            [private, Statistic()],
            generator=torch.Generator(),
        )


def test_round_metric_is_the_largest_epsilon():
    replies = [
        ClientReply(i, None, n, {wire.DP_SGD_EPSILON_METRIC: e, "train-loss": e})
        for i, (n, e) in enumerate(((10, 1.5), (30, 0.5)))
    ]
    metrics = weighted_metrics(replies)
    assert metrics[wire.DP_SGD_EPSILON_METRIC] == 1.5
    assert metrics["train-loss"] == pytest.approx((10 * 1.5 + 30 * 0.5) / 40)


def test_private_training_sends_the_keys_and_checks_its_arguments():
    strategy = private_training(FedAvg(), epsilon=3.0, clip=0.5)
    assert strategy.extra_config[wire.DP_SGD_EPSILON] == 3.0
    assert strategy.extra_config[wire.DP_SGD_CLIP] == 0.5
    assert wire.DP_SGD_EPSILON not in private_training(FedAvg()).extra_config
    with pytest.raises(ValueError, match="delta"):
        private_training(FedAvg(), 1.0, delta=1.0)
    with pytest.raises(TypeError):
        private_training(object(), 1.0)  # type: ignore[arg-type]


def test_run_config_refuses_routines_and_models_dp_sgd_cannot_protect():
    with pytest.raises(RunConfigError, match="diff2"):
        run_inprocess({"algorithm": "diff2", "dp-sgd-epsilon": 1.0}, num_nodes=2)
    with pytest.raises(RunConfigError, match="BatchNorm"):
        run_inprocess(
            {"model": "cnn", "model-norm": "batch", "dp-sgd-noise-multiplier": 1.0},
            num_nodes=2,
        )


def test_fedld_with_dp_sgd_topk_and_sign_flip_through_run_config(tmp_path):
    _, path, _ = run_inprocess(
        {
            "algorithm": "fedld",
            "num-server-rounds": 2,
            "local-steps": 2,
            "fraction-evaluate": 0.0,
            "dp-sgd-epsilon": 5.0,
            "attack": "sign-flip",
            "attack-fraction": 0.25,
            "compressor": "topk",
            "compressor-k": 500,
            "error-feedback": True,
            "output-dir": str(tmp_path),
            "plot": False,
        },
        num_nodes=4,
    )
    rounds = json.loads((path / "metrics.json").read_text())["rounds"]
    spent = [r[f"train-{wire.DP_SGD_EPSILON_METRIC}"] for r in rounds[1:]]
    assert 0 < spent[0] < spent[1] <= 5.0
    assert all(r["train-replies"] == 4 for r in rounds[1:])
    assert rounds[-1]["bytes-received"] < rounds[-1]["bytes-sent"] / 2  # top-k
