"""HyperFL's model wrapper and two-stage client on a tiny model."""

import torch

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.hyperfl import make_hooks
from bouquet.tasks import hypernet
from bouquet.tasks.hypernet import HyperModel

GEN = torch.Generator().manual_seed(0)
X = torch.randn(8, 3, generator=GEN)
Y = torch.tensor([0, 1, 1, 0, 1, 0, 1, 0])


def _model():
    torch.manual_seed(2)
    base = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    )
    return HyperModel(base)


def test_the_feature_extractor_is_generated_and_not_in_the_state_dict():
    model = _model()
    keys = list(model.state_dict())
    assert keys[0] == "embedding" and keys[-1] == "base.2.bias"
    assert "base.0.weight" not in keys and "base.2.weight" in keys
    theta = model.generated()
    flat = model.hyper(model.embedding)
    # theta = h(v; phi), entries in order.
    torch.testing.assert_close(theta["0.weight"], flat[:12].view(4, 3))
    torch.testing.assert_close(theta["0.bias"], flat[12:16])
    by_hand = model.base[2](torch.tanh(X @ theta["0.weight"].T + theta["0.bias"]))
    torch.testing.assert_close(model(X), by_hand)
    # phi's size does not grow with the model: one chunk here.
    assert model.hyper.chunks.shape == (1, hypernet.CHUNK_DIM)


def _train(model, head_epochs, state):
    config = {
        "hyperfl.head-epochs": head_epochs,
        "hyperfl.lr-head": 0.2,
        "hyperfl.grad-clip": 50.0,
    }
    return train_local(
        model,
        (X, Y),
        TrainSettings(batch_size=8, lr=0.1, epochs=head_epochs + 1),
        make_hooks(config),
        generator=torch.Generator().manual_seed(1),
        config=config,
        state=state,
    )


def test_stage_one_moves_the_head_only_stage_two_phi_and_v_only():
    model, state = _model(), {}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Reference: the embedding is drawn from the node's stream (seed 1).
    drawn = torch.randn(hypernet.EMBED_DIM, generator=torch.Generator().manual_seed(1))
    reference = _model()
    with torch.no_grad():
        reference.embedding.copy_(drawn)
    # Stage 1 (one full batch): head -= lr_head * grad; nothing else moves.
    loss = torch.nn.functional.cross_entropy(reference(X), Y)
    head = [reference.base[2].weight, reference.base[2].bias]
    grads = torch.autograd.grad(loss, head)
    expected_head = [p.detach() - 0.2 * g for p, g in zip(head, grads, strict=True)]
    # Stage 2 (one full batch) at the new head: phi and v move by lr * grad.
    with torch.no_grad():
        for p, e in zip(head, expected_head, strict=True):
            p.copy_(e)
    loss = torch.nn.functional.cross_entropy(reference(X), Y)
    phi = list(reference.hyper.parameters())
    grads = torch.autograd.grad(loss, [*phi, reference.embedding])
    _train(model, 1, state)
    after = model.state_dict()
    torch.testing.assert_close(after["base.2.weight"], expected_head[0])
    torch.testing.assert_close(after["base.2.bias"], expected_head[1])
    torch.testing.assert_close(after["embedding"], drawn - 0.1 * grads[-1])
    names = [f"hyper.{n}" for n, _ in reference.hyper.named_parameters()]
    for name, p, g in zip(names, phi, grads, strict=False):
        torch.testing.assert_close(after[name], p.detach() - 0.1 * g)
        assert not torch.equal(after[name], before[name])
    assert state  # the node remembers it drew its embedding


def test_the_embedding_is_drawn_once():
    model, state = _model(), {}
    _train(model, 0, state)
    v = model.embedding.detach().clone()
    _train(model, 0, state)
    # Second round: trained from v, not redrawn (stays close to it).
    assert float((model.embedding.detach() - v).norm()) < 0.5 * float(v.norm())
