"""FedAMD's client hooks on a tiny model, against step-by-step references."""

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.fedamd import AnchorGradient, MinerRecursion, make_hooks
from bouquet.strategies.aggregation import to_record

GEN = torch.Generator().manual_seed(0)
X = torch.randn(6, 3, generator=GEN)
Y = torch.tensor([0, 1, 1, 0, 1, 0])


def _model():
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def _grads(model, x, y):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def _incoming(model, direction):
    names = [n for n, _ in model.named_parameters()]
    arrays = {k: v.numpy() for k, v in model.state_dict().items()}
    for name, d in zip(names, direction, strict=True):
        arrays[name] = d.numpy()
    return RecordDict({"fedamd.direction": to_record(arrays)})


def test_anchor_reply_is_the_full_batch_gradient_and_nothing_moves():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = _model().eval()  # BN frozen: normalise with running stats
    expected = _grads(reference, X, Y)
    result = train_local(
        model,
        (X, Y),
        TrainSettings(batch_size=4, lr=0.1),  # batches of 4 and 2: weighted sum
        make_hooks({"fedamd.role": "anchor"}),
        generator=torch.Generator().manual_seed(1),
    )
    reply = result.run.reply_records["arrays"]
    names = [n for n, _ in model.named_parameters()]
    for name, g in zip(names, expected, strict=True):
        np.testing.assert_allclose(reply[name].numpy(), g.numpy(), atol=1e-6)
    assert reply["1.running_mean"].numpy().tolist() == [0.0, 0.0]
    assert int(reply["1.num_batches_tracked"].numpy()) == 0
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert result.steps == 2


def test_miner_matches_the_sarah_recursion_step_by_step():
    lr, steps, batch = 0.3, 3, 2
    direction = [torch.full_like(p, 0.5) for p in _model().parameters()]
    model = _model()
    train_local(
        model,
        (X, Y),
        TrainSettings(
            epochs=steps, batch_size=batch, lr=lr, momentum=0.9, max_steps=steps
        ),
        make_hooks({"fedamd.role": "miner"}),
        generator=torch.Generator().manual_seed(2),
        incoming=_incoming(model, direction),
    )
    # Reference: the spec's loop written out, with the loop's batch order.
    order = torch.randperm(6, generator=torch.Generator().manual_seed(2))
    ref, old = _model().eval(), _model().eval()
    d = [t.clone() for t in direction]
    for k in range(steps):
        idx = order[k * batch : (k + 1) * batch]
        g_now, g_old = _grads(ref, X[idx], Y[idx]), _grads(old, X[idx], Y[idx])
        d = [di + a - b for di, a, b in zip(d, g_now, g_old, strict=True)]
        old.load_state_dict(ref.state_dict())
        with torch.no_grad():
            for p, di in zip(ref.parameters(), d, strict=True):
                p -= lr * di
    for got, want in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_one_miner_step_is_x_minus_lr_v():
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    direction = [torch.full_like(p, 2.0) for p in start]
    train_local(
        model,
        (X, Y),
        TrainSettings(batch_size=3, lr=0.25, max_steps=1),
        [MinerRecursion()],
        generator=torch.Generator().manual_seed(0),
        incoming=_incoming(model, direction),
    )
    for p, p0 in zip(model.parameters(), start, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.5)


def test_recipe_roles():
    assert isinstance(make_hooks({"fedamd.role": "anchor"})[-1], AnchorGradient)
    assert isinstance(make_hooks({"fedamd.role": "miner"})[-1], MinerRecursion)
    with pytest.raises(ValueError, match=r"fedamd\.role"):
        make_hooks({"fedamd.role": "boss"})
