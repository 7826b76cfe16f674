"""Transformer models built in code, and the PEFT modules the libraries lack.

The optional extra ``pip install 'flwr-bouquet[llm]'`` brings Hugging Face
``transformers`` (the models) and ``peft`` (LoRA, used by
:mod:`tasks.finetune`). Nothing here downloads: ``vit-tiny`` is built from a
``ViTConfig`` written below, the stand-in FedPEFT's spec names (patch 2 on 8x8
inputs, width 64, depth 4, 4 heads, MLP width 128), ``gpt2-tiny`` from a
``GPT2Config`` (2 blocks, width 64: the causal-LM path, on ``grammar-text``);
users with weights load them with ``pretrained=<path or hub name>``.

Two PEFT modules are written here because ``peft`` does not offer them for
vision transformers in the form FedPEFT describes (Sun et al., arXiv
2210.01708):

- **adapters**: a bottleneck ``d -> r -> d`` (GELU) added, with a residual,
  to the output of each transformer block's MLP sub-layer; the up-projection
  starts at zero, so the model starts as the pretrained one;
- **prompts** (visual prompt tuning, shallow): ``L`` learnable tokens inserted
  after the class token, at the input of the first block only, without
  position embeddings.

Both are registered as parameters of the modules they extend (state-dict
names ``...mlp.adapter.down.weight``, ``vit.embeddings.prompt``) and act
through forward hooks, so the pretrained entries keep their names.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from bouquet.tasks.spec import DatasetInfo

LLM_EXTRA = "pip install 'flwr-bouquet[llm]'"

VIT_TINY = {
    "patch_size": 2,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
"""FedPEFT's stand-in backbone (its spec's "Reproduction target")."""


def require_transformers() -> Any:
    """The ``transformers`` module, or an ImportError that says how to get it."""
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            f"This model needs Hugging Face transformers: {LLM_EXTRA}"
        ) from error
    return transformers


class ImageClassifier(nn.Module):
    """A ``transformers`` image classifier called as ``model(x) -> logits``.

    Bouquet's loop and evaluation call models with a batch of inputs and read
    logits; ``transformers`` models take ``pixel_values=`` and return an
    output object. The wrapped model is ``self.net``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x).logits


def vit_tiny(info: DatasetInfo) -> nn.Module:
    """FedPEFT's tiny ViT for ``info``'s ``(C, H, W)`` images, randomly initialised."""
    if len(info.input_shape) != 3 or info.input_shape[1] != info.input_shape[2]:
        raise ValueError(
            f"vit-tiny needs square (C, H, W) images, got {info.input_shape}"
        )
    transformers = require_transformers()
    channels, size, _ = info.input_shape
    config = transformers.ViTConfig(
        image_size=size,
        num_channels=channels,
        num_labels=info.num_classes,
        **VIT_TINY,
    )
    return ImageClassifier(transformers.ViTForImageClassification(config))


GPT2_TINY = {
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_inner": 256,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "tie_word_embeddings": False,
    "bos_token_id": None,
    "eos_token_id": None,
}
"""A tiny GPT-2 (2 blocks, width 64, 4 heads), the causal-LM path's backbone.

The output layer is untied from the token embedding so that the classifier
(``lm_head``, the "head" of personal parameters and of PEFT) is an entry of its
own."""


class CausalLM(nn.Module):
    """A ``transformers`` causal LM called as ``model(ids) -> logits (N, V, T)``.

    The ids arrive as the pipeline's float inputs and are cast back. Logits
    are returned classes-second, the layout ``cross_entropy`` takes for
    per-token targets ``(N, T)``, so the shared ``cross-entropy`` loss and
    :func:`tasks.evaluation.evaluate_model` are the next-token loss and the
    per-token accuracy without a loss of their own. The wrapped model is
    ``self.net``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=x.long()).logits.transpose(1, 2)


def gpt2_tiny(info: DatasetInfo) -> nn.Module:
    """A tiny GPT-2 for ``info``'s ``(T,)`` token windows over ``num_classes`` ids."""
    if len(info.input_shape) != 1:
        raise ValueError(
            f"gpt2-tiny needs (T,) token windows, got {info.input_shape}: "
            "use dataset='grammar-text'"
        )
    transformers = require_transformers()
    config = transformers.GPT2Config(
        vocab_size=info.num_classes, n_positions=info.input_shape[0], **GPT2_TINY
    )
    return CausalLM(transformers.GPT2LMHeadModel(config))


