"""FedPipe: NF quantisation, slices on the wire, the solver, selection, the client."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bouquet.clientapps import partial
from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.recipes.fedpipe import make_hooks
from bouquet.strategies import fedpipe_plan as plan
from bouquet.strategies.aggregation import to_record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedpipe import FedPipe, RankSlicedMean, node_part
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import DataSpec, dataset_info
from bouquet.tasks.arrays import array_record
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


A, B = "l.lora_A.default.weight", "l.lora_B.default.weight"
A2, B2 = "m.lora_A.default.weight", "m.lora_B.default.weight"


def _reply(node, arrays):
    return ClientReply(
        node=node, partition=node, num_examples=1, metrics={}, arrays=arrays
    )


def test_each_rank_slice_is_averaged_over_the_nodes_that_carry_it():
    # Prepare: two adapters at r_max 3 and a head; m's adapter is not selected
    start = {
        A: np.zeros((3, 2), np.float32),
        B: np.zeros((2, 3), np.float32),
        A2: np.full((3, 2), 5.0, np.float32),
        B2: np.full((2, 3), 5.0, np.float32),
        "head.bias": np.zeros(2, np.float32),
    }
    ranks = {0: 1, 1: 2, 2: 3}
    replies = []
    for node, value in ((0, 1.0), (1, 2.0), (2, 4.0)):
        part = node_part(start, ranks[node], ["l"])
        assert set(part) == {A, B, "head.bias"}
        assert part[A].shape == (ranks[node], 2) and part[B].shape == (2, ranks[node])
        replies.append(
            _reply(node, {k: np.full_like(v, value) for k, v in part.items()})
        )
    weights = np.array([0.5, 0.25, 0.25])
    ctx = RoundContext(1, None, "train", (0, 1, 2), (0, 1, 2), start, {})
    # Execute
    delta, _ = RankSlicedMean().update(replies, weights, None, ctx)
    # Assert: slice 0: all three (0.5*1 + 0.25*2 + 0.25*4 = 2); slice 1: nodes
    # 1, 2 (weights 1/2, 1/2: 3); slice 2: node 2 only (4). The head: mean 2.
    np.testing.assert_allclose(delta[A][:, 0], [2.0, 3.0, 4.0])
    np.testing.assert_allclose(delta[B][0], [2.0, 3.0, 4.0])
    np.testing.assert_allclose(delta["head.bias"], [2.0, 2.0])
    np.testing.assert_allclose(delta[A2], 0.0)  # carried by nobody: unchanged
    np.testing.assert_allclose(delta[B2], 0.0)


def test_with_every_node_at_full_rank_it_is_the_weighted_mean():
    rng = np.random.default_rng(0)
    start = {
        A: rng.normal(size=(2, 3)),
        B: rng.normal(size=(4, 2)),
        "h": rng.normal(size=4),
    }
    replies = [
        _reply(n, {k: rng.normal(size=v.shape) for k, v in start.items()})
        for n in range(3)
    ]
    weights = np.array([0.2, 0.3, 0.5])
    ctx = RoundContext(1, None, "train", (0, 1, 2), (0, 1, 2), start, {})
    delta, _ = RankSlicedMean().update(replies, weights, None, ctx)
    for key, value in start.items():
        mean = sum(w * r.arrays[key] for w, r in zip(weights, replies, strict=True))
        np.testing.assert_allclose(delta[key], mean - value)


def _two_adapters() -> torch.nn.Module:
    root = torch.nn.Module()
    for name in ("l", "m"):
        layer = torch.nn.Module()
        layer.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(3, 4, False)})
        layer.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(4, 5, False)})
        setattr(root, name, layer)
    return root


def test_a_node_part_is_padded_on_the_node_and_cut_back_in_the_reply():
    model = _two_adapters()  # A (4, 3), B (5, 4)
    sent = array_record({A: np.full((2, 3), 7.0, np.float32)})
    full = partial.expand(sent, model, skip={B})
    assert set(full.keys()) == {A, A2, B2}  # B skipped (frozen); A2, B2: zero
    np.testing.assert_array_equal(full[A].numpy()[:2], 7.0)
    np.testing.assert_array_equal(full[A].numpy()[2:], 0.0)
    np.testing.assert_array_equal(full[A2].numpy(), 0.0)
    back = partial.shrink(full, sent)
    assert list(back.keys()) == [A] and back[A].numpy().shape == (2, 3)
    np.testing.assert_array_equal(back[A].numpy(), 7.0)
    with pytest.raises(ConfigError, match="leading block"):
        partial.expand(array_record({A: np.zeros((5, 3), np.float32)}), model)
    with pytest.raises(ConfigError, match="entries of this node"):
        partial.expand(array_record({"x": np.zeros(1, np.float32)}), model)


def test_the_wire_carries_only_each_nodes_slices():
    # The stand-in's ViT: 8 adapters of 64 -> 64 at r_max 8, a 10-class head.
    arrays = {}
    for i in range(8):
        arrays[f"a{i}.lora_A.default.weight"] = np.zeros((8, 64), np.float32)
        arrays[f"a{i}.lora_B.default.weight"] = np.zeros((64, 8), np.float32)
    arrays["head.weight"] = np.zeros((10, 64), np.float32)
    arrays["head.bias"] = np.zeros(10, np.float32)
    padded = sum(v.nbytes for v in arrays.values())
    assert padded == 4 * (650 + 8 * 8 * 128)
    for rank, kept in ((2, ["a0", "a3", "a5", "a6"]), (8, ["a1"])):
        part = node_part(arrays, rank, kept)
        sent = to_record(part)
        floats = 650 + rank * len(kept) * 128
        assert sum(v.nbytes for v in part.values()) == 4 * floats
        assert sum(len(a.data) for a in sent.values()) < padded
    assert len(to_record(node_part(arrays, 2, ["a0"])).keys()) == 4


def test_the_cost_model_grows_with_rank_and_batch():
    cost = plan.CostModel(dims=((64, 64), (64, 64)), head=650, tokens=17)
    for r in (2, 4):
        for b in (8, 16):
            assert cost.memory(r, b) < cost.memory(2 * r, b)
            assert cost.memory(r, b) < cost.memory(r, 2 * b)
            assert cost.time(r, b, 1e9, 1e7) < cost.time(2 * r, b, 1e9, 1e7)
            assert cost.time(r, 2 * b, 1e9, 1e7) < cost.time(r, b, 1e9, 1e7)
            assert cost.time(r, b, 2e9, 1e7) < cost.time(r, b, 1e9, 1e7)
    # by hand: 16 (650 + 2*256) + 4*8*17*(2*130) + 4/8*8192
    assert cost.memory(2, 8) == 16 * 1162 + 4 * 8 * 17 * 260 + 4096


def test_the_solver_meets_the_slowest_nodes_time_and_spends_slack_on_rank():
    cost = plan.CostModel(dims=((64, 64),) * 4, head=650, tokens=17)
    need = cost.memory(2, 8)
    profiles = {
        n: plan.Profile(m * need, s * 1e9, 1e7)
        for n, (m, s) in enumerate(((1, 1), (2, 1.1), (4, 1.3), (4, 1.0)))
    }
    solution = plan.solve(profiles, cost, (2, 4, 8), (8, 16))
    assert {n: s[:2] for n, s in solution.items()} == {
        0: (2, 8),  # only the smallest fits its memory: it sets the deadline
        1: (4, 16),
        2: (8, 16),
        3: (2, 16),  # as slow as node 0: more memory buys batch, not rank
    }
    deadline = solution[0][2]
    assert all(t <= deadline for _, _, t in solution.values())


def test_selection_keeps_the_top_share_with_hysteresis():
    scores = {"a": 0.1, "b": 0.4, "c": 0.3, "d": 0.2}
    assert plan.select(scores, None, 2, 0.1) == ["b", "c"]
    # d beats the weakest kept (c) by less than 10%: kept as it was
    assert plan.select({**scores, "d": 0.32}, ["b", "c"], 2, 0.1) == ["b", "c"]
    assert plan.select({**scores, "d": 0.34}, ["b", "c"], 2, 0.1) == ["b", "d"]


def test_the_server_prunes_dropped_adapters_and_averages_the_scores():
    strategy = FedPipe(select_share=0.5, warmup_rounds=1, reselect_every=5)
    start = {
        A: np.ones((2, 2), np.float32),
        B: np.ones((2, 2), np.float32),
        A2: np.ones((2, 2), np.float32),
        B2: np.ones((2, 2), np.float32),
    }
    replies = [_reply(n, dict(start)) for n in range(2)]
    for reply, scores in zip(replies, ([0.2, 0.8], [0.4, 0.6]), strict=True):
        reply.num_examples = 1.0
        reply.records = {"fedpipe.importance": {"scores": np.array(scores, np.float32)}}
    ctx = RoundContext(1, None, "train", (0, 1), (0, 1), start, {})
    arrays = strategy.aggregate(replies, ctx)
    assert strategy.state["importance"] == pytest.approx({"l": 0.3, "m": 0.7})
    assert strategy.state["selected"] == ["m"]
    np.testing.assert_array_equal(arrays[B], 0.0)  # pruned: B A = 0
    np.testing.assert_array_equal(arrays[A], 1.0)  # A kept for a comeback
    np.testing.assert_array_equal(arrays[B2], 1.0)
    assert strategy.selected(start) == ["m"]


def test_bad_lists_are_refused():
    assert FedPipe(ranks="2,4,8").run_settings() == {
        "peft": "lora",
        "lora-rank": 8,
        "lora-alpha": 2.0,
    }
    with pytest.raises(ValueError, match="ranks='2,x'"):
        FedPipe(ranks="2,x").validate()
    with pytest.raises(ValueError, match="speed-tiers"):
        FedPipe(speed_tiers="0").validate()


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
    hook, importance = make_hooks(
        {
            "fedpipe.rank": 2,
            "fedpipe.quant-bits": 4,
            "fedpipe.importance-beta1": 0.5,
            "fedpipe.importance-beta2": 0.5,
        }
    )
    run = SimpleNamespace(model=model, reply_records={})
    hook.setup(run)
    importance.setup(run)
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
    importance.before_step(run)
    # One step, beta 1/2: I_bar = I / 2, U_bar = |I - I/2| / 2, score I^2 / 8,
    # averaged over each adapter's slices within rank 2, then shares.
    expected = []
    for prefix in ("1", "3"):
        lora = model.get_submodule(prefix)
        fa, fb = lora.lora_A["default"].weight, lora.lora_B["default"].weight
        ia = (fa * fa.grad).abs()[:2]
        ib = (fb * fb.grad).abs()[:, :2]
        total = (ia**2 / 8).sum() + (ib**2 / 8).sum()
        expected.append(float(total.detach()) / (ia.numel() + ib.numel()))
    optimizer.step()
    assert a[2:].abs().sum() == 0 and b[:, 2:].abs().sum() == 0
    hook.finish(run)
    importance.finish(run)
    scores = run.reply_records["fedpipe.importance"]["scores"].numpy()
    np.testing.assert_allclose(scores, np.array(expected) / sum(expected), rtol=1e-5)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(p, frozen[name], rtol=0, atol=0)
