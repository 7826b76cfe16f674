"""The one loop for every family: factories, the pre-training phase, features."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import TrainSettings, head_module, train_local
from bouquet.clientapps.losses import distillation, info_nce, make_loss


def _data(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    return x, (x[:, 0] > 0).long()


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))


def test_adam_is_torchs_adam_on_the_same_batches():
    x, y = _data()
    settings = TrainSettings(
        lr=0.01, batch_size=4, epochs=2, optimizer="adam", weight_decay=0.1
    )
    model = _model()
    train_local(model, (x, y), settings, generator=torch.Generator().manual_seed(5))
    reference = _model()
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.01, weight_decay=0.1)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 4):
            idx = order[start : start + 4]
            optimizer.zero_grad()
            F.cross_entropy(reference(x[idx]), y[idx]).backward()
            optimizer.step()
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_unknown_optimizer_and_loss_fail_clearly():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainSettings.from_config({"optimizer": "lion"})
    with pytest.raises(ValueError, match="loss must be one of"):
        make_loss("hinge")


def test_settings_fall_back_to_the_run_config_then_defaults():
    settings = TrainSettings.from_config(
        {"lr": 0.3}, fallback={"lr": 0.9, "momentum": 0.8, "batch-size": 7}
    )
    assert (settings.lr, settings.momentum, settings.batch_size) == (0.3, 0.8, 7)
    assert settings.epochs == TrainSettings().epochs


def test_loss_none_leaves_the_objective_to_the_hooks():
    x, y = _data()

    class PullToZero(Hook):
        def loss(self, run, loss, logits, x, y):
            return loss + logits.pow(2).mean()

    model = _model()
    settings = TrainSettings(lr=0.5, batch_size=12, epochs=20, loss="none")
    result = train_local(
        model, (x, y), settings, [PullToZero()], generator=torch.Generator()
    )
    assert result.loss_mean < result.loss_first
    assert float(model(x).detach().pow(2).mean()) < 0.05 * result.loss_first


def test_before_training_sees_everything_and_selects_a_subset():
    x, y = _data(n=10)
    seen_sizes, trained_on = [], []

    class KeepFirstFour(Hook):
        def before_training(self, run):
            seen_sizes.append(len(run.data[0]))
            run.select(torch.arange(4))

        def transform_batch(self, run, x, y):
            trained_on.append(x.clone())
            return x, y

    result = train_local(
        _model(),
        (x, y),
        TrainSettings(batch_size=2, epochs=1),
        [KeepFirstFour()],
        generator=torch.Generator().manual_seed(0),
    )
    assert seen_sizes == [10] and result.num_examples == 4 and result.steps == 2
    rows = torch.cat(trained_on)
    assert all(any(torch.equal(r, x[i]) for i in range(4)) for r in rows)
    with pytest.raises(ValueError, match="at least one"):
        result.run.select(torch.tensor([], dtype=torch.long))


def test_features_are_the_classifiers_input():
    x, y = _data()
    captured = []

    class Features(Hook):
        needs_features = True

        def loss(self, run, loss, logits, x, y):
            captured.append((run.features.detach().clone(), x.clone()))
            return loss

    model = _model()
    assert head_module(model) is model[2]
    train_local(
        model,
        (x, y),
        TrainSettings(batch_size=12, epochs=1, lr=0.0),
        [Features()],
        generator=torch.Generator(),
    )
    features, batch = captured[0]
    torch.testing.assert_close(features, model[1](model[0](batch)))
    assert not model[2]._forward_hooks  # the capture is removed afterwards


def test_global_parameters_are_the_start_values_even_without_hooks():
    x, y = _data()
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    result = train_local(
        model, (x, y), TrainSettings(lr=0.5), generator=torch.Generator()
    )
    for before, kept in zip(start, result.run.global_parameters, strict=True):
        torch.testing.assert_close(before, kept)


def test_distillation_and_info_nce_golden_values():
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 1.0]])
    p = torch.softmax(teacher / 2, 1)
    q = torch.softmax(student / 2, 1)
    expected = 4 * float((p * (p.log() - q.log())).sum())
    assert float(distillation(student, teacher, 2.0)) == pytest.approx(expected)
    assert float(distillation(teacher, teacher)) == pytest.approx(0.0, abs=1e-7)
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # positives = anchors: logits diag 1/T, off-diagonal 0
    t = 0.5
    expected = -torch.log(
        torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + 1)
    )
    assert float(info_nce(anchors, anchors, t)) == pytest.approx(float(expected))
