"""SSF (scale and shift deep features), with optional instance-wise pools.

SSF (Lian, Zhou, Feng, Wang, "Scaling & Shifting Your Features: A New Baseline
for Efficient Model Tuning", NeurIPS 2022, https://arxiv.org/abs/2210.08823)
modulates the output ``h`` of a frozen operation, feature by feature:
``h * gamma + beta``. Here the *sites* are the outputs of every ``Linear``,
``Conv1d`` / ``Conv2d`` and ``LayerNorm`` of the backbone but the classifier
(for a ``transformers`` ViT: the patch embedding, both LayerNorms of every
block, the q/k/v and attention-output projections, both MLP layers and the
final norm, the sites of FedIns' official code; for the MLP: its two hidden
layers). ``peft="ssf"`` trains them plus the classifier, for any algorithm.

**Pools** (FedIns, Feng et al., ICCV 2023, https://arxiv.org/abs/2308.06051):
with ``ssf-pool-size`` ``P > 1`` every site holds ``P`` entries
(``ssf_scale``, ``ssf_shift``: ``P x D``), the classifier is a pool of ``P``
linear heads (``ssf_head_weight``: ``P x C x D``, ``ssf_head_bias``: ``P x C``,
each a copy of the backbone's head; the head itself is then frozen) and the
model holds ``P`` keys (``ssf_keys``: ``P x D``, ``D`` the classifier's input
width). Each instance ``x`` is routed on its own (vectorised over the batch):

1. query ``q(x)``: the classifier's input of the *unmodified* frozen backbone
   (a first forward pass with every SSF site off, without gradients);
2. cosine similarity of ``q(x)`` with every key, top ``ssf-top-k`` entries
   ``S(x)``;
3. at every site ``gamma(x) = mean_{p in S(x)} gamma_p`` (``beta`` likewise),
   and logits ``mean_{p in S(x)} (W_p z + b_p)``.

The sum of the selected similarities of each instance (with gradients to the
keys) is kept for FedIns' key loss (:func:`selected_similarity`), the selected
indices for a selection histogram (:func:`selected_entries`). ``P = 1`` is
plain SSF: no keys, no query pass, the backbone's own head trains.

Initialisation (FedIns' code): ``gamma ~ N(1, 0.02)``, ``beta ~ N(0, 0.02)``,
keys truncated normal with std 0.02 (drawn from the run's seeded RNG, so every
node builds the same entries).

The hooks read only their arguments and state stored on the modules, so a
deep copy of the model (the ClientApp's model pool) stays self-contained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SSF_INIT_STD = 0.02
SCALE, SHIFT = "ssf_scale", "ssf_shift"
KEYS, HEAD_WEIGHT, HEAD_BIAS = "ssf_keys", "ssf_head_weight", "ssf_head_bias"


@dataclass
class _Routing:
    """Per-forward routing shared by the root, the sites and the head."""

    pool_size: int
    top_k: int
    querying: bool = False
    query: torch.Tensor | None = None
    index: torch.Tensor | None = None  # (B, k) selected entries, None for P = 1
    similarity: torch.Tensor | None = None  # (B,) sum of selected cosines
    last_index: torch.Tensor | None = None  # the last forward's selection

    def __getstate__(self) -> dict:
        # Copies and pickles carry the settings, not a forward's tensors.
        return {"pool_size": self.pool_size, "top_k": self.top_k}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def ssf_sites(model: nn.Module, head: str) -> list[str]:
    """Names of the modules whose outputs SSF modulates (all but the head's)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, kinds)
        and name != head
        and not name.startswith(head + ".")
    ]


def _width(module: nn.Module) -> tuple[int, bool]:
    """Feature width of a site's output, and whether features are on dim 1."""
    if isinstance(module, nn.Linear):
        return module.out_features, False
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return module.out_channels, True
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1]), False
    raise TypeError(f"no SSF site: {type(module).__name__}")


