"""FED-PUB's client: two steps against a hand-written reference, the embedding."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.fedpub import (
    EMBEDDING,
    EMBEDDING_KEY,
    functional_embedding,
    make_hooks,
    proxy_inputs,
)
from bouquet.tasks import graph
from bouquet.tasks.masked import mask_linears

L1, LOC_L2 = 0.01, 0.1
CONFIG = {
    "fedpub.l1": L1,
    "fedpub.loc-l2": LOC_L2,
    "fedpub.n-proxy": 1,
    "fedpub.proxy-seed": 3,
    "server-round": 2,
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return mask_linears(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)))


def _reference_steps(model, x, y, lr, steps, proximal):
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(steps):
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        for name, p in model.named_parameters():
            if name.endswith("mask"):
                loss = loss + L1 * p.abs().sum()
            elif proximal:
                loss = loss + LOC_L2 * torch.linalg.vector_norm(p - start[name])
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad


@pytest.mark.parametrize(("server_round", "proximal"), [(2, True), (1, False)])
def test_two_steps_equal_the_reference(server_round, proximal):
    # Prepare: one full batch, two steps (the proximal term acts in the second)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    model = _model()
    reference = copy.deepcopy(model)
    # Execute
    result = train_local(
        model,
        (x, y),
        TrainSettings(epochs=2, batch_size=6, lr=0.5),
        make_hooks({**CONFIG, "server-round": server_round}),
        generator=torch.Generator().manual_seed(0),
    )
    _reference_steps(reference, x, y, 0.5, 2, proximal)
    # Assert: masks moved (L1 and CE) and equal the reference, as do weights
    for (name, got), want in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        if name.endswith("prune_below"):
            assert float(got) == pytest.approx(L1)  # the eval threshold is l1
            continue
        torch.testing.assert_close(got, want, msg=name)
    assert not torch.equal(model[0].mask, torch.ones_like(model[0].mask))
    # The reply carries the embedding: the classifier's input over the proxy
    sent = result.run.reply_records[EMBEDDING][EMBEDDING_KEY].numpy()
    assert sent.shape == (5,) and sent.dtype == np.float32


def test_the_embedding_is_the_mean_classifier_input_in_eval_mode():
    model = _model()
    with torch.no_grad():
        model[0].mask[0, 0] = 1e-4  # pruned in eval (|m| < l1 = 1e-3)
        model[0].prune_below.fill_(1e-3)
    proxy = proxy_inputs(model, (4,), n_proxy=1, seed=3)
    assert proxy.shape == (100, 4)
    torch.testing.assert_close(proxy, proxy_inputs(model, (4,), 1, 3))
    # Execute
    got = functional_embedding(model, proxy)
    # Assert: by hand, mask pruned, no dropout; the model is back in train mode
    w = model[0].weight * model[0].mask.masked_fill(model[0].mask.abs() < 1e-3, 0)
    want = torch.relu(proxy @ w.T + model[0].bias).mean(0)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert model.training


def test_a_gcn_is_described_on_the_proxy_graph_by_its_second_layer():
    torch.manual_seed(0)
    model = mask_linears(graph.GCN(3, 2, hidden=4))
    proxy = proxy_inputs(model, (graph.SLOTS, 4), n_proxy=1, seed=0)
    np.testing.assert_array_equal(proxy.numpy(), graph.proxy_rows(1, 3, 0))
    got = functional_embedding(model, proxy)
    want = model.eval().embed(proxy).mean(0).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_model_without_masks_is_refused():
    plain = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="masked"):
        train_local(
            plain,
            (torch.randn(2, 4), torch.tensor([0, 1])),
            TrainSettings(epochs=1, batch_size=2),
            make_hooks(CONFIG),
            generator=torch.Generator().manual_seed(0),
        )
