import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.fedlex import GuidedGradient, Scout, make_hooks
from bouquet.strategies.fedlex import BASE, GUIDANCE


def _linear(weight, bias):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weight))
        model.bias.copy_(torch.tensor(bias))
    return model


def _guidance(weight, bias):
    return {
        GUIDANCE: ArrayRecord(
            {
                "weight": Array(np.asarray(weight, np.float32)),
                "bias": Array(np.asarray(bias, np.float32)),
            }
        )
    }


def _train(model, data, hooks, incoming=None, **settings):
    return train_local(
        model,
        data,
        TrainSettings(**{"batch_size": 1, "lr": 0.5, **settings}),
        hooks,
        generator=torch.Generator().manual_seed(0),
        incoming=incoming,
    )


def test_one_guided_step_golden_numbers():
    # W = 0, b = 0, x = (1, 2), y = 0: p = (.5, .5), dL/dz = (-.5, .5)
    # dW = [[-.5, -1], [.5, 1]], db = (-.5, .5); G_W = [[1, 0], [.5, 0]], G_b = (0, 1)
    # masked: dW = [[-.5, 0], [.25, 0]], db = (0, .5); lr .5 -> W = -.5 * masked
    model = _linear([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    data = (torch.tensor([[1.0, 2.0]]), torch.tensor([0]))
    incoming = _guidance([[1.0, 0.0], [0.5, 0.0]], [0.0, 1.0])
    _train(model, data, [GuidedGradient()], incoming)
    torch.testing.assert_close(
        model.weight.detach(), torch.tensor([[0.25, 0.0], [-0.125, 0.0]])
    )
    torch.testing.assert_close(model.bias.detach(), torch.tensor([0.0, -0.25]))


def test_clipping_applies_after_the_mask():
    # masked gradient as above has norm sqrt(.25 + .0625 + .25) = .75; clip to .15
    model = _linear([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    data = (torch.tensor([[1.0, 2.0]]), torch.tensor([0]))
    incoming = _guidance([[1.0, 0.0], [0.5, 0.0]], [0.0, 1.0])
    _train(model, data, [GuidedGradient(max_grad_norm=0.15)], incoming, lr=1.0)
    torch.testing.assert_close(
        model.weight.detach(), torch.tensor([[0.1, 0.0], [-0.05, 0.0]])
    )
    torch.testing.assert_close(model.bias.detach(), torch.tensor([0.0, -0.1]))


@pytest.mark.parametrize("guidance", ["ones", "absent"])
def test_unit_or_absent_guidance_equals_the_fedavg_client(guidance):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 2, generator=gen), torch.randint(0, 2, (30,), generator=gen)
    incoming = _guidance(np.ones((2, 2)), np.ones(2)) if guidance == "ones" else {}
    models = []
    for hooks in ([], [GuidedGradient()]):
        model = _linear([[0.3, -0.2], [0.1, 0.4]], [0.0, 0.1])
        _train(model, (x, y), hooks, incoming, batch_size=7, epochs=2, momentum=0.9)
        models.append(model.state_dict())
    for key, value in models[0].items():
        torch.testing.assert_close(value, models[1][key], rtol=0, atol=0)


def test_scout_base_is_the_model_after_one_epoch():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 2, generator=gen), torch.randint(0, 2, (20,), generator=gen)
    one_epoch = _linear([[0.3, -0.2], [0.1, 0.4]], [0.0, 0.1])
    _train(one_epoch, (x, y), [], batch_size=6, lr=0.1)
    scout = _linear([[0.3, -0.2], [0.1, 0.4]], [0.0, 0.1])
    result = _train(scout, (x, y), [Scout(patience=50)], batch_size=6, lr=0.1, epochs=4)
    base = result.run.reply_records[BASE]
    for key, value in one_epoch.state_dict().items():
        np.testing.assert_array_equal(base[key].numpy(), value.numpy())
    assert result.steps == 16 and result.run.metrics["fedlex.explore-epochs"] == 4
    assert not np.array_equal(base["weight"].numpy(), scout.weight.detach().numpy())


def test_scout_stops_after_patience_epochs_without_improvement():
    # lr = 0: the last-batch loss never improves after epoch 1 -> stop after 1 + P
    # Identical examples: the batch loss is bit-identical whatever the shuffle
    # (a float sum in another order could "improve" by one ulp).
    x, y = torch.tensor([[0.5, -1.0]]).repeat(20, 1), torch.zeros(20, dtype=torch.long)
    model = _linear([[0.3, -0.2], [0.1, 0.4]], [0.0, 0.1])
    result = _train(model, (x, y), [Scout(patience=2)], batch_size=20, lr=0.0, epochs=9)
    assert result.steps == 3 and result.run.metrics["fedlex.explore-epochs"] == 3


def test_make_hooks_dispatches_on_the_phase():
    (scout,) = make_hooks({"fedlex.phase": "explore", "fedlex.patience": 4})
    assert isinstance(scout, Scout) and scout.patience == 4
    (guided,) = make_hooks({"fedlex.phase": "train", "fedlex.max-grad-norm": 2.0})
    assert isinstance(guided, GuidedGradient) and guided.max_grad_norm == 2.0
