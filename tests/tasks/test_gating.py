"""pFedGate's gating layer: golden numbers of the official code, knapsack by hand.

``fixtures/pfedgate_official.json`` holds numbers computed by the official code
(yxdyc/pFedGate at commit b8cfa156acdb08207d33641a355959503ca1db78, CPU): its
``GatingLayer`` block layout, ``GatedLearner.select_top_trans_weights`` (the
block-wise knapsack and its straight-through mask, with the gradient of a fixed
linear read-out) and ``adapt_prune_model``, on a small conv + two-linear model
whose weights are in the fixture.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bouquet.tasks.gating import (
    BlockLayout,
    GatedModel,
    gated_weights,
    min_score,
    select_blocks,
)

OFFICIAL = json.loads(
    (Path(__file__).parent / "fixtures" / "pfedgate_official.json").read_text()
)


def _official_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 7),
        nn.ReLU(),
        nn.Linear(7, 3),
    )
    state = {k: torch.tensor(v) for k, v in OFFICIAL["state-dict"].items()}
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("split", [1, 5, 10])
def test_block_layout_is_the_official_one(split):
    layout = BlockLayout.of(_official_model(), split)
    expected = OFFICIAL[f"layout-split{split}"]
    assert list(layout.sizes) == expected["sizes"]
    assert list(layout.linear) == expected["linear"]
    # Every tensor's first block, and only it, is marked first.
    assert sum(layout.first) == len(layout.names) == 6


# At s = 0.8 the official greedy order among equal values comes from NumPy's
# argsort, which is not stable (SIMD sorts); ours is stable, so the fixture's
# s = 0.8 entry differs in which of the value-5 blocks fill the budget.
@pytest.mark.parametrize("sparse_factor", [0.3, 0.5])
def test_weights_gradient_and_pruned_model_match_the_official_code(sparse_factor):
    # Prepare
    model = GatedModel(_official_model(), (1, 28, 28), split=5)
    expected = OFFICIAL[f"s{sparse_factor}"]
    scores = torch.tensor(OFFICIAL["scores"], dtype=torch.float64, requires_grad=True)
    # Execute
    weights = gated_weights(scores, model.layout, sparse_factor, split=5)
    coeff = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    (coeff * weights).sum().backward()
    model.base.double()
    adapted = model.adapted_parameters(weights.detach())
    # Assert
    np.testing.assert_allclose(weights.detach().numpy(), expected["weights"])
    np.testing.assert_allclose(scores.grad.numpy(), expected["grad"])
    for name, value in adapted.items():
        key = name.removeprefix("base.")
        value = value.detach()
        np.testing.assert_allclose(float(value.sum()), expected["adapted-sum"][key])
        np.testing.assert_allclose(
            float(value.abs().sum()), expected["adapted-abs-sum"][key]
        )


def test_greedy_knapsack_by_hand():
    # One linear layer, split 3: weight blocks of 2, 2, 2 and bias blocks of 1, 1.
    # First blocks stay; blocks 1, 2, 4 (sizes 2, 2, 1) compete for
    # round(5 * (0.6 - 1/3)) = 1 element, by value round(10 max(g, 1/3)).
    layout = BlockLayout.of(nn.Linear(3, 2), split=3)
    assert layout.sizes == (2, 2, 2, 1, 1)
    scores = np.array([0.1, 0.44, 0.96, 0.2, 0.99])
    floor = min_score(0.6, 3)
    assert floor == pytest.approx(1 / 3)
    clipped = np.maximum(scores, floor)  # values 3, 4, 10, 3, 10
    # In value order (ties in layout order): block 2 (size 2) does not fit,
    # block 4 (size 1) does, block 1 (size 2) does not.
    mask = select_blocks(clipped, layout, 0.6, floor)
    np.testing.assert_array_equal(mask, [1, 0, 0, 1, 1])


def test_gate_off_is_the_dense_model_and_on_trains_both():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    model = GatedModel(base, (4,), split=2)
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), base(x))  # sparse_factor 0: gate off
    model.gate.sparse_factor.fill_(0.5)
    model(x).sum().backward()
    assert model.gate.linear.weight.grad.abs().sum() > 0
    assert base[1].weight.grad.abs().sum() > 0
    assert 0 < model.last_kept <= 1
    names = list(model.state_dict())
    assert names[0].startswith("gate.") and names[-1] == "base.1.bias"
