import pytest
import torch
from torch import nn

from bouquet.clientapps.hooks import Hook, ProximalTerm
from bouquet.clientapps.loop import TrainSettings, train_local


def _linear(weight):
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weight))
    return model


def test_one_sgd_step_matches_hand_computation():
    # Prepare: z = W x, dCE/dW = (softmax(z) - onehot(y)) x^T
    w0 = [[0.5, -0.2], [0.1, 0.3]]
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([1])
    model = _linear(w0)
    z = torch.tensor(w0) @ x[0]
    p = torch.softmax(z, 0)
    grad = torch.outer(p - torch.tensor([0.0, 1.0]), x[0])
    expected = torch.tensor(w0) - 0.1 * grad
    # Execute
    result = train_local(
        model,
        (x, y),
        TrainSettings(lr=0.1, batch_size=1),
        generator=torch.Generator().manual_seed(0),
    )
    # Assert
    torch.testing.assert_close(model.weight.detach(), expected)
    assert result.steps == 1 and result.num_examples == 1
    assert result.loss_first == pytest.approx(float(-torch.log(p[1])), rel=1e-6)


def test_proximal_term_golden_value_and_gradient():
    # loss + mu/2 ||w - g||^2 with w = (2, 0), g = (1, 1), mu = 0.5 -> +0.5
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 0.0]]))

    class Run:
        parameters = list(model.parameters())
        global_parameters = [torch.tensor([[1.0, 1.0]])]

    loss = ProximalTerm(0.5).loss(Run, torch.tensor(0.0), None, None, None)
    assert float(loss.detach()) == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(model.weight.grad, torch.tensor([[0.5, -0.5]]))


def test_proximal_mu_zero_equals_plain_training():
    x = torch.randn(40, 2, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] > 0).long()
    models = [_linear([[0.1, 0.2], [0.3, 0.4]]) for _ in range(2)]
    for model, hooks in zip(models, ([], [ProximalTerm(0.0)]), strict=True):
        train_local(
            model,
            (x, y),
            TrainSettings(lr=0.1, batch_size=8, epochs=2),
            hooks,
            generator=torch.Generator().manual_seed(3),
        )
    torch.testing.assert_close(models[0].weight, models[1].weight, rtol=0, atol=0)


def test_hooks_called_in_order_and_step_override():
    calls = []

    class Recorder(Hook):
        def setup(self, run):
            calls.append("setup")

        def before_step(self, run):
            calls.append("before_step")

        def after_step(self, run):
            calls.append("after_step")

        def finish(self, run):
            calls.append("finish")
            run.metrics["seen"] = run.steps

    class DoubleClosure(Hook):  # a SAM-like step: evaluates the loss twice
        def step(self, run, closure, default_step):
            closure()
            loss = closure()
            default_step()
            calls.append("custom_step")
            return loss

    x, y = torch.ones(4, 2), torch.zeros(4, dtype=torch.long)
    result = train_local(
        _linear([[0.0, 0.0], [0.0, 0.0]]),
        (x, y),
        TrainSettings(batch_size=2),
        [Recorder(), DoubleClosure()],
        generator=torch.Generator().manual_seed(0),
    )
    assert calls == ["setup"] + ["before_step", "custom_step", "after_step"] * 2 + [
        "finish"
    ]
    assert result.run.metrics["seen"] == 2
    with pytest.raises(ValueError, match="At most one hook"):
        train_local(
            _linear([[0.0, 0.0], [0.0, 0.0]]),
            (x, y),
            TrainSettings(),
            [DoubleClosure(), DoubleClosure()],
            generator=torch.Generator().manual_seed(0),
        )


def test_local_steps_cap_and_seeded_order():
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    y = (x[:, 1] > 0).long()
    result = train_local(
        _linear([[0.0, 0.0], [0.0, 0.0]]),
        (x, y),
        TrainSettings(batch_size=8, epochs=3, max_steps=5),
        generator=torch.Generator().manual_seed(0),
    )
    assert result.steps == 5
    runs = []
    for _ in range(2):
        model = _linear([[0.0, 0.0], [0.0, 0.0]])
        train_local(
            model,
            (x, y),
            TrainSettings(batch_size=8),
            generator=torch.Generator().manual_seed(7),
        )
        runs.append(model.weight.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_bad_settings_fail_clearly():
    with pytest.raises(ValueError, match="batch-size must be"):
        TrainSettings.from_config({"batch-size": 0})


def test_a_hook_can_stop_training_early():
    class StopAfter(Hook):
        def after_step(self, run):
            run.stop = run.steps + 1 >= 3  # steps counts completed steps after this

    result = train_local(
        nn.Linear(2, 2),
        (torch.randn(40, 2), torch.randint(0, 2, (40,))),
        TrainSettings(epochs=5, batch_size=4),
        [StopAfter()],
        generator=torch.Generator().manual_seed(0),
    )
    assert result.steps == 3


def test_freeze_batchnorm_keeps_running_statistics():
    from bouquet.clientapps.hooks import FreezeBatchNorm

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    before = model[1].running_mean.clone()
    train_local(
        model,
        (torch.randn(8, 2) + 3.0, torch.randint(0, 2, (8,))),
        TrainSettings(batch_size=4),
        [FreezeBatchNorm()],
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(model[1].running_mean, before, rtol=0, atol=0)
    assert model[1].weight.grad is not None  # affine weights still train


def test_stop_also_skips_the_remaining_epochs():
    class StopAfterThree(Hook):
        def after_step(self, run):
            if run.steps + 1 == 3:
                run.stop = True

    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    y = (x[:, 1] > 0).long()
    result = train_local(
        _linear([[0.0, 0.0], [0.0, 0.0]]),
        (x, y),
        TrainSettings(batch_size=8, epochs=4),
        [StopAfterThree()],
        generator=torch.Generator().manual_seed(0),
    )
    assert result.steps == 3 and result.run.stop and result.run.epoch == 0
