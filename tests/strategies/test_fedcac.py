"""FedCAC: overlaps, threshold, collaborators and mixing on hand-made replies."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bouquet.clientapps.recipes.fedcac import MASK, CriticalMask, critical_mask
from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedcac import STATE, FedCAC, collaborators, overlaps
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire

MASKS = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=np.float32)
MODELS = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [0.0, 0.0, 0.0, 2.0]])
SIZES = (1, 1, 2)


def _ctx(server_round=1, nodes=(10, 11, 12)):
    return RoundContext(
        server_round=server_round,
        num_rounds=None,
        phase="train",
        nodes=nodes,
        sampled=nodes,
        arrays={"w": np.zeros(4, np.float32)},
        config={},
    )


def _replies():
    return [
        ClientReply(
            node=10 + i,
            partition=i,
            num_examples=SIZES[i],
            metrics={},
            arrays={"w": MODELS[i].astype(np.float32)},
            records={MASK: {"w": MASKS[i]}},
        )
        for i in range(3)
    ]


def test_overlap_is_the_shared_share_of_critical_positions():
    o = overlaps(MASKS)
    # ||m_0 - m_1||_1 = 2, ||m_0||_1 = 2: 1 - 2 / 4
    np.testing.assert_allclose(o[0], [1.0, 0.5, 1.0])
    np.testing.assert_allclose(o[1], [0.5, 1.0, 0.5])
    assert overlaps(np.zeros((2, 3)))[0, 1] == 0.0  # no critical parameter


@pytest.mark.parametrize(
    ("server_round", "groups"),
    [
        (1, [[0, 2], [1], [2, 0]]),  # thr = 2/3 + 2/20 * 1/3 = 0.7
        (19, [[0, 2], [1], [2, 0]]),  # thr = max = 1: ties still collaborate
        (20, [[0], [1], [2]]),  # thr > max: cautious, nobody
    ],
)
def test_the_threshold_climbs_from_the_mean_to_past_the_max(server_round, groups):
    threshold, found = collaborators(overlaps(MASKS), server_round, beta=20.0)
    mean = 4 / 6
    assert threshold == pytest.approx(mean + (server_round + 1) / 20 * (1 - mean))
    assert found == groups


def test_each_node_mixes_its_critical_part_from_collaborators_the_rest_global():
    # Prepare
    strategy = FedCAC(beta=20.0)
    ctx = _ctx()
    # Execute
    global_arrays = strategy.aggregate(_replies(), ctx)
    # Assert: w_g weighted by examples (1, 1, 2)
    w_g = (MODELS[0] + MODELS[1] + 2 * MODELS[2]) / 4
    np.testing.assert_allclose(global_arrays["w"], w_g, rtol=1e-6)
    models = strategy.state[STATE]["models"]
    u0 = (MODELS[0] + MODELS[2]) / 2  # C_0 = {0, 2}, unweighted
    expected = {
        "10": np.where(MASKS[0] > 0, u0, w_g),
        "11": np.where(MASKS[1] > 0, MODELS[1], w_g),  # C_1 = {1}
        "12": np.where(MASKS[2] > 0, u0, w_g),
    }
    for node, value in expected.items():
        np.testing.assert_allclose(models[node]["w"], value, rtol=1e-6)
        assert models[node]["w"].dtype == np.float32
    metrics = strategy.train_metrics(_replies(), ctx)
    assert metrics["fedcac-collaborators"] == pytest.approx(2 / 3)
    assert metrics["fedcac-threshold"] == pytest.approx(0.7)

    # Next round: each node is sent its own model, a new node the global one
    plan = strategy.recipients(_ctx(2, nodes=(10, 11, 12, 13)))
    np.testing.assert_allclose(plan[11][wire.ARRAYS]["w"].numpy(), expected["11"])
    assert plan[13] == {}


def test_critical_mask_takes_the_top_tau_and_falls_back_above_zero():
    score = torch.tensor([0.1, 0.4, 0.3, 0.0])
    assert critical_mask(score, 0.5).tolist() == [False, True, True, False]
    assert critical_mask(score, 0.0).tolist() == [False] * 4
    # top 3 ends at 0: the smallest non-zero score is the threshold instead
    sparse = torch.tensor([0.0, 0.0, 0.3, 0.2])
    assert critical_mask(sparse, 0.75).tolist() == [False, False, True, True]


def test_the_client_scores_parameters_by_change_times_value():
    # Prepare: a one-layer model before and after "training"
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -3.0]]))
        model.bias.fill_(2.0)
    before = [torch.tensor([[0.0, -2.0]]), torch.tensor([2.0])]
    run = SimpleNamespace(
        model=model,
        parameters=list(model.parameters()),
        global_parameters=before,
        personal=(),
        frozen=(),
        reply_records={},
    )
    # Execute
    CriticalMask(tau=0.5).finish(run)
    # Assert: |(after - before) * after| = [1, 3] -> the top one is index 1;
    # the bias has one entry: int(0.5 * 1) = 0 critical (the official rule)
    mask = run.reply_records[MASK]
    assert mask["weight"].numpy().tolist() == [[0.0, 1.0]]
    assert mask["bias"].numpy().tolist() == [0.0]


def test_matches_pfllib_on_four_clients():
    # Numbers from PFLlib's FedCAC run on CPU (repo and commit in "source"):
    # its critical masks, sample-weighted global model and next models.
    case = json.loads(
        (Path(__file__).parent / "data" / "fedcac_official.json").read_text()
    )
    keys = ("weight", "bias")

    def arrays(entry):
        return {k: np.asarray(entry[k], np.float32) for k in keys}

    masks = []
    for before, after in zip(case["before"], case["after"], strict=True):
        b, a = arrays(before), arrays(after)
        masks.append(
            {
                k: critical_mask(
                    torch.as_tensor(np.abs((a[k] - b[k]) * a[k])), case["tau"]
                )
                .numpy()
                .astype(np.float32)
                for k in keys
            }
        )
    for got, want in zip(masks, case["masks"], strict=True):
        for k in keys:
            np.testing.assert_array_equal(got[k], np.asarray(want[k], np.float32))
    nodes = tuple(range(len(masks)))
    ctx = RoundContext(
        server_round=case["epoch"],
        num_rounds=None,
        phase="train",
        nodes=nodes,
        sampled=nodes,
        arrays={k: np.zeros_like(v) for k, v in arrays(case["after"][0]).items()},
        config={},
    )
    replies = [
        ClientReply(
            node=i,
            partition=i,
            num_examples=case["num_examples"][i],
            metrics={},
            arrays=arrays(case["after"][i]),
            records={MASK: masks[i]},
        )
        for i in nodes
    ]
    strategy = FedCAC(tau=case["tau"], beta=float(case["beta"]))
    global_arrays = strategy.aggregate(replies, ctx)
    for k in keys:
        np.testing.assert_allclose(global_arrays[k], case["global"][k], rtol=1e-5)
    for i in nodes:
        mine = strategy.state[STATE]["models"][str(i)]
        for k in keys:
            np.testing.assert_allclose(
                mine[k], case["next_models"][i][k], rtol=1e-5, atol=1e-6
            )
