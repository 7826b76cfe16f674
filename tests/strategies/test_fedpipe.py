"""FedPipe: NF quantisation, the rank-sliced mean by hand, the client's rank mask."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bouquet.clientapps.recipes.fedpipe import make_hooks
from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedpipe import FedPipe, RankSlicedMean
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import DataSpec, dataset_info
from bouquet.tasks.finetune import build_task_model
from bouquet.tasks.normalfloat import normal_float_code, quantize_dequantize

DIGITS = dataset_info(DataSpec(dataset="digits-shift"))

QLORA_NF4 = [  # QLoRA's NF4 levels (bitsandbytes' table), 4 decimals
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
]  # fmt: skip


def test_the_nf4_code_is_qloras_and_blocks_keep_their_absmax():
    np.testing.assert_allclose(normal_float_code(4).numpy(), QLORA_NF4, atol=1e-4)
    assert len(normal_float_code(8)) == 256
    w = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 0.0
    q = quantize_dequantize(w, 4, block=64)
    assert q.shape == w.shape and q[0, 0] == 0.0
    flat, restored = w.reshape(-1), q.reshape(-1)
    for start in (0, 64, 128):  # the last block is short (150 values)
        block, got = flat[start : start + 64], restored[start : start + 64]
        scale = block.abs().max()
        levels = got / scale
        nearest = (block / scale)[:, None] - normal_float_code(4)[None, :]
        expected = normal_float_code(4)[nearest.abs().argmin(dim=1)]
        torch.testing.assert_close(levels, expected)
        assert got.abs().max() == pytest.approx(float(scale))


def test_each_rank_slice_is_averaged_over_the_nodes_that_train_it():
    start = {
        "l.lora_A.default.weight": np.zeros((3, 2), np.float32),
        "l.lora_B.default.weight": np.zeros((2, 3), np.float32),
        "head.bias": np.zeros(2, np.float32),
    }
    ranks = {0: 1, 1: 2, 2: 3}
    replies = []
    for node, value in ((0, 1.0), (1, 2.0), (2, 4.0)):
        arrays = {k: np.full_like(v, value) for k, v in start.items()}
        arrays["l.lora_A.default.weight"][ranks[node] :] = 0.0
        arrays["l.lora_B.default.weight"][:, ranks[node] :] = 0.0
        replies.append(
            ClientReply(
                node=node, partition=node, num_examples=1, metrics={}, arrays=arrays
            )
        )
    weights = np.array([0.5, 0.25, 0.25])
    ctx = RoundContext(1, None, "train", (0, 1, 2), (0, 1, 2), start, {})
    ctx.per_node.update({n: {"rank": r} for n, r in ranks.items()})
    delta, _ = RankSlicedMean().update(replies, weights, None, ctx)
    # slice 0: all three (0.5*1 + 0.25*2 + 0.25*4 = 2); slice 1: nodes 1, 2
    # (weights 1/2, 1/2: 3); slice 2: node 2 only (4). The head: mean 2.
    np.testing.assert_allclose(delta["l.lora_A.default.weight"][:, 0], [2.0, 3.0, 4.0])
    np.testing.assert_allclose(delta["l.lora_B.default.weight"][0], [2.0, 3.0, 4.0])
    np.testing.assert_allclose(delta["head.bias"], [2.0, 2.0])


def test_with_every_node_at_full_rank_it_is_the_weighted_mean():
    rng = np.random.default_rng(0)
    start = {
        "m.lora_A.default.weight": rng.normal(size=(2, 3)),
        "h": rng.normal(size=4),
    }
    replies = [
        ClientReply(
            node=n,
            partition=n,
            num_examples=1,
            metrics={},
            arrays={k: rng.normal(size=v.shape) for k, v in start.items()},
        )
        for n in range(3)
    ]
    weights = np.array([0.2, 0.3, 0.5])
    ctx = RoundContext(1, None, "train", (0, 1, 2), (0, 1, 2), start, {})
    delta, _ = RankSlicedMean().update(replies, weights, None, ctx)
    for key, value in start.items():
        mean = sum(w * r.arrays[key] for w, r in zip(weights, replies, strict=True))
        np.testing.assert_allclose(delta[key], mean - value)


def test_nodes_take_the_tiers_in_turn_and_bad_tiers_are_refused():
    strategy = FedPipe(rank_tiers="2,4,8")
    assert [strategy.node_rank(n, (30, 10, 20, 40)) for n in (10, 20, 30, 40)] == [
        2,
        4,
        8,
        2,
    ]
    assert strategy.run_settings() == {
        "peft": "lora",
        "lora-rank": 8,
        "lora-alpha": 2.0,
    }
    with pytest.raises(ValueError, match="rank-tiers='2,x'"):
        FedPipe(rank_tiers="2,x").validate()


def test_the_client_trains_its_leading_slices_on_a_quantised_backbone():
    config = {"model": "mlp", "dataset": "digits-shift", "peft": "lora", "lora-rank": 4}
    model = build_task_model(config, DIGITS)
    with torch.no_grad():  # B != 0, so that every factor has a gradient
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_()
    frozen = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if not p.requires_grad
    }
    (hook,) = make_hooks({"fedpipe.rank": 2, "fedpipe.quant-bits": 4})
    run = SimpleNamespace(model=model)
    hook.setup(run)
    layer = model.get_submodule("1")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a[2:].abs().sum() == 0 and b[:, 2:].abs().sum() == 0
    assert a[:2].abs().sum() > 0
    base = layer.base_layer.weight
    torch.testing.assert_close(
        base, quantize_dequantize(frozen["1.base_layer.weight"], 4)
    )
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1
    )
    x, y = torch.randn(8, *DIGITS.input_shape), torch.arange(8)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    hook.before_step(run)
    optimizer.step()
    assert a[2:].abs().sum() == 0 and b[:, 2:].abs().sum() == 0
    hook.finish(run)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(p, frozen[name], rtol=0, atol=0)
