"""SFPrompt's client: the split, the local path, EL2N pruning and the byte count."""

import math

import pytest
import torch
from torch import nn

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.sfprompt import (
    DOWNLINK_BYTES,
    KEPT,
    UPLINK_BYTES,
    SplitPhases,
    el2n_scores,
    kept_indices,
)
from bouquet.tasks.finetune import build_task_model
from bouquet.tasks.foundation import (
    RemoteBody,
    block_stack,
    body_output,
    remote_body,
    smashed,
    split_blocks,
    without_body,
)
from bouquet.tasks.spec import DatasetInfo

pytest.importorskip("transformers")

INFO = DatasetInfo("digits", (1, 8, 8), 10)
X = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.arange(10) % 10


def _vit(peft: str = "prompt") -> nn.Module:
    return build_task_model({"model": "vit-tiny", "peft": peft, "seed": 1}, INFO)


def test_the_split_is_u_shaped_and_the_local_path_skips_the_body():
    model = _vit()
    head, body, tail = split_blocks(model, 1, 1)
    assert (len(head), len(body), len(tail)) == (1, 2, 1)
    vit = model.net.vit
    with torch.no_grad():
        manual = vit.embeddings(X)  # the prompt tokens are inserted here
        manual = vit.layernorm(tail[0](head[0](manual)))
        manual = model.net.classifier(manual[:, 0])
        with without_body(model, 1, 1):
            local = model(X)
        full = model(X)
    torch.testing.assert_close(local, manual)
    assert len(getattr(*block_stack(model))) == 4  # restored
    assert not torch.allclose(full, local)
    # A model without a block stack has no body: all of it is the client's.
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert split_blocks(mlp, 1, 1)[1] == []


def test_el2n_by_hand_and_pruning_keeps_the_hardest():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    p = 1 / (1 + math.exp(-1))  # softmax([1, 0])[0]
    expected = [
        math.sqrt(2) * (1 - p),  # right, confident
        math.sqrt(2) * 0.5,  # uniform
        math.sqrt(2) * p,  # wrong, confident
    ]
    scores = el2n_scores(model, x, y)
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64))
    assert kept_indices(scores, 0.5).tolist() == [1, 2]  # ceil(1.5) = 2 hardest
    assert kept_indices(torch.zeros(4), 0.5).tolist() == [0, 1]  # ties: by index
    assert kept_indices(scores, 1e-9).tolist() == [2]  # at least one


def _settings() -> TrainSettings:
    return TrainSettings(epochs=1, batch_size=4, lr=0.1)


def test_the_three_phases_equal_their_step_by_step_reference():
    # Reference: the local-loss epoch on tail(head(x)), EL2N with that path,
    # then the plain loop on the kept examples, same generator stream.
    reference = _vit()
    generator = torch.Generator().manual_seed(5)
    with without_body(reference, 1, 1):
        train_local(reference, (X, Y), _settings(), generator=generator)
        kept = kept_indices(el2n_scores(reference, X, Y), 0.5)
    train_local(reference, (X[kept], Y[kept]), _settings(), generator=generator)

    model = _vit()
    hook = SplitPhases(0.5, 1, 1, 1)
    result = train_local(
        model,
        (X, Y),
        _settings(),
        [hook],
        generator=torch.Generator().manual_seed(5),
    )
    for (name, got), want in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, msg=name)
    metrics = result.run.metrics
    assert metrics[KEPT] == 5 and result.num_examples == 5
    # Per kept example: s, dL/dh up; h, dL/ds down; tokens 1 + 16 + 4 prompts.
    per_example = 21 * 64 * 4
    assert metrics[UPLINK_BYTES] == metrics[DOWNLINK_BYTES] == 2 * 5 * per_example
    assert not any(h for h in model.net.vit.layers[1]._forward_pre_hooks.values())


def test_without_trainable_head_no_gradient_goes_back_to_it():
    model = _vit("head")  # only the classifier trains: nothing to send dL/ds to
    hook = SplitPhases(1.0, 0, 1, 1)
    result = train_local(
        model, (X, Y), _settings(), [hook], generator=torch.Generator().manual_seed(0)
    )
    assert result.run.metrics[UPLINK_BYTES] == 10 * 17 * 64 * 4  # s only
    assert result.run.metrics[DOWNLINK_BYTES] == 10 * (21 - 4) * 64 * 4


def test_el2n_of_a_sequence_model_averages_its_tokens():
    # Logits (n, C, T) = (1, 2, 2): token 0 uniform, token 1 certain and right.
    logits = torch.tensor([[[0.0, 50.0], [0.0, 0.0]]])

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return logits + self.w

    scores = el2n_scores(Fixed(), torch.zeros(1), torch.tensor([[0, 0]]))
    torch.testing.assert_close(
        scores, torch.tensor([math.sqrt(2) * 0.5 / 2], dtype=torch.float64)
    )


def test_a_failed_run_leaves_no_byte_counter_on_the_pooled_model():
    from bouquet.clientapps.hooks import Hook

    class Fails(Hook):
        def loss(self, run, loss, logits, x, y):
            raise RuntimeError("the node ran out of memory")

    model = _vit("head")
    with pytest.raises(RuntimeError):
        train_local(
            model,
            (X, Y),
            _settings(),
            [SplitPhases(1.0, 0, 1, 1), Fails()],
            generator=torch.Generator().manual_seed(0),
        )
    hook = SplitPhases(1.0, 0, 1, 1)  # the next message on the same model
    result = train_local(
        model, (X, Y), _settings(), [hook], generator=torch.Generator().manual_seed(0)
    )
    assert result.run.metrics[UPLINK_BYTES] == 10 * 17 * 64 * 4
    assert not any(h for h in model.net.vit.layers[1]._forward_pre_hooks.values())


@pytest.mark.parametrize(
    ("model_name", "info", "peft", "split"),
    [
        ("vit-tiny", INFO, "prompt", (1, 1)),
        ("gpt2-tiny", DatasetInfo("grammar-text", (12,), 20), "head", (0, 1)),
    ],
)
def test_the_cut_passes_the_full_models_gradients(model_name, info, peft, split):
    # Client: s = head(x); server: h = body(s); client: tail(h), dL/dh;
    # server: dL/ds; client: the step with RemoteBody. Same as one backward.
    model = build_task_model({"model": model_name, "peft": peft, "seed": 1}, info)
    generator = torch.Generator().manual_seed(0)
    if model_name == "vit-tiny":
        x, y = X, Y
    else:
        x = torch.randint(0, 20, (3, 12), generator=generator).float()
        y = torch.randint(0, 20, (3, 12), generator=generator)
    nn.functional.cross_entropy(model(x), y).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    s = smashed(model, *split, x).detach().requires_grad_(True)
    h = body_output(model, *split, s, torch.zeros_like(x))  # the server's probe
    tail_only = RemoteBody(h.detach())
    with remote_body(model, *split, tail_only):
        nn.functional.cross_entropy(model(x), y).backward()
    (grad_s,) = torch.autograd.grad(h, s, tail_only.grad_h)
    model.zero_grad(set_to_none=True)
    with remote_body(model, *split, RemoteBody(h.detach(), grad_s)):
        nn.functional.cross_entropy(model(x), y).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, full[name], rtol=0, atol=1e-7)
    blocks = getattr(*block_stack(model))  # the model's own list is back
    assert list(blocks) == [b for part in split_blocks(model, *split) for b in part]
