"""SSF and its instance-wise pools (tasks/ssf.py) against step-by-step references."""

import copy

import pytest
import torch
from torch import nn

from bouquet.tasks import DataSpec, dataset_info
from bouquet.tasks.finetune import build_task_model, frozen_names
from bouquet.tasks.ssf import selected_entries, selected_similarity

DIGITS = dataset_info(DataSpec(dataset="digits-shift"))
MLP = {"model": "mlp", "dataset": "digits-shift", "seed": 3, "peft": "ssf"}


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _backbone(model, x, scales=None):
    """The MLP by hand: ``scales[i] = (gamma, beta)`` after hidden layer ``i``."""
    h = x.flatten(1)
    for i, name in enumerate(("1", "3")):
        layer = model.get_submodule(name)
        h = nn.functional.linear(h, layer.weight, layer.bias)
        if scales is not None:
            gamma, beta = scales[i]
            h = h * gamma + beta
        h = torch.relu(h)
    return h


def test_plain_ssf_modulates_every_hidden_layer_and_trains_the_head():
    model = build_task_model(MLP, DIGITS)
    assert _trainable(model) == [
        "1.ssf_scale",
        "1.ssf_shift",
        "3.ssf_scale",
        "3.ssf_shift",
        "5.weight",
        "5.bias",
    ]
    assert frozen_names(model) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert model.get_submodule("1").ssf_scale.shape == (1, 128)
    x = torch.randn(5, *DIGITS.input_shape)
    scales = [
        (model.get_submodule(n).ssf_scale[0], model.get_submodule(n).ssf_shift[0])
        for n in ("1", "3")
    ]
    head = model.get_submodule("5")
    expected = head(_backbone(model, x, scales))
    torch.testing.assert_close(model(x), expected)
    assert selected_similarity(model) is None


def test_each_instance_uses_the_mean_of_its_top_k_entries():
    pool, k = 5, 2
    model = build_task_model({**MLP, "ssf-pool-size": pool, "ssf-top-k": k}, DIGITS)
    assert set(_trainable(model)) == {
        "ssf_keys",
        "ssf_head_weight",
        "ssf_head_bias",
        "1.ssf_scale",
        "1.ssf_shift",
        "3.ssf_scale",
        "3.ssf_shift",
    }
    assert "5.weight" in frozen_names(model)  # the head pool replaces the head
    with torch.no_grad():  # entries apart, so that the selection matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(6, *DIGITS.input_shape)
    got = model(x)
    sims, rows = [], []
    for i in range(len(x)):  # one instance at a time, as the official code
        xi = x[i : i + 1]
        query = _backbone(model, xi)[0]
        cosine = torch.stack(
            [
                nn.functional.cosine_similarity(query, key, dim=0)
                for key in model.ssf_keys
            ]
        )
        chosen = cosine.topk(k).indices
        sims.append(cosine[chosen].sum())
        scales = [
            (
                model.get_submodule(n).ssf_scale[chosen].mean(0),
                model.get_submodule(n).ssf_shift[chosen].mean(0),
            )
            for n in ("1", "3")
        ]
        z = _backbone(model, xi, scales)[0]
        logits = [model.ssf_head_weight[p] @ z + model.ssf_head_bias[p] for p in chosen]
        rows.append(torch.stack(logits).mean(0))
        assert set(selected_entries(model)[i].tolist()) == set(chosen.tolist())
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(selected_similarity(model), torch.stack(sims))
    # The similarity term reaches the keys only.
    selected_similarity(model).sum().backward()
    assert model.ssf_keys.grad is not None and model.ssf_keys.grad.abs().sum() > 0
    assert model.get_submodule("1").ssf_scale.grad is None


def test_pools_start_as_the_backbone_head_and_copies_stay_self_contained():
    model = build_task_model({**MLP, "ssf-pool-size": 3, "ssf-top-k": 2}, DIGITS)
    head = model.get_submodule("5")
    for p in range(3):
        torch.testing.assert_close(model.ssf_head_weight[p], head.weight)
    x = torch.randn(4, *DIGITS.input_shape)
    model(x).sum().backward()  # leaves tensors of a forward in the routing
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x))
    with torch.no_grad():
        twin.ssf_keys.mul_(-1.0)
    twin(x)
    assert selected_entries(twin) is not selected_entries(model)


def test_bad_pool_settings_name_the_key():
    with pytest.raises(ValueError, match="ssf-top-k=4"):
        build_task_model({**MLP, "ssf-pool-size": 3, "ssf-top-k": 4}, DIGITS)
    with pytest.raises(ValueError, match=r"'ssf-pool-size' must be >= 1; got 0"):
        build_task_model({**MLP, "ssf-pool-size": 0}, DIGITS)
