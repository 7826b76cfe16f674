"""Fine-tuning a pretrained model: which entries train, and only those travel.

Two shared run-config keys turn any run into federated fine-tuning, with any
registered algorithm:

- ``pretrained``: where the backbone's weights come from. ``""`` (default):
  the model's seeded random initialisation, as in every other run.
  ``"source"``: pretrained inside the pack, centrally, on the dataset's
  source task (``digits-shift``'s clean other half, :func:`tasks.sources.
  source_task`) for ``pretrain-epochs`` epochs, then cached on disk. A path
  to a ``.pt`` state dict, or a ``transformers`` model directory or hub name
  (``from_pretrained``, for users who have the weights; nothing is
  downloaded offline).
- ``peft``: which entries train. ``none`` (every entry, full fine-tuning),
  ``head`` (the classifier only: a linear probe), ``bias`` (every bias plus
  the head: BitFit), ``lora`` (LoRA adapters from the ``peft`` library, rank
  ``lora-rank``, scale ``lora-alpha / lora-rank``, on ``lora-targets``, plus
  the head), ``adapter`` (bottleneck adapters of width ``adapter-dim`` after
  each transformer block's MLP, plus the head), ``prompt`` (``prompt-length``
  visual prompt tokens, plus the head); the last two need a transformer
  (:mod:`tasks.foundation`). ``ssf`` (scale and shift of every hidden
  feature, plus the head; any model, :mod:`tasks.ssf`): with
  ``ssf-pool-size`` > 1 a pool of entries per site, a head pool and keys, and
  each instance uses the mean of its ``ssf-top-k`` best-matching entries
  (FedIns).

**Only trainable tensors cross the wire.** Every entry that is not a
trainable parameter is *frozen*: it comes from the backbone, which every
node builds itself, once per process (the ClientApp's model pool); the
server's arrays, every message and every reply carry the trainable entries
only (``frozen_names``). BatchNorm statistics of a frozen model stay at their
pretrained values (momentum 0). Because averaging trainable entries is only
meaningful on an identical backbone, the server sends a digest of its frozen
entries (``frozen-digest``) and a node whose backbone differs refuses the
message (:func:`check_frozen`), instead of silently averaging across
different models.

**LoRA and aggregation.** LoRA trains ``B A`` through its two factors; an
algorithm that averages ``A`` and ``B`` separately gets ``mean(B) mean(A)``,
which is not ``mean(B A)`` (every Bouquet algorithm does this, as FedAvg on
the factors does in Flower's FlowerTune examples). ``lora-freeze-a=true``
is the product-aware variant of FFA-LoRA (Sun et al., "Improving LoRA in
Privacy-preserving Federated Learning", ICLR 2024,
https://arxiv.org/abs/2403.12313): ``A`` stays at its seeded random
initialisation (the same on every node, hence frozen and never sent) and
only ``B`` trains, so averaging ``B`` is exactly averaging ``B A``.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bouquet.tasks.params import Param, defaults, parse_all
from bouquet.tasks.spec import DatasetInfo

if TYPE_CHECKING:  # torch is imported where a model is built (light for the server)
    import torch
    from torch import nn

PEFT_METHODS = ("none", "head", "bias", "lora", "adapter", "prompt", "ssf")
FROZEN_DIGEST = "frozen-digest"
"""Train/evaluate config key: SHA-256 of the server's frozen entries."""


PARAMS = (
    Param(
        "pretrained",
        "",
        help="'' (random init), 'source' (pretrained here), or a path / hub name",
    ),
    Param("pretrain-epochs", 30, ">= 1"),
    Param(
        "peft", "none", choices=PEFT_METHODS, help="which entries train (and travel)"
    ),
    Param("lora-rank", 8, ">= 1"),
    Param("lora-alpha", 16.0, "> 0"),
    Param("lora-targets", "", help="module globs"),
    Param("lora-freeze-a", False, help="FFA-LoRA"),
    Param("adapter-dim", 8, ">= 1"),
    Param("prompt-length", 4, ">= 1"),
    Param("ssf-pool-size", 1, ">= 1"),
    Param("ssf-top-k", 1, ">= 1"),
)
"""The fine-tuning keys of the run config (the ServerApp's settings include them)."""


@dataclass(frozen=True)
class FineTuning:
    """The fine-tuning settings of a run (defaults: plain training)."""

    peft: str = "none"
    pretrained: str = ""
    pretrain_epochs: int = 30
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = ""
    lora_freeze_a: bool = False
    adapter_dim: int = 8
    prompt_length: int = 4
    ssf_pool_size: int = 1
    ssf_top_k: int = 1

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FineTuning:
        """Read and check the keys (``ValueError`` naming a bad one)."""
        values = parse_all(PARAMS, run_config)
        setup = cls(**{p.arg: values[p.key] for p in PARAMS})
        if setup.ssf_top_k > setup.ssf_pool_size:
            raise ValueError(
                f"ssf-top-k={setup.ssf_top_k}: expected <= "
                f"ssf-pool-size={setup.ssf_pool_size}"
            )
        return setup

    @property
    def active(self) -> bool:
        """Whether the model differs from a plain ``build_model`` one."""
        return self.peft != "none" or bool(self.pretrained)


