"""HideNseek: SynFlow masks, the sign vote on hand-made replies, the client's bits."""

import json
import math

import numpy as np
import torch

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.hidenseek import make_hooks
from bouquet.clientapps.state import load_arrays
from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies.aggregation import to_record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.hidenseek import (
    SIGNS,
    KeptSigns,
    SignVote,
    masked_keys,
    synflow_mask,
)
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire


def test_synflow_scores_a_chain_by_its_paths():
    # One-step SynFlow of a 2-1-1 chain: scores |w| * flow out * flow in.
    w1 = np.array([[1.0, 4.0]])  # 1 x 2
    w2 = np.array([[3.0]])  # 1 x 1
    (m1, m2) = synflow_mask([w1, w2], density=2 / 3, iterations=1)
    # scores: w1 -> [1*3*1, 4*3*1] = [3, 12]; w2 -> 3 * 1 * (1 + 4) = 15.
    np.testing.assert_array_equal(m1, [[False, True]])
    np.testing.assert_array_equal(m2, [[True]])


def test_synflow_keeps_the_density_and_never_cuts_every_path():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((16, 8)), rng.standard_normal((4, 16))]
    masks = synflow_mask(weights, density=0.3)
    kept = sum(int(m.sum()) for m in masks)
    assert abs(kept - 0.3 * (128 + 64)) <= 2
    assert (
        masks[0].any(axis=1)[masks[1].any(axis=0)].all()
    )  # no dead hidden unit in use


def test_the_vote_is_weighted_and_a_tie_keeps_the_sign():
    x = {
        "w": np.array([[0.5, 0.0, -2.0, 1.0]], np.float32),
        "b": np.zeros(1, np.float32),
    }
    ctx = RoundContext(1, None, "train", (1, 2, 3), (1, 2, 3), x, {})
    votes = {1: [1.0, -1.0, 1.0], 2: [-1.0, -1.0, -1.0], 3: [1.0, 1.0, 1.0]}
    replies = [
        ClientReply(n, n, 1.0, {}, {SIGNS: np.array(v)}) for n, v in votes.items()
    ]
    weights = np.array([0.25, 0.5, 0.25])
    delta, _ = SignVote().update(replies, weights, None, ctx)
    # kept: 0.5, -2, 1; sums: 0, -0.5, 0 -> keep +, flip to -, keep +.
    np.testing.assert_allclose(x["w"] + delta["w"], [[0.5, 0.0, -2.0, 1.0]])
    replies[0] = ClientReply(1, 1, 1.0, {}, {SIGNS: np.array([-1.0, 1.0, -1.0])})
    delta, _ = SignVote().update(replies, weights, None, ctx)
    np.testing.assert_allclose(
        x["w"] + delta["w"], [[-0.5, 0.0, -2.0, -1.0]]
    )  # a tie at -2
    assert "b" not in delta
    assert KeptSigns(3).spec(10**6) == {SIGNS: ((1,), "uint8")}


def test_client_flips_signs_by_the_straight_through_estimator():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, 0.0, -0.2], [0.1, 0.3, 0.0]]))
    bias = model.bias.detach().clone()
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    w0 = model.weight.detach().clone()
    # Reference: one STE step from s = 0.01 sign(w0).
    loss = torch.nn.functional.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, [model.weight])
    s = 0.01 * torch.where(w0 < 0, -1.0, 1.0) - 0.5 * w0.abs() * grad
    state: dict = {}
    config = {"hidenseek.score-init": 0.01}
    settings = TrainSettings(batch_size=8, lr=0.5, momentum=0.0, max_steps=1)
    result = train_local(
        model,
        (x, y),
        settings,
        make_hooks(config),
        generator=torch.Generator().manual_seed(0),
        config=config,
        state=state,
    )
    expected = w0.abs() * torch.where(s < 0, -1.0, 1.0)
    torch.testing.assert_close(model.weight.detach(), expected)
    torch.testing.assert_close(model.bias.detach(), bias)  # frozen
    kept = s.reshape(-1)[w0.reshape(-1) != 0]
    signs = result.run.reply_records[wire.ARRAYS]["signs"].numpy()
    np.testing.assert_array_equal(np.unpackbits(signs, count=4), (kept >= 0).numpy())
    np.testing.assert_allclose(
        load_arrays(state, "hidenseek", "scores")["scores"],
        s.abs().reshape(-1),
        atol=1e-6,
    )


