"""Models of ``tasks``: shapes, determinism, normalisation variants."""

import pytest
import torch
from torch import nn

from bouquet.tasks import DatasetInfo, build_model, list_models

DIGITS = DatasetInfo("digits", (1, 8, 8), 10)
MNIST1D = DatasetInfo("mnist1d", (1, 40), 10)
SYNTHETIC = DatasetInfo("synthetic", (60,), 10)
MNIST = DatasetInfo("mnist", (1, 28, 28), 10)
CIFAR = DatasetInfo("cifar100", (3, 32, 32), 100)


def layer_types(model):
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize(
    ("name", "info"),
    [
        ("logreg", SYNTHETIC),
        ("mlp", SYNTHETIC),
        ("mlp", DIGITS),
        ("mlp-wide", DIGITS),
        ("mlp-tanh", SYNTHETIC),
        ("cnn", DIGITS),
        ("cnn", MNIST1D),
        ("cnn", MNIST),
        ("cnn", CIFAR),
        ("resnet18", CIFAR),
    ],
)
def test_forward_gives_one_logit_per_class(name, info):
    model = build_model(name, info, seed=0)
    logits = model(torch.randn(3, *info.input_shape))
    assert logits.shape == (3, info.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["logreg", "mlp", "mlp-tanh", "cnn"])
def test_same_seed_same_weights_and_global_rng_untouched(name):
    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)
    first = build_model(name, DIGITS, seed=5).state_dict()
    assert torch.equal(torch.rand(1), expected_draw)
    again = build_model(name, DIGITS, seed=5).state_dict()
    other = build_model(name, DIGITS, seed=6).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize(
    ("norm", "present", "absent"),
    [
        ("batch", nn.BatchNorm2d, nn.GroupNorm),
        ("group", nn.GroupNorm, nn.BatchNorm2d),
        ("none", None, (nn.BatchNorm2d, nn.GroupNorm)),
    ],
)
def test_cnn_norm_variants(norm, present, absent):
    types = layer_types(build_model("cnn", DIGITS, norm=norm))
    if present is not None:
        assert present in types
    absent = absent if isinstance(absent, tuple) else (absent,)
    assert not types & set(absent)


def test_cnn_uses_1d_layers_for_signals():
    types = layer_types(build_model("cnn", MNIST1D, norm="batch"))
    assert nn.Conv1d in types and nn.BatchNorm1d in types and nn.Conv2d not in types


def test_resnet18_has_the_cifar_stem_and_group_norm_option():
    model = build_model("resnet18", DatasetInfo("x", (1, 32, 32), 10), norm="group")
    assert model.conv1.in_channels == 1 and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    types = layer_types(model)
    assert nn.GroupNorm in types and nn.BatchNorm2d not in types


def test_unknown_model_and_norm_list_the_known_names():
    with pytest.raises(ValueError, match="Unknown model 'resnet81'") as info:
        build_model("resnet81", DIGITS)
    assert all(name in str(info.value) for name in list_models())
    assert "Did you mean 'resnet18'" in str(info.value)
    with pytest.raises(ValueError, match="Unknown norm 'layer'"):
        build_model("cnn", DIGITS, norm="layer")


def test_conv_models_reject_flat_inputs():
    with pytest.raises(ValueError, match="cnn needs"):
        build_model("cnn", SYNTHETIC)
    with pytest.raises(ValueError, match="resnet18 needs"):
        build_model("resnet18", MNIST1D)


def test_device_names_resolve_or_fail_clearly(monkeypatch):
    from bouquet.tasks import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="'cpu', 'cuda', 'cuda:N' or 'auto'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("AUTO") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="sees 1 GPU"):
        resolve_device("cuda:3")


@pytest.mark.parametrize(
    ("name", "info", "norm"),
    [
        ("logreg", SYNTHETIC, "batch"),
        ("mlp", DIGITS, "batch"),
        ("cnn", MNIST1D, "batch"),
        ("cnn", DIGITS, "group"),
        ("resnet18", DIGITS, "batch"),
    ],
)
def test_uninitialised_model_loads_a_state_dict_into_the_same_model(name, info, norm):
    reference = build_model(name, info, norm=norm, seed=3)
    skeleton = build_model(name, info, norm=norm, seed=0, initialize=False)
    assert not any(p.is_meta for p in skeleton.parameters())
    assert [(k, v.shape, v.dtype) for k, v in skeleton.state_dict().items()] == [
        (k, v.shape, v.dtype) for k, v in reference.state_dict().items()
    ]
    skeleton.load_state_dict(reference.state_dict(), strict=True)
    reference.eval()
    skeleton.eval()
    x = torch.randn(4, *info.input_shape)
    assert torch.equal(skeleton(x), reference(x))


def test_uninitialised_model_with_an_unsaved_buffer_is_initialised(monkeypatch):
    import bouquet.tasks.models

    def with_unsaved_buffer(info):
        model = nn.Sequential(nn.Flatten(), nn.Linear(60, 10))
        model.register_buffer("scale", torch.ones(1), persistent=False)
        return model

    monkeypatch.setattr(bouquet.tasks.models, "_mlp", with_unsaved_buffer)
    model = build_model("mlp", SYNTHETIC, initialize=False)
    assert torch.equal(model.scale, torch.ones(1))  # not left arbitrary


def test_mlp_wide_is_the_hidenseek_target_width():
    model = build_model("mlp-wide", DIGITS, seed=0)
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if "weight" in n]
    assert shapes == [(256, 64), (256, 256), (DIGITS.num_classes, 256)]


def test_mlp_tanh_is_one_smooth_hidden_layer():
    model = build_model("mlp-tanh", SYNTHETIC)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(60, 64), (64, 10)]
    assert nn.Tanh in layer_types(model) and nn.ReLU not in layer_types(model)
