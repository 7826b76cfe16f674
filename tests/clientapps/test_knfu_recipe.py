"""KnFu's client: the distillation term against a reference, the records checked."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.knfu import KNOWLEDGE, TARGET, TRANSFER, make_hooks

CONFIG = {"knfu.temperature": 2.0, "knfu.distill-weight": 0.5}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _incoming(x, target=None):
    records = {TRANSFER: ArrayRecord({"x": Array(x)})}
    if target is not None:
        records[TARGET] = ArrayRecord(
            {str(i): Array(row.astype(np.float32)) for i, row in enumerate(target)}
        )
    return records


def _run(model, x, y, incoming, seed=0):
    return train_local(
        model,
        (x, y),
        TrainSettings(epochs=1, batch_size=4, lr=0.1),
        make_hooks(CONFIG),
        generator=torch.Generator().manual_seed(seed),
        incoming=incoming,
    )


def test_first_loss_is_ce_plus_the_weighted_kl_on_a_seeded_transfer_batch():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    pub = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    target = np.random.default_rng(1).dirichlet([1, 1], size=6)
    model, reference = _model(), _model()
    result = _run(model, x, y, _incoming(pub, target))
    # Reference: the loop's order draw, then the transfer batch draw.
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(4, generator=generator)
    idx = torch.randint(6, (4,), generator=generator)
    ce = nn.functional.cross_entropy(reference(x[order]), y[order])
    out = reference(torch.as_tensor(pub)[idx]) / 2.0
    q = torch.as_tensor(target, dtype=torch.float32)[idx]
    kl = (q * (q.log() - out.log_softmax(1))).sum(1).mean()
    assert result.loss_first == pytest.approx(float((ce + 2.0 * kl).detach()), rel=1e-5)
    knowledge = result.run.reply_records[KNOWLEDGE]
    assert list(knowledge.keys()) == [str(i) for i in range(6)]
    rows = np.stack([knowledge[str(i)].numpy() for i in range(6)])
    model.eval()
    with torch.no_grad():
        expected = (model(torch.as_tensor(pub)) / 2.0).softmax(1).numpy()
    np.testing.assert_allclose(rows, expected, rtol=1e-6)


def test_without_a_target_the_loss_is_plain_ce():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    pub = np.zeros((2, 3), np.float32)
    model, reference = _model(), _model()
    result = _run(model, x, y, _incoming(pub))
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0))
    ce = nn.functional.cross_entropy(reference(x[order]), y[order])
    assert result.loss_first == pytest.approx(float(ce.detach()), rel=1e-6)


@pytest.mark.parametrize(
    "target",
    [
        np.array([[0.5, 0.6], [0.5, 0.5]]),  # does not sum to 1
        np.array([[1.5, -0.5], [0.5, 0.5]]),  # negative
        np.array([[0.5, 0.5]]),  # one sample short
        np.array([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]]),  # three classes
    ],
)
def test_a_bad_target_is_refused_before_training(target):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ConfigError, match=TARGET):
        _run(
            model,
            torch.randn(2, 3),
            torch.tensor([0, 1]),
            _incoming(np.zeros((2, 3), np.float32), target),
        )
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.detach(), b)


def test_transfer_inputs_the_model_cannot_read_are_refused():
    with pytest.raises(ConfigError, match=TRANSFER):
        _run(
            _model(),
            torch.randn(2, 3),
            torch.tensor([0, 1]),
            _incoming(np.zeros((2, 5), np.float32)),
        )