def test_the_binary_vote_keeps_or_drops_initial_weights():
    # {0,1} baseline: theta_0 P = [0.5, 0, -2, 1]; the model sent dropped -2.
    init = {"w": np.array([[0.5, 0.0, -2.0, 1.0]], np.float32), "b": np.ones(1)}
    x = {"w": np.array([[0.5, 0.0, 0.0, 1.0]], np.float32), "b": np.ones(1)}
    ctx = RoundContext(2, None, "train", (1, 2, 3), (1, 2, 3), x, {})
    votes = {1: [-1.0, 1.0, 1.0], 2: [-1.0, 1.0, -1.0], 3: [1.0, -1.0, 1.0]}
    replies = [
        ClientReply(n, n, 1.0, {}, {SIGNS: np.array(v)}) for n, v in votes.items()
    ]
    weights = np.array([0.25, 0.5, 0.25])
    delta, state = SignVote(binary=True).update(replies, weights, {"init": init}, ctx)
    # sums: -0.5 (drop 0.5), +0.5 (bring back -2), 0 (tie: keep 1 as it is).
    np.testing.assert_allclose(x["w"] + delta["w"], [[0.0, 0.0, -2.0, 1.0]])
    assert state == {"init": init}
    # Round 1 (empty state): the model received is theta_0 P, remembered.
    first = RoundContext(1, None, "train", (1, 2, 3), (1, 2, 3), init, {})
    _, state = SignVote(binary=True).update(replies, weights, {}, first)
    np.testing.assert_array_equal(state["init"]["w"], init["w"])


def test_binary_client_masks_the_initial_weights_by_the_estimator():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    init = torch.tensor([[0.5, 0.0, -0.2], [0.1, 0.3, -0.4]])
    received = init * torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])  # 0.1 off
    with torch.no_grad():
        model.weight.copy_(received)
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, [model.weight])
    # Reference: s = 0.01 (+1 where received keeps, -1 where dropped), one step.
    s = 0.01 * torch.where(received == 0, -1.0, 1.0) - 0.5 * init * grad
    config = {"hidenseek.score-init": 0.01, "hidenseek.mask": "binary"}
    record = to_record(
        {"weight": init.numpy(), "bias": model.bias.detach().numpy().copy()}
    )
    result = train_local(
        model,
        (x, y),
        TrainSettings(batch_size=8, lr=0.5, momentum=0.0, max_steps=1),
        make_hooks(config),
        generator=torch.Generator().manual_seed(0),
        config=config,
        state={},
        incoming={"hidenseek.init": record},
    )
    torch.testing.assert_close(model.weight.detach(), init * (s >= 0))
    kept = s.reshape(-1)[init.reshape(-1) != 0]  # 5 kept weights
    signs = result.run.reply_records[wire.ARRAYS]["signs"].numpy()
    np.testing.assert_array_equal(np.unpackbits(signs, count=5), (kept >= 0).numpy())


def test_binary_masks_run_end_to_end_within_the_pruned_weights(tmp_path):
    config = {
        "algorithm": "hidenseek",
        "hidenseek.mask": "binary",
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "local-steps": 2,
        "model": "mlp",
        "seed": 3,
        "plot": False,
        "output-dir": str(tmp_path),
    }
    result, path, _ = run_inprocess(config, num_nodes=4)
    rows = json.loads((path / "metrics.json").read_text())["rounds"][1:]
    assert all(r["train-replies"] == 4 and r["train-dropped"] == 0 for r in rows)
    final = {k: v.numpy() for k, v in result.arrays.items()}
    weights = [final[k] for k in masked_keys(final)]
    total = sum(w.size for w in weights)
    on = sum(int(np.count_nonzero(w)) for w in weights)
    assert 0 < on <= math.ceil(0.3 * total)  # within the pruned theta_0 P