DEFAULTS: dict[str, Any] = defaults(PARAMS)
"""The keys and their defaults (the ServerApp's settings declare the same)."""


def build_task_model(
    run_config: Mapping[str, Any],
    info: DatasetInfo,
    *,
    initialize: bool = True,
    wrapper: str = "none",
) -> nn.Module:
    """The run's model: ``model`` / ``model-norm`` / ``seed``, then fine-tuning.

    ``wrapper``: an algorithm's wrapper around the model
    (:func:`tasks.models.build_model`), for plain training only.

    Without fine-tuning keys this is :func:`tasks.models.build_model`
    (``initialize`` as there). With them, the backbone gets its pretrained
    weights, the PEFT modules are added (seeded by ``seed``) and every entry
    but the trainable ones is frozen; ``initialize`` is then ignored (the
    frozen weights are the point).
    """
    from bouquet.tasks.models import build_model, seeded_rng

    name = str(run_config.get("model", "mlp"))
    norm = str(run_config.get("model-norm", "batch"))
    seed = int(run_config.get("seed", 0))
    setup = FineTuning.from_run_config(run_config)
    if not setup.active:
        return build_model(
            name, info, norm=norm, seed=seed, initialize=initialize, wrapper=wrapper
        )
    if wrapper != "none":
        raise ValueError(
            f"model wrapper {wrapper!r} (its algorithm's) does not fine-tune: "
            "set pretrained='' and peft='none'"
        )
    if setup.pretrained and setup.pretrained != "source" and _is_hub_model(setup):
        from bouquet.tasks.foundation import from_pretrained

        model = from_pretrained(setup.pretrained, info)
    else:
        model = build_model(name, info, norm=norm, seed=seed)
        if setup.pretrained:
            state = pretrained_state(run_config, info, setup)
            model.load_state_dict(state, strict=True)
    with seeded_rng(seed):
        apply_peft(model, setup)
    return model


def _is_hub_model(setup: FineTuning) -> bool:
    path = Path(setup.pretrained).expanduser()
    return not path.is_file()


def pretrained_state(
    run_config: Mapping[str, Any], info: DatasetInfo, setup: FineTuning
) -> dict[str, torch.Tensor]:
    """The backbone's pretrained state dict: a file, or the cached source task's."""
    import torch

    if setup.pretrained != "source":
        path = Path(setup.pretrained).expanduser()
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"pretrained={path}: not a state dict")
        return dict(state)
    from bouquet.tasks.cache import cache_dir, cache_key, load_cached, save_atomic

    dataset = str(run_config.get("dataset", "digits"))
    key = {
        "pretrain": dataset,
        "model": str(run_config.get("model", "mlp")),
        "norm": str(run_config.get("model-norm", "batch")),
        "seed": int(run_config.get("seed", 0)),
        "epochs": setup.pretrain_epochs,
        "info": repr(info),
        "torch": torch.__version__.split("+")[0],
    }
    path = cache_dir() / f"pretrained-{cache_key(key)}.pt"
    state = load_cached(path)
    if state is None:
        state = pretrain_on_source(run_config, info, setup)
        save_atomic(state, path)
    return state


PRETRAIN_LR = 1e-3
PRETRAIN_BATCH = 32


