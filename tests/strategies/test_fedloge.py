"""FedLoGe: the SSE-C, the three heads' losses on a tiny model, local realignment."""

import json
from pathlib import Path

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
from bouquet.strategies.validation import ClientReply
from bouquet.tasks.etf import refine, simplex_etf, sparse_etf

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


GOLDEN = json.loads(
    (Path(__file__).parent / "data" / "fedloge_official.json").read_text()
)


class _Uniform:
    """A generator whose one uniform draw is the official run's fixed draw."""

    def uniform(self, size):
        return np.array(GOLDEN["etf"]["uniform"])


def test_etf_and_ssec_refinement_match_the_official_code():
    # The ETF: the official code casts its QR basis to float32 (atol 1e-7).
    ours = simplex_etf(5, 4, _Uniform())
    np.testing.assert_allclose(ours, GOLDEN["etf"]["ori_M"], rtol=1e-6, atol=1e-7)
    # The refinement, from the official sparse start (the official code zeroes
    # exactly int(0.6 d C) entries, ours each with probability 0.6: a decision,
    # so the start is given), at the official lr 1e-4; the official run was
    # cast to float64 and capped at 500 of its 10,000 steps.
    start = np.array(GOLDEN["ssec"]["sparse_start"])
    c = GOLDEN["ssec"]
    refined = refine(start, start != 0, norm=c["norm"], steps=c["steps"], lr=c["lr"])
    np.testing.assert_allclose(refined, c["refined"], rtol=1e-6, atol=1e-12)


def _golden_arrays(backbone, g_aux):
    return {
        "0.weight": np.array(backbone["fc.weight"], np.float32),
        "0.bias": np.array(backbone["fc.bias"], np.float32),
        "2.weight": np.array(g_aux["weight"], np.float32),
        "2.bias": np.array(g_aux["bias"], np.float32),
    }


def test_local_training_aggregation_and_realignment_match_the_official_code():
    """Official ``update_weights_gaux``, ``FedAvg_noniid(_classifier)``, ``localtest``.

    Compared where the two agree by design: the official SSE-C's bias (random,
    never trained) was zeroed (ours has none); each local head starts from the
    official run's (ours starts from ``g_aux``); the realigned rows
    ``g_aux_c ||l_k,c||`` are compared (``localtest``'s ``p_mode`` 2: its
    default, 1, adds ``l_k``'s logits unrealigned), not the masking of absent
    classes (ours a -1e9 bias, theirs -1e10 weight rows) nor the logits' sum.
    """
    ssec = torch.tensor(GOLDEN["ssec"]["refined"], dtype=torch.float64).T.float()
    local = GOLDEN["local"]
    settings = TrainSettings(
        epochs=local["epochs"],
        batch_size=local["batch_size"],
        lr=local["lr"],
        momentum=local["momentum"],
    )
    start = _golden_arrays(GOLDEN["global_before"], GOLDEN["g_aux_before"])
    replies, states = [], []
    for i, client in enumerate(GOLDEN["clients"]):
        model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))
        model.load_state_dict({k: torch.tensor(v) for k, v in start.items()})
        state = RecordDict()
        before = client["l_head_before"]
        save_arrays(
            state,
            "fedloge",
            "local-head",
            {
                "weight": np.array(before["weight"], np.float32),
                "bias": np.array(before["bias"], np.float32),
                "counts": np.zeros(4, np.float32),
            },
        )
        train_local(
            model,
            (torch.tensor(client["x"]), torch.tensor(client["y"])),
            settings,
            [LocalGenericHeads()],
            generator=torch.Generator().manual_seed(0),
            config={SSEC: [float(v) for v in ssec.ravel()]},
            state=state,
        )
        after = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        expected = _golden_arrays(client["backbone_after"], client["g_aux_after"])
        for k, v in expected.items():
            np.testing.assert_allclose(after[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
        kept = load_arrays(state, "fedloge", "local-head")
        for k in ("weight", "bias"):
            np.testing.assert_allclose(
                kept[k], client["l_head_after"][k], rtol=1e-6, atol=1e-7, err_msg=k
            )
        replies.append(
            ClientReply(
                node=i,
                partition=i,
                num_examples=GOLDEN["num_examples"][i],
                metrics={},
                arrays=after,
                records={},
            )
        )
        states.append(state)

    # The server: sample-weighted FedAvg of the backbone and of g_aux.
    ctx = RoundContext(
        server_round=1,
        num_rounds=1,
        phase="train",
        nodes=(0, 1, 2),
        sampled=(0, 1, 2),
        arrays=start,
        config={},
    )
    merged = FedLoGe().aggregate(replies, ctx)
    expected = _golden_arrays(GOLDEN["backbone_global"], GOLDEN["g_aux_global"])
    for k, v in expected.items():
        np.testing.assert_allclose(merged[k], v, rtol=1e-6, atol=1e-7, err_msg=k)

    # Realignment: our head's rows are g_aux_c (1 + ||l_k,c||), i.e. g_aux + P_k.
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))
    model.load_state_dict({k: torch.tensor(v) for k, v in expected.items()})
    for state, official in zip(states, GOLDEN["realigned_P"], strict=True):
        head = evaluation_model(model, {}, state)[2].weight.detach().numpy()
        p_k = head - expected["2.weight"]
        np.testing.assert_allclose(p_k, official, rtol=1e-6, atol=1e-7)
