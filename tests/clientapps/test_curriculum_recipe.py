"""Curriculum's client: per-example scores, ranking, paced order, state, reductions."""

import math

import numpy as np
import pytest
import torch

from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.curriculum import (
    OrderedData,
    example_losses,
    make_hooks,
    paced_order,
    ranking,
)
from bouquet.simulations.inprocess import run_inprocess


def _data(n=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _identity_model():
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    return model


def test_example_losses_golden_and_mode_restored():
    # logits (2, 0) and (0, 1), both labelled 0.
    model = _identity_model().train()
    losses = example_losses(
        model, torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    )
    expected = [math.log(1 + math.exp(-2)), math.log(1 + math.e)]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-6)
    assert model.training


def test_ranking_of_hand_made_scores():
    scores = torch.tensor([0.3, 0.1, 0.9, 0.1, 0.5])
    assert ranking(scores, "curriculum").tolist() == [1, 3, 0, 4, 2]
    assert ranking(scores, "random").tolist() == [1, 3, 0, 4, 2]
    assert ranking(scores, "anti").tolist() == [2, 4, 0, 1, 3]


def test_paced_order_draws_from_the_front_only():
    rank = torch.tensor([1, 3, 0, 4, 2])
    order = paced_order(rank, 0.4, torch.Generator().manual_seed(5))  # ceil(2) = 2
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(5))
    first = [int(i) for i in perm if int(i) in (1, 3)]
    assert len(order) == 5 and set(order.tolist()) == {1, 3}
    assert order[:2].tolist() == first
    # Full pacing: exactly the loop's own permutation.
    full = paced_order(rank, 1.0, torch.Generator().manual_seed(5))
    assert full.tolist() == perm.tolist()
    # ceil(.6000000000000001 * 5) is 3, not 4.
    assert set(paced_order(rank, 0.2 + 0.8 * 0.5, torch.Generator()).tolist()) == {
        1,
        3,
        0,
    }
    # A zero fraction still trains on one example (the easiest).
    assert set(paced_order(rank, 0.0, torch.Generator()).tolist()) == {1}


class _Seen(Hook):
    def __init__(self):
        self.rows = []

    def transform_batch(self, run, x, y):
        self.rows.extend(x[:, 0].tolist())
        return x, y


@pytest.mark.parametrize(
    ("ordering", "expected"), [("curriculum", [2.0, 1.5]), ("anti", [-2.0, -1.5])]
)
def test_hook_trains_on_the_easiest_or_hardest_examples(ordering, expected):
    # Labels 0; a linear model with logits (x0, 0): large x0 is easy.
    x = torch.tensor([[v, 0.0] for v in (-2.0, -1.5, 0.0, 1.5, 2.0)])
    y = torch.zeros(5, dtype=torch.long)
    model = _identity_model()
    seen, state = _Seen(), {}
    hooks = [
        *make_hooks({"curriculum.ordering": ordering, "curriculum.fraction": 0.4}),
        seen,
    ]
    result = train_local(
        model,
        (x, y),
        TrainSettings(batch_size=2, lr=0.0),
        hooks,
        generator=torch.Generator().manual_seed(0),
        state=state,
    )
    assert sorted(set(seen.rows)) == sorted(expected) and len(seen.rows) == 5
    losses = [math.log(1 + math.exp(-v)) for v in (-2.0, -1.5, 0.0, 1.5, 2.0)]
    assert result.run.metrics["curriculum.mean-score"] == pytest.approx(np.mean(losses))
    assert result.run.data[0] is x and result.run.data[1] is y  # LocalRun.data


@pytest.mark.parametrize("ordering", ["random", "curriculum", "anti"])
def test_full_pacing_equals_plain_training_exactly(ordering):
    x, y = _data()
    models = []
    for hooks in (
        [],
        make_hooks({"curriculum.ordering": ordering, "curriculum.fraction": 1.0}),
    ):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(5, 8),
            torch.nn.BatchNorm1d(8),
            torch.nn.ReLU(),
            torch.nn.Linear(8, 3),
        )
        settings = TrainSettings(epochs=2, batch_size=8, lr=0.1, momentum=0.9)
        train_local(
            model, (x, y), settings, hooks, generator=torch.Generator().manual_seed(2)
        )
        models.append(model.state_dict())
    for key, value in models[0].items():
        torch.testing.assert_close(value, models[1][key], rtol=0, atol=0)


def test_scores_cached_for_rescore_every_rounds_and_random_keys_kept():
    x, y = _data(12)
    state = {}

    def round_(rnd, model):
        hook = OrderedData("random", 0.5, rescore_every=2)
        train_local(
            model,
            (x, y),
            TrainSettings(lr=0.0),
            [hook],
            generator=torch.Generator().manual_seed(rnd),
            config={"server-round": rnd},
            state=state,
        )
        return hook.rank.tolist(), state["curriculum.scores"]["loss"].numpy().copy()

    torch.manual_seed(0)
    rank1, scores1 = round_(1, torch.nn.Linear(5, 3))
    rank2, scores2 = round_(2, torch.nn.Linear(5, 3))  # other model, cache still valid
    np.testing.assert_array_equal(scores1, scores2)
    assert rank1 == rank2  # the random ranking is drawn once
    _, scores3 = round_(3, torch.nn.Linear(5, 3))  # 3 - 1 >= 2: re-scored
    assert not np.array_equal(scores1, scores3)


def test_inprocess_random_full_pacing_equals_fedavg_and_state_persists(tmp_path):
    config = {
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "output-dir": str(tmp_path),
        "seed": 3,
    }
    fedavg, _, _ = run_inprocess({**config, "algorithm": "fedavg"}, num_nodes=3)
    ordered, _, grid = run_inprocess(
        {
            **config,
            "algorithm": "curriculum",
            "curriculum.ordering": "random",
            "curriculum.b": 1.0,
        },
        num_nodes=3,
    )
    for key, value in fedavg.arrays.items():
        np.testing.assert_array_equal(value.numpy(), ordered.arrays[key].numpy())
    for context in grid.contexts.values():
        assert int(context.state["curriculum.scored"]["round"]) == 2
        assert len(context.state["curriculum.random"]["keys"].numpy()) > 0