def pretrain_on_source(
    run_config: Mapping[str, Any], info: DatasetInfo, setup: FineTuning
) -> dict[str, torch.Tensor]:
    """The model trained centrally on the dataset's source task: its state dict.

    Adam, lr 1e-3, batch 32, ``pretrain-epochs`` epochs, on one thread so
    that every machine computes the same weights.
    """
    import torch

    from bouquet.clientapps.loop import TrainSettings, train_local
    from bouquet.tasks.models import build_model, seeded_rng
    from bouquet.tasks.sources import source_task
    from bouquet.tasks.wire import derive_seed

    seed = int(run_config.get("seed", 0))
    x, y = source_task(str(run_config.get("dataset", "digits")))
    model = build_model(
        str(run_config.get("model", "mlp")),
        info,
        norm=str(run_config.get("model-norm", "batch")),
        seed=seed,
    )
    settings = TrainSettings(
        epochs=setup.pretrain_epochs,
        batch_size=PRETRAIN_BATCH,
        lr=PRETRAIN_LR,
        momentum=0.0,
        optimizer="adam",
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stream = derive_seed(seed, "pretrain")
        with seeded_rng(stream):
            train_local(
                model,
                (torch.from_numpy(x), torch.from_numpy(y)),
                settings,
                generator=torch.Generator().manual_seed(stream),
            )
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def apply_peft(model: nn.Module, setup: FineTuning) -> None:
    """Add ``setup.peft``'s modules to ``model`` and freeze all else (in place)."""
    from torch import nn

    if setup.peft == "none":
        return
    head = _head_prefix(model)
    trainable: list[str] = [head]
    if setup.peft == "ssf":
        from bouquet.tasks.ssf import add_ssf

        added = add_ssf(model, head, setup.ssf_pool_size, setup.ssf_top_k)
        # A head pool replaces the head, which then stays frozen.
        trainable = added if setup.ssf_pool_size > 1 else [head, *added]
    if setup.peft == "lora":
        trainable += _add_lora(model, setup, head)
    elif setup.peft == "adapter":
        from bouquet.tasks.foundation import add_adapters

        trainable += add_adapters(model, setup.adapter_dim)
    elif setup.peft == "prompt":
        from bouquet.tasks.foundation import add_prompts

        trainable.append(add_prompts(model, setup.prompt_length))
    for name, parameter in model.named_parameters():
        chosen = any(name == t or name.startswith(t + ".") for t in trainable)
        if setup.peft == "bias":
            chosen = chosen or name.endswith("bias")
        if setup.peft == "lora" and setup.lora_freeze_a and ".lora_A." in name:
            chosen = False
        parameter.requires_grad_(chosen)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0  # frozen statistics: the backbone's


def _head_prefix(model: nn.Module) -> str:
    """The classifier's module name (the owner of the state dict's last entry)."""
    last = next(reversed(model.state_dict()))
    return last.rpartition(".")[0]


def lora_targets(model: nn.Module, setup: FineTuning, head: str) -> list[str]:
    """Module names LoRA adapts: ``lora-targets`` globs, else a default.

    The default is the attention's query and value projections of a
    transformer (LoRA's own choice, Hu et al., ICLR 2022, section 7.1; GPT-2's
    fused ``c_attn``), else every ``Linear`` / ``Conv2d`` but the classifier.
    """
    from torch import nn

    layers = [
        n
        for n, m in model.named_modules()
        if (isinstance(m, nn.Linear | nn.Conv2d | nn.Conv1d) or _is_gpt2_conv1d(m))
        and n != head
    ]
    if setup.lora_targets:
        patterns = [p.strip() for p in setup.lora_targets.split(",") if p.strip()]
        chosen = [n for n in layers if any(fnmatch.fnmatch(n, p) for p in patterns)]
        if not chosen:
            raise ValueError(
                f"lora-targets={setup.lora_targets!r} matches no layer; "
                f"the model's are {layers}"
            )
        return chosen
    # GPT-2 projects q, k, v in one layer, c_attn (LoRA adapts it whole there).
    query_value = ("q_proj", "v_proj", "query", "value", "c_attn")
    attention = [n for n in layers if n.rpartition(".")[2] in query_value]
    return attention or layers


def _is_gpt2_conv1d(module: nn.Module) -> bool:
    """``transformers``' Conv1D: GPT-2's linear layers (weights stored transposed)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _add_lora(model: nn.Module, setup: FineTuning, head: str) -> list[str]:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:  # pragma: no cover - the extra is installed in CI
        from bouquet.tasks.foundation import LLM_EXTRA

        raise ImportError(f"peft='lora' needs the peft library: {LLM_EXTRA}") from error
    targets = lora_targets(model, setup, head)
    config = LoraConfig(
        r=setup.lora_rank,
        lora_alpha=setup.lora_alpha,
        target_modules=targets,
        lora_dropout=0.0,
        # GPT-2's Conv1D stores its weight transposed (in x out).
        fan_in_fan_out=all(_is_gpt2_conv1d(model.get_submodule(t)) for t in targets),
    )
    inject_adapter_in_model(config, model)
    return [n for n, _ in model.named_parameters() if ".lora_" in n]


def frozen_names(model: nn.Module) -> list[str]:
    """State-dict entries that never travel: all but the trainable parameters.

    Empty for a model with no frozen parameter (its buffers travel, as in
    every plain run).
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if len(trainable) == sum(1 for _ in model.parameters()):
        return []
    return [n for n in model.state_dict() if n not in trainable]


def frozen_digest(model: nn.Module, names: list[str] | None = None) -> str:
    """SHA-256 over the frozen entries' names, dtypes, shapes and bytes."""
    entries = model.state_dict()
    digest = hashlib.sha256()
    for name in names if names is not None else frozen_names(model):
        value = np.ascontiguousarray(entries[name].detach().cpu().numpy())
        digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
