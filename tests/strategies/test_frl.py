"""FRL: the vote on hand-made rankings, the client's edge-popup step, and both
halves agreeing on the frozen weights and the mask."""

import json
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.frl import RANKS, SCORES, make_hooks
from bouquet.clientapps.state import array_record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.frl import FRL, RankVote, vote
from bouquet.strategies.validation import ClientReply
from bouquet.tasks.supermask import frozen_weight, positions, top_k_mask

SEED = 11


def test_positions_and_vote_by_hand():
    np.testing.assert_array_equal(
        positions(np.array([0.3, -1.0, 2.0, 0.3])), [1, 0, 3, 2]
    )
    values = np.array([40.0, 10.0, 30.0, 20.0])  # sorted: 10, 20, 30, 40
    ranks = [np.array([3, 2, 1, 0]), np.array([2, 3, 0, 1]), np.array([3, 1, 2, 0])]
    # Reputations 8, 6, 3, 1: edge 3 is least important, edge 0 most.
    np.testing.assert_array_equal(vote(ranks, values), [40.0, 30.0, 20.0, 10.0])
    # A forged reply counts as the permutation it orders to: [3, 0, 1, 2].
    forged = [np.array([1e9, 0.0, 0.0, 0.0]), np.array([0, 1, 2, 3])]
    # Reputations 3, 1, 3, 5: order 1, 0, 2, 3.
    np.testing.assert_array_equal(vote(forged, values), [20.0, 10.0, 30.0, 40.0])


def _ctx(arrays):
    nodes = (1, 2, 3)
    return RoundContext(1, None, "train", nodes, nodes, arrays, {}, seed=SEED)


def _reply(n, arrays, ranks):
    return ClientReply(
        node=n,
        partition=n,
        num_examples=1,
        metrics={},
        arrays=arrays,
        records={RANKS: ranks},
    )


def test_rank_vote_masks_the_frozen_weights_and_takes_the_median_elsewhere():
    x = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    ranks = [
        {"w": np.array([[0, 1], [2, 3]], np.float32), "b": np.zeros(2, np.float32)},
        {"w": np.array([[1, 0], [2, 3]], np.float32), "b": np.zeros(2, np.float32)},
        {"w": np.array([[0, 1], [3, 2]], np.float32), "b": np.zeros(2, np.float32)},
    ]
    biases = [np.array([1.0, 5.0]), np.array([2.0, -1.0]), np.array([9.0, 0.0])]
    replies = [
        _reply(i, {"w": x["w"], "b": biases[i].astype(np.float32)}, ranks[i])
        for i in range(3)
    ]
    delta, state = RankVote(k=0.5).update(replies, None, {"scores": {}}, _ctx(x))
    # Reputations 1, 2, 7, 8: edges (1, 0) and (1, 1) are kept.
    frozen = frozen_weight("w", (2, 2), SEED)
    np.testing.assert_allclose(delta["w"], frozen * [[0, 0], [1, 1]])
    np.testing.assert_allclose(delta["b"], [2.0, 0.0])
    assert positions(state["scores"]["w"]).ravel().tolist() == [0, 1, 2, 3]


def _client(scores, lr=0.5):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.tensor([[1.0, 0.5, -1.0], [0.2, -0.3, 0.8], [0.0, 1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    record = array_record(
        {"weight": scores.astype(np.float32), "bias": np.zeros(2, np.float32)}
    )
    config = {"frl.k": 0.5, "seed": SEED}
    result = train_local(
        model,
        (x, y),
        TrainSettings(batch_size=3, lr=lr, epochs=2),
        make_hooks(config),
        generator=torch.Generator().manual_seed(0),
        config=config,
        incoming={SCORES: record},
    )
    return model, result.run, (x, y)


def test_edge_popup_matches_a_step_by_step_reference():
    scores = np.array([[0.3, -0.2, 0.1], [0.05, -0.4, 0.25]])
    model, run, (x, y) = _client(scores)
    torch.manual_seed(0)  # the client's init: its bias is never trained
    bias = torch.nn.Linear(3, 2).bias.detach()
    frozen = torch.tensor(frozen_weight("weight", (2, 3), SEED), dtype=torch.float32)
    s = torch.tensor(scores, dtype=torch.float32)
    for _ in range(2):  # two epochs of one full batch
        mask = torch.tensor(top_k_mask(s.numpy(), 0.5), dtype=torch.float32)
        w = (frozen * mask).requires_grad_(True)
        loss = functional.cross_entropy(x @ w.T + bias, y)
        (grad,) = torch.autograd.grad(loss, w)
        s = s - 0.5 * grad * frozen
    mask = torch.tensor(top_k_mask(s.numpy(), 0.5), dtype=torch.float32)
    torch.testing.assert_close(model.weight.detach(), frozen * mask)
    torch.testing.assert_close(model.bias.detach(), bias)
    sent = run.reply_records[RANKS]
    np.testing.assert_array_equal(sent["weight"].numpy(), positions(s.numpy()))
    np.testing.assert_array_equal(sent["bias"].numpy(), [0.0, 0.0])


def test_server_and_client_agree_on_the_masked_model():
    # One client: the vote returns its own ranking, so the global model is
    # exactly the masked model the client replied with.
    scores = np.random.default_rng(3).standard_normal((2, 3))
    model, run, _ = _client(scores)
    x = {"weight": np.zeros((2, 3), np.float32), "bias": np.zeros(2, np.float32)}
    ranks = {k: v.numpy() for k, v in run.reply_records[RANKS].items()}
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    delta, _ = RankVote(0.5).update([_reply(1, arrays, ranks)], None, {}, _ctx(x))
    np.testing.assert_allclose(delta["weight"], arrays["weight"], rtol=1e-6)


def test_registered_declaration():
    strategy = FRL()
    assert strategy.k == 0.5 and strategy.reply_records == (RANKS,)


def test_vote_and_mask_match_the_official_code():
    # Numbers from FRL's official Find_rank, FRL_Vote and GetSubnet run on
    # CPU (repo and commit in "source"; /work/scratch/robust-golden/frl).
    case = json.loads(
        (Path(__file__).parent / "data" / "frl_official.json").read_text()
    )
    users = [np.asarray(u, np.float32) for u in case["user_scores"]]
    rankings = [positions(u) for u in users]
    for ours, official in zip(rankings, case["official_ranks"], strict=True):
        # Official ranks list edges in ascending order; ours: each edge's place.
        np.testing.assert_array_equal(np.argsort(ours.ravel()), official)
    values = np.asarray(case["global_scores"], np.float32)
    voted = vote(rankings, values)
    np.testing.assert_allclose(voted, case["voted_scores"], rtol=1e-6)
    np.testing.assert_array_equal(top_k_mask(voted, 0.5), case["mask_of_scores"])
    # Documented difference: the official MaskConv ranks |score|, we rank score.
    assert not np.array_equal(top_k_mask(voted, 0.5), case["mask_of_abs_scores"])
