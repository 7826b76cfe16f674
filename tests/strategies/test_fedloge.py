"""FedLoGe: the SSE-C, the three heads' losses on a tiny model, local realignment."""

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn
from torch.nn import functional as F  # noqa: N812

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.fedloge import (
    SSEC,
    LocalGenericHeads,
    evaluation_model,
)
from bouquet.clientapps.state import load_arrays, save_arrays
from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedloge import STATE, FedLoGe
from bouquet.tasks.etf import simplex_etf, sparse_etf

X = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 0, 1, 1, 0])
SSE = torch.tensor([[0.1, 0.0, -0.1, 0.0], [0.0, 0.1, 0.0, -0.1]])


def _model():
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_the_etf_is_a_simplex_and_its_sparse_refinement_keeps_zeros():
    etf = simplex_etf(5, 3, np.random.default_rng(0))
    gram = etf.T @ etf
    np.testing.assert_allclose(np.diag(gram), 1.0, atol=1e-12)  # unit columns
    np.testing.assert_allclose(gram[0, 1], -1 / 2, atol=1e-12)  # -1 / (C - 1)
    raw = sparse_etf(16, 4, seed=1, steps=0)
    refined = sparse_etf(16, 4, seed=1, steps=50)
    assert refined.shape == (4, 16) and refined.dtype == np.float32
    assert np.array_equal(refined == 0, raw == 0)
    assert 0.4 < (raw == 0).mean() < 0.8
    before = np.abs(np.linalg.norm(raw, axis=1) - 0.1).sum()
    after = np.abs(np.linalg.norm(refined, axis=1) - 0.1).sum()
    assert after < before
    np.testing.assert_array_equal(refined, sparse_etf(16, 4, seed=1, steps=50))


def test_one_step_trains_backbone_on_ssec_and_heads_on_detached_features():
    # Prepare: the reference, by hand
    reference = _model()
    local = {k: v.clone() for k, v in reference[2].state_dict().items()}
    f = reference[1](reference[0](X))
    logits_local = F.linear(f.detach(), local["weight"], local["bias"])
    loss = (
        F.cross_entropy(F.linear(f, SSE), Y)
        + F.cross_entropy(reference[2](f.detach()), Y)
        + F.cross_entropy(logits_local, Y)
    )
    expected = {}
    params = dict(reference.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, p), g in zip(params.items(), grads, strict=True):
        expected[name] = p.detach() - 0.5 * g
    local_w = local["weight"].requires_grad_(True)
    local_b = local["bias"].requires_grad_(True)
    loss_l = F.cross_entropy(F.linear(f.detach(), local_w, local_b), Y)
    gw, gb = torch.autograd.grad(loss_l, [local_w, local_b])

    # Execute
    model, state = _model(), RecordDict()
    settings = TrainSettings(epochs=1, batch_size=6, lr=0.5, momentum=0.0)
    train_local(
        model,
        (X, Y),
        settings,
        [LocalGenericHeads()],
        generator=torch.Generator().manual_seed(0),
        config={SSEC: [float(v) for v in SSE.ravel()]},
        state=state,
    )

    # Assert
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.detach(), expected[name])
    kept = load_arrays(state, "fedloge", "local-head")
    np.testing.assert_allclose(kept["weight"], (local_w - 0.5 * gw).detach(), rtol=1e-5)
    np.testing.assert_allclose(kept["bias"], (local_b - 0.5 * gb).detach(), rtol=1e-5)
    np.testing.assert_array_equal(kept["counts"], [3.0, 3.0])


def test_local_realignment_scales_rows_by_local_norms_and_masks_absent_classes():
    model, state = _model(), RecordDict()
    local = np.array([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], np.float32)
    save_arrays(
        state,
        "fedloge",
        "local-head",
        {"weight": local, "bias": np.zeros(2), "counts": np.array([5.0, 0.0])},
    )
    realigned = evaluation_model(model, {}, state)
    head, original = realigned[2], model[2]
    torch.testing.assert_close(head.weight[0], original.weight[0] * 6.0)  # 1 + 5
    torch.testing.assert_close(head.weight[1], original.weight[1] * 2.0)  # 1 + 1
    assert head.bias[1] == -1e9 and head.bias[0] == original.bias[0]
    assert evaluation_model(model, {}, RecordDict()) is model  # no local head yet


def test_the_server_builds_the_ssec_once_and_sends_it_flat():
    strategy = FedLoGe(refine_steps=5)
    ctx = RoundContext(
        server_round=1,
        num_rounds=2,
        phase="train",
        nodes=(1, 2),
        sampled=(),
        arrays={"0.weight": np.zeros((16, 3)), "2.weight": np.zeros((4, 16))},
        config={},
    )
    sent = strategy.round_config(ctx)[SSEC]
    assert len(sent) == 4 * 16
    kept = strategy.state[STATE]["ssec"]
    assert kept.shape == (4, 16)
    assert strategy.round_config(ctx)[SSEC] == sent
