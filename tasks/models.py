"""Models by name, built deterministically from a seed.

- ``logreg``: one linear layer (multinomial logistic regression, FedProx's
  model for Synthetic data).
- ``mlp``: flatten, two hidden ReLU layers (128, 64).
- ``mlp-wide``: flatten, two hidden ReLU layers (256, 256): the width that
  supermasks over frozen random weights need (HideNseek's target model).
- ``mlp-tanh``: flatten, one hidden tanh layer (64): a smooth model, for
  methods whose theory needs an L-smooth loss (DIFF2; ReLU is not smooth).
- ``cnn``: two 3x3 (or width-5 for 1-D signals) conv blocks, then adaptive
  average pooling, so one definition fits 8x8 digits, 28x28 MNIST, 32x32 CIFAR
  and (C, L) signals such as MNIST-1D.
- ``resnet18``: torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 first
  conv, no max-pool) and the input channels of the data.
- ``gcn``: two GCN layers and a linear classifier over graph rows
  (:mod:`tasks.graph`, dataset ``sbm-graph``; plain torch).
- ``vit-tiny``: a Hugging Face ``transformers`` ViT built from a config in
  code (patch 2, width 64, depth 4; :mod:`tasks.foundation`, the ``[llm]``
  extra): the backbone of federated fine-tuning (:mod:`tasks.finetune`).
- ``gpt2-tiny``: a ``transformers`` GPT-2 built from a config in code (2
  blocks, width 64) for next-token prediction on token windows
  (``grammar-text``); logits ``(N, vocabulary, T)``.

``wrapper`` wraps any of them: ``gated`` puts pFedGate's gating layer in front
(:class:`tasks.gating.GatedModel`), ``masked`` multiplies every linear weight
by a learnable mask (FED-PUB, :mod:`tasks.masked`), ``hyper`` generates the
feature extractor from a node embedding by a hypernetwork (HyperFL,
:class:`tasks.hypernet.HyperModel`); an algorithm that needs a wrapper
declares it (``BouquetStrategy.model_wrapper``) and both halves build the
same model.

``norm`` picks the normalisation of ``cnn`` and ``resnet18``: ``batch``,
``group`` (GroupNorm, the usual federated choice since it keeps no running
statistics across non-IID clients) or ``none``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from bouquet.tasks.spec import DatasetInfo, unknown_name_error

MODELS = (
    "logreg",
    "mlp",
    "mlp-wide",
    "mlp-tanh",
    "cnn",
    "resnet18",
    "vit-tiny",
    "gpt2-tiny",
    "gcn",
)
NORMS = ("batch", "group", "none")
WRAPPERS = ("none", "gated", "masked", "hyper")


def list_models() -> list[str]:
    """Names accepted by ``build_model``."""
    return list(MODELS)


def _norm_layer(norm: str, dims: int) -> Callable[[int], nn.Module]:
    """A factory ``channels -> normalisation layer`` for 1-D or 2-D features."""
    if norm == "batch":
        return nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(min(8, channels), channels)
    return lambda channels: nn.Identity()


def _mlp(info: DatasetInfo, hidden: tuple[int, int] = (128, 64)) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(info.input_shape), hidden[0]),
        nn.ReLU(),
        nn.Linear(hidden[0], hidden[1]),
        nn.ReLU(),
        nn.Linear(hidden[1], info.num_classes),
    )


def _mlp_tanh(info: DatasetInfo) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(info.input_shape), 64),
        nn.Tanh(),
        nn.Linear(64, info.num_classes),
    )


def _cnn(info: DatasetInfo, norm: str) -> nn.Module:
    if len(info.input_shape) not in (2, 3):
        raise ValueError(
            f"cnn needs (C, L) or (C, H, W) inputs, got {info.input_shape}; "
            "use mlp or logreg for flat features."
        )
    dims = len(info.input_shape) - 1
    conv, pool, adaptive = (
        (nn.Conv1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d(8))
        if dims == 1
        else (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d(4))
    )
    kernel = 5 if dims == 1 else 3
    make_norm = _norm_layer(norm, dims)
    bias = norm == "none"  # a following normalisation makes a conv bias redundant
    channels = info.input_shape[0]
    return nn.Sequential(
        conv(channels, 32, kernel, padding=kernel // 2, bias=bias),
        make_norm(32),
        nn.ReLU(),
        pool(2),
        conv(32, 64, kernel, padding=kernel // 2, bias=bias),
        make_norm(64),
        nn.ReLU(),
        adaptive,
        nn.Flatten(),
        nn.Linear(64 * (8 if dims == 1 else 16), 128),
        nn.ReLU(),
        nn.Linear(128, info.num_classes),
    )


def _resnet18(info: DatasetInfo, norm: str) -> nn.Module:
    from torchvision.models import resnet18

    if len(info.input_shape) != 3:
        raise ValueError(f"resnet18 needs (C, H, W) inputs, got {info.input_shape}")
    model = resnet18(
        weights=None, num_classes=info.num_classes, norm_layer=_norm_layer(norm, 2)
    )
    model.conv1 = nn.Conv2d(
        info.input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False
    )
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def resolve_device(name: str) -> torch.device:
    """The torch device for run-config ``device``: ``cpu``, ``cuda[:N]`` or ``auto``.

    ``auto`` is the first GPU when torch sees one, else the CPU. Asking for a
    GPU that is not there is an error, not a silent fall-back to the CPU.
    """
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        try:
            device = torch.device(name)
        except RuntimeError as err:
            raise ValueError(f"device: cannot parse {name!r} ({err}).") from None
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={name!r} but torch sees no CUDA GPU here; use 'cpu' or "
                "'auto' (GPU when there is one)."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={name!r} but torch sees {torch.cuda.device_count()} GPU(s)."
            )
        return device
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto'; got {name!r}.")


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Torch's global generators seeded with ``seed``, restored afterwards.

    Only the CPU generator, plus the CUDA one of ``device`` when it is a GPU:
    ``torch.manual_seed`` also queues a lazy seeding of every CUDA device and
    records a stack trace for it on each call (0.15 ms per message).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


def build_model(
    name: str,
    info: DatasetInfo,
    *,
    norm: str = "batch",
    seed: int = 0,
    initialize: bool = True,
    wrapper: str = "none",
) -> nn.Module:
    """A freshly initialised model for ``info``'s inputs and classes.

    The initialisation draws from a private copy of torch's RNG seeded with
    ``seed``: same seed, same weights, and the global RNG is left untouched.

    ``initialize=False`` gives the same architecture with uninitialised
    (arbitrary) values, for a caller that loads a full state dict right after,
    as a ClientApp does with the global arrays: it is built on the ``meta``
    device and then allocated, skipping the random initialisation (about 0.1 s
    for ResNet-18 on a CPU, on every message). A model with buffers outside
    its state dict, which a load would leave unset, is initialised as usual.
    """
    if not initialize:
        with torch.device("meta"):
            skeleton = build_model(name, info, norm=norm, seed=seed, wrapper=wrapper)
        in_state = set(skeleton.state_dict())
        if all(key in in_state for key, _ in skeleton.named_buffers()):
            return skeleton.to_empty(device="cpu")
    if name not in MODELS:
        raise unknown_name_error("model", name, MODELS)
    if norm not in NORMS:
        raise unknown_name_error("norm", norm, NORMS)
    if wrapper not in WRAPPERS:
        raise unknown_name_error("wrapper", wrapper, WRAPPERS)
    model = _build(name, info, norm, seed)
    if wrapper == "gated":
        from bouquet.tasks.gating import GatedModel

        with seeded_rng(seed):
            model = GatedModel(model, tuple(info.input_shape))
    elif wrapper == "masked":
        from bouquet.tasks.masked import mask_linears

        model = mask_linears(model)
    elif wrapper == "hyper":
        from bouquet.tasks.hypernet import HyperModel

        with seeded_rng(seed):
            model = HyperModel(model)
    return model


def _build(name: str, info: DatasetInfo, norm: str, seed: int) -> nn.Module:
    with seeded_rng(seed):
        if name == "logreg":
            return nn.Sequential(
                nn.Flatten(),
                nn.Linear(math.prod(info.input_shape), info.num_classes),
            )
        if name == "mlp":
            return _mlp(info)
        if name == "mlp-wide":
            return _mlp(info, (256, 256))
        if name == "mlp-tanh":
            return _mlp_tanh(info)
        if name == "cnn":
            return _cnn(info, norm)
        if name == "vit-tiny":
            from bouquet.tasks.foundation import vit_tiny

            return vit_tiny(info)
        if name == "gpt2-tiny":
            from bouquet.tasks.foundation import gpt2_tiny

            return gpt2_tiny(info)
        if name == "gcn":
            from bouquet.tasks.graph import build_gcn

            return build_gcn(tuple(info.input_shape), info.num_classes)
        return _resnet18(info, norm)