def from_pretrained(name: str, info: DatasetInfo) -> nn.Module:
    """A ``transformers`` image classifier by hub name or local path.

    The classifier is resized to ``info.num_classes`` (its new rows random).
    """
    transformers = require_transformers()
    net = transformers.AutoModelForImageClassification.from_pretrained(
        name, num_labels=info.num_classes, ignore_mismatched_sizes=True
    )
    return ImageClassifier(net)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a ``transformers`` encoder: each block's MLP sub-layer owner."""
    blocks = [m for m in model.modules() if type(m).__name__.endswith("Layer")]
    if not blocks or not all(hasattr(b, "mlp") or hasattr(b, "output") for b in blocks):
        raise ValueError(
            "adapters need a transformers encoder (blocks with an MLP sub-layer); "
            f"{type(model).__name__} has none: use peft='lora', 'bias' or 'head'"
        )
    return blocks


class _Bottleneck(nn.Module):
    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, dim)
        self.up = nn.Linear(dim, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(nn.functional.gelu(self.down(h)))


def add_adapters(model: nn.Module, dim: int) -> list[str]:
    """A bottleneck adapter after every block's MLP sub-layer; their names."""
    added = []
    names = {id(m): n for n, m in model.named_modules()}
    for block in transformer_blocks(model):
        # transformers 5 names the sub-layer `mlp`; 4.x `output` (dense + residual).
        mlp = block.mlp if hasattr(block, "mlp") else block.output.dense
        width = _out_features(mlp)
        mlp.adapter = _Bottleneck(width, dim)
        mlp.register_forward_hook(lambda module, args, out: module.adapter(out))
        added.append(f"{names[id(mlp)]}.adapter")
    return added


def _out_features(module: nn.Module) -> int:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no Linear layer")
    return linears[-1].out_features


def add_prompts(model: nn.Module, length: int) -> str:
    """``length`` prompt tokens after the class token (VPT-shallow); their name."""
    found = [
        (n, m)
        for n, m in model.named_modules()
        if hasattr(m, "cls_token") and hasattr(m, "position_embeddings")
    ]
    if not found:
        raise ValueError(
            f"prompts need a ViT embedding (class token + positions); "
            f"{type(model).__name__} has none: use peft='lora', 'bias' or 'head'"
        )
    name, embeddings = found[0]
    width = embeddings.cls_token.shape[-1]
    # VPT's initialisation (Jia et al., ECCV 2022): uniform in
    # +-sqrt(6 / (3 * patch area + width)), Xavier's for the patch projection.
    conv = next(m for m in embeddings.modules() if isinstance(m, nn.Conv2d))
    bound = math.sqrt(6.0 / (3 * math.prod(conv.kernel_size) + width))
    prompt = nn.Parameter(torch.empty(1, length, width).uniform_(-bound, bound))
    embeddings.register_parameter("prompt", prompt)

    def insert(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        tokens = module.prompt.expand(out.shape[0], -1, -1)
        return torch.cat((out[:, :1], tokens, out[:, 1:]), dim=1)

    embeddings.register_forward_hook(insert)
    return f"{name}.prompt"


def block_stack(model: nn.Module) -> tuple[nn.Module, str] | None:
    """Where a transformer keeps its blocks: ``(owner, attribute)`` of the list.

    The longest ``nn.ModuleList`` whose children are all of one class (ViT's
    ``layers``, GPT-2's ``h``); None for a model without one (an MLP, a CNN).
    """
    found: tuple[nn.Module, str] | None = None
    longest = 1
    for owner in model.modules():
        for attribute, child in owner.named_children():
            if (
                isinstance(child, nn.ModuleList)
                and len(child) > longest
                and len({type(block) for block in child}) == 1
            ):
                found, longest = (owner, attribute), len(child)
    return found


def split_blocks(
    model: nn.Module, head_blocks: int, tail_blocks: int
) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
    """A U-shaped split of the blocks: ``(head, body, tail)`` (split learning).

    The client keeps everything before the body (embeddings, prompts, the
    first ``head_blocks`` blocks) and after it (the last ``tail_blocks``
    blocks, the final norm, the classifier); the body is the blocks between.
    A model without a block stack, or with too few blocks, has an empty body:
    all of it is the client's.
    """
    stack = block_stack(model)
    blocks = list(getattr(*stack)) if stack else []
    if head_blocks + tail_blocks >= len(blocks):
        return blocks, [], []
    end = len(blocks) - tail_blocks
    return blocks[:head_blocks], blocks[head_blocks:end], blocks[end:]


@contextlib.contextmanager
def swapped_blocks(model: nn.Module, blocks: list[nn.Module]) -> Iterator[nn.Module]:
    """``model`` with its block stack replaced by ``blocks`` for the duration.

    The model's own forward runs the new list with the arguments it gives
    its blocks (masks, positions), so a stand-in module placed in the list
    sees what a body block would. The list is restored afterwards.
    """
    stack = block_stack(model)
    if stack is None:
        raise ValueError(f"{type(model).__name__} has no transformer block stack")
    owner, attribute = stack
    saved = getattr(owner, attribute)
    owner._modules[attribute] = nn.ModuleList(blocks)
    try:
        yield model
    finally:
        owner._modules[attribute] = saved


@contextlib.contextmanager
def without_body(
    model: nn.Module, head_blocks: int, tail_blocks: int
) -> Iterator[nn.Module]:
    """``model`` with its body skipped: ``tail(head(x))`` (SFPrompt's local loss).

    The block list is swapped for the head's and tail's blocks for the
    duration, and restored afterwards; the blocks are the same modules, so
    training through it trains the model's own parameters.
    """
    head, body, tail = split_blocks(model, head_blocks, tail_blocks)
    if not body:
        yield model
        return
    with swapped_blocks(model, [*head, *tail]):
        yield model


# Split learning as messages (SFPrompt's ``split = "messages"``): the client
# computes up to the body's input, the server runs the body, the client the
# rest. Stand-ins placed in the block list do it through the model's own
# forward, so any block stack (ViT, GPT-2) works unchanged.


class _Reached(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class _Stop(nn.Module):
    """Ends the forward pass where it stands, with the hidden state it got."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise _Reached(hidden)


class _Given(nn.Module):
    """Returns a given tensor in place of its input (the server's start)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.value


def _run_until_stop(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    try:
        model(x)
    except _Reached as reached:
        return reached.hidden
    raise RuntimeError("the forward pass never reached the split point")


def smashed(
    model: nn.Module, head_blocks: int, tail_blocks: int, x: torch.Tensor
) -> torch.Tensor:
    """``s = head(x)``: the activations a client sends (the body's input)."""
    head, _, _ = split_blocks(model, head_blocks, tail_blocks)
    with swapped_blocks(model, [*head, _Stop()]):
        return _run_until_stop(model, x)


def body_output(
    model: nn.Module,
    head_blocks: int,
    tail_blocks: int,
    s: torch.Tensor,
    probe: torch.Tensor,
) -> torch.Tensor:
    """``h = body(s)``, on the server (differentiable in ``s``).

    The model's forward runs on ``probe`` (any input of the batch's shape:
    what reaches the body's blocks besides the hidden state, such as a
    causal mask, depends on the shape only); the head's output is replaced
    by ``s`` and the pass stops after the body.
    """
    _, body, _ = split_blocks(model, head_blocks, tail_blocks)
    with swapped_blocks(model, [_Given(s), *body, _Stop()]):
        return _run_until_stop(model, probe)


class _RemoteBody(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        s: torch.Tensor,
        h: torch.Tensor,
        stand_in: RemoteBody,
    ) -> torch.Tensor:
        ctx.stand_in = stand_in
        return h.detach().to(s.dtype).clone()

    @staticmethod
    def backward(ctx: Any, grad_h: torch.Tensor) -> tuple[Any, Any, None]:
        stand_in = ctx.stand_in
        stand_in.grad_h = grad_h.detach().clone()
        grad_s = stand_in.grad_s
        if grad_s is not None and ctx.needs_input_grad[0]:
            grad_s = grad_s.to(grad_h.dtype)
        else:
            grad_s = None
        return grad_s, None, None


class RemoteBody(nn.Module):
    """The body as the client sees it: the server's ``h``, and its ``dL/ds``.

    Placed in the block list in place of the body (:func:`remote_body`):
    the forward pass returns ``h`` (what the server computed from this
    client's ``s``); the backward pass keeps ``dL/dh`` in :attr:`grad_h`
    (what the client sends back) and passes ``grad_s`` (the server's
    ``dL/ds``; None before the server has answered) on to the head.
    """

    def __init__(self, h: torch.Tensor, grad_s: torch.Tensor | None = None) -> None:
        super().__init__()
        self.h = h
        self.grad_s = grad_s
        self.grad_h: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # h "requires grad" so that the tail's backward reaches this stand-in
        # even where nothing before the body trains.
        h = self.h.detach().requires_grad_(True)
        return _RemoteBody.apply(hidden, h, self)


@contextlib.contextmanager
def remote_body(
    model: nn.Module, head_blocks: int, tail_blocks: int, stand_in: RemoteBody
) -> Iterator[nn.Module]:
    """``model`` as ``tail(stand_in(head(x)))``: the client's half of a split step."""
    head, _, tail = split_blocks(model, head_blocks, tail_blocks)
    with swapped_blocks(model, [*head, stand_in, *tail]):
        yield model