def add_ssf(
    model: nn.Module, head: str, pool_size: int = 1, top_k: int = 1
) -> list[str]:
    """Add SSF (pools of ``pool_size``, ``top_k`` per instance); trainable names.

    The names returned are parameter prefixes: every site's ``ssf_scale`` /
    ``ssf_shift``; with ``pool_size > 1`` also the keys and the head pool on
    the root module (else the caller trains ``head`` itself).
    """
    if not 1 <= top_k <= pool_size:
        raise ValueError(
            f"ssf-top-k={top_k}: expected in [1, ssf-pool-size={pool_size}]"
        )
    sites = ssf_sites(model, head)
    if not sites:
        raise ValueError(
            f"{type(model).__name__} has no Linear/Conv/LayerNorm to modulate"
        )
    routing = _Routing(pool_size=pool_size, top_k=top_k)
    trainable = []
    for name in sites:
        module = model.get_submodule(name)
        width, channel = _width(module)
        module.register_parameter(
            SCALE, nn.Parameter(torch.randn(pool_size, width) * SSF_INIT_STD + 1.0)
        )
        module.register_parameter(
            SHIFT, nn.Parameter(torch.randn(pool_size, width) * SSF_INIT_STD)
        )
        module._ssf_routing = routing
        module._ssf_channel_dim = channel
        module.register_forward_hook(_modulate)
        trainable += [f"{name}.{SCALE}", f"{name}.{SHIFT}"]
    model._ssf_routing = routing
    if pool_size > 1:
        classifier = model.get_submodule(head)
        if not isinstance(classifier, nn.Linear):
            raise ValueError(
                f"an SSF head pool needs a Linear classifier, not {head!r}"
            )
        weight = classifier.weight.detach()
        keys = torch.empty(pool_size, classifier.in_features)
        nn.init.trunc_normal_(keys, std=SSF_INIT_STD)
        model.register_parameter(KEYS, nn.Parameter(keys))
        model.register_parameter(
            HEAD_WEIGHT, nn.Parameter(weight.unsqueeze(0).repeat(pool_size, 1, 1))
        )
        bias = (
            classifier.bias.detach()
            if classifier.bias is not None
            else torch.zeros(classifier.out_features)
        )
        model.register_parameter(
            HEAD_BIAS, nn.Parameter(bias.unsqueeze(0).repeat(pool_size, 1))
        )
        classifier._ssf_routing = routing
        classifier._ssf_root = [model]  # a list: not registered as a submodule
        classifier.register_forward_hook(_pooled_head)
        model.register_forward_pre_hook(_route)
        model.register_forward_hook(_end_route)
        trainable += [KEYS, HEAD_WEIGHT, HEAD_BIAS]
    return trainable


def _route(model: nn.Module, args: tuple) -> None:
    """Before the forward: the query pass, then each instance's top-k entries."""
    routing: _Routing = model._ssf_routing
    if routing.querying:
        return
    routing.querying = True
    try:
        with torch.no_grad():
            model(*args)
    finally:
        routing.querying = False
    query = nn.functional.normalize(routing.query, dim=-1)
    keys = nn.functional.normalize(getattr(model, KEYS), dim=-1)
    cosine = query @ keys.T  # (B, P)
    index = cosine.topk(routing.top_k, dim=1).indices
    routing.index = routing.last_index = index
    routing.similarity = cosine.gather(1, index).sum(dim=1)
    routing.query = None


def _end_route(model: nn.Module, args: tuple, out: torch.Tensor) -> None:
    if not model._ssf_routing.querying:
        model._ssf_routing.index = None


def _modulate(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    routing: _Routing = module._ssf_routing
    scale, shift = getattr(module, SCALE), getattr(module, SHIFT)
    if routing.querying:
        return out
    if routing.index is None:
        scale, shift = scale[0], shift[0]
        if module._ssf_channel_dim:
            view = (-1,) + (1,) * (out.dim() - 2)
            scale, shift = scale.view(view), shift.view(view)
        return out * scale + shift
    scale = scale[routing.index].mean(dim=1)  # (B, D)
    shift = shift[routing.index].mean(dim=1)
    if module._ssf_channel_dim:
        view = (out.shape[0], -1) + (1,) * (out.dim() - 2)
    else:
        view = (out.shape[0],) + (1,) * (out.dim() - 2) + (-1,)
    return out * scale.view(view) + shift.view(view)


def _pooled_head(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    routing: _Routing = module._ssf_routing
    features = args[0]
    if routing.querying:
        routing.query = features.detach()
        return out
    root = module._ssf_root[0]
    weight = getattr(root, HEAD_WEIGHT)[routing.index]  # (B, k, C, D)
    bias = getattr(root, HEAD_BIAS)[routing.index]  # (B, k, C)
    logits = torch.einsum("bkcd,bd->bkc", weight, features) + bias
    return logits.mean(dim=1)


def selected_similarity(model: nn.Module) -> torch.Tensor | None:
    """The last forward's ``sum_{p in S(x)} cos(q(x), K_p)`` per instance (B,)."""
    routing = getattr(model, "_ssf_routing", None)
    return None if routing is None else routing.similarity


def selected_entries(model: nn.Module) -> torch.Tensor | None:
    """The last forward's selected pool entries (B, k), None without pools."""
    routing = getattr(model, "_ssf_routing", None)
    return None if routing is None else routing.last_index
