import math

import pytest
import torch

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.fedld import MarginControl, make_hooks, margin_control


def test_margin_term_golden_value():
    # logits rows (0, 0) and (log 3, 0): P = [[.5, .5], [.75, .25]]
    # ||P||_F^2 = .25 + .25 + .5625 + .0625 = 1.125 -> lambda * log(2.125)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert float(margin_control(logits, 0.1)) == pytest.approx(0.1 * math.log(2.125))


def test_margin_term_gradcheck_float64():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: margin_control(z, 0.3), (logits,))


def test_lambda_zero_equals_fedavg_client_exactly():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    models = []
    for hooks in ([], make_hooks({"fedld.lambda": 0.0})):
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 3)
        train_local(
            model,
            (x, y),
            TrainSettings(batch_size=10, lr=0.1),
            hooks,
            generator=torch.Generator().manual_seed(2),
        )
        models.append(model.state_dict())
    for key, value in models[0].items():
        torch.testing.assert_close(value, models[1][key], rtol=0, atol=0)
    assert isinstance(make_hooks({"fedld.lambda": 0.2})[0], MarginControl)
