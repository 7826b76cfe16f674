"""Curriculum's server side: pacing values, easy-first selection, score state."""

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord

from bouquet.simulations.inprocess import ensure_task_identity
from bouquet.strategies.aggregation import to_record
from bouquet.strategies.curriculum import (
    FRACTION,
    MEAN_SCORE,
    Curriculum,
    eligible_nodes,
    pacing,
)
from bouquet.tasks import wire
from tests.conftest import answer

ORDERING = wire.algorithm_key("curriculum", "ordering")
RESCORE_EVERY = wire.algorithm_key("curriculum", "rescore-every")


class FakeGrid:
    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)

    def push_messages(self, messages):
        return []  # nothing accepted: a round without replies


ARRAYS = {"w": np.zeros(2, np.float32)}

# T = 10 rounds, a = 0.8, b = 0.2: u = t / 8.
GOLDEN = [
    ("linear", 0, 0.2),
    ("linear", 4, 0.6),  # .2 + .8 * .5
    ("linear", 8, 1.0),
    ("linear", 10, 1.0),  # clipped
    ("quad", 4, 0.4),  # .2 + .8 * .25
    ("root", 2, 0.6),  # .2 + .8 * sqrt(.25)
    ("step", 4, 0.2),  # .2 + floor(.5)
    ("step", 8, 1.0),  # .2 + 1, clipped
    ("exp", 4, 0.2 + 0.8 * 147.4131591025766 / 22025.465794806718),
    ("exp", 12, 1.0),
    ("log", 0, 0.2),  # 1 + .1 ln(e^-10) = 0
    ("log", 4, 0.2 + 0.8 * (1 + 0.1 * -0.693056384822478)),  # ln(.5 + e^-10)
    ("log", 8, 1.0),  # slightly above 1 before clipping
]


@pytest.mark.parametrize(("family", "t", "expected"), GOLDEN)
def test_pacing_golden_values(family, t, expected):
    assert pacing(family, t, 10, 0.8, 0.2) == pytest.approx(expected, abs=1e-12)


def test_pacing_is_monotone_and_bad_family_fails():
    for family in ("linear", "quad", "root", "step", "exp", "log"):
        values = [pacing(family, t, 20, 0.5, 0.1) for t in range(21)]
        assert values == sorted(values) and values[-1] == 1.0
    with pytest.raises(ValueError, match="pacing family"):
        pacing("cubic", 1, 10, 0.8, 0.2)


def test_eligible_nodes_unscored_first_then_easiest():
    scores = {"1": 0.5, "2": 0.1, "4": 0.9, "5": 0.1}
    assert eligible_nodes([5, 4, 3, 2, 1], scores, 3) == [3, 2, 5]
    assert eligible_nodes([1, 2, 3, 4, 5], scores, 5) == [3, 2, 5, 1, 4]


def _strategy(**kwargs):
    ensure_task_identity()
    kwargs.setdefault("fraction_evaluate", 0.0)
    return Curriculum(
        fraction_train=0.2, min_train_nodes=1, min_available_nodes=1, seed=3, **kwargs
    )


def _config(num_rounds):
    """A train config as Bouquet's driver passes it (the run's length in it)."""
    return ConfigRecord({wire.NUM_ROUNDS: num_rounds})


def _targets(strategy, server_round, grid, num_rounds=10):
    msgs = strategy.configure_train(
        server_round, to_record(ARRAYS), _config(num_rounds), grid
    )
    return sorted(m.metadata.dst_node_id for m in msgs), msgs


def test_client_pacing_samples_only_the_easy_pool():
    grid = FakeGrid(range(1, 11))
    strategy = _strategy(client_pacing="linear", client_a=0.8, client_b=0.2)
    # T = 10 rounds. Nodes 10, 9, ..., 1 from easiest to hardest.
    strategy.state["client-scores"] = {str(n): 1.0 / n for n in range(1, 11)}
    # Round 1: g_c = .2 -> pool of ceil(.2 * 10) = 2 = the sample size.
    assert _targets(strategy, 1, grid)[0] == [9, 10]
    # Round 5: g_c = .6 -> the 6 easiest; the draw is seeded by (seed, round).
    seen = set()
    for seed in range(40):  # the pool is exactly the 6 easiest, never node 4
        strategy.seed = seed
        seen.update(_targets(strategy, 5, grid)[0])
    assert seen == {5, 6, 7, 8, 9, 10}
    chosen, msgs = _targets(strategy, 5, grid)
    assert len(chosen) == 2 and _targets(strategy, 5, grid)[0] == chosen
    config = msgs[0].content["config"]
    assert config["server-round"] == 5 and config[FRACTION] == pytest.approx(0.6)


def test_without_client_pacing_sampling_is_the_base_sampling():
    grid = FakeGrid(range(1, 11))
    paced = _strategy(client_pacing="none")
    paced.state["client-scores"] = {str(n): float(n) for n in range(1, 11)}
    plain = _strategy()
    for rnd in (1, 2, 3):
        assert _targets(paced, rnd, grid)[0] == _targets(plain, rnd, grid)[0]


def test_round_config_uses_total_rounds():
    strategy = _strategy(ordering="anti", pacing="quad", a=0.5, b=0.0)
    # T = 8: u = (r - 1) / 4
    _, msgs = _targets(strategy, 3, FakeGrid([1]), num_rounds=8)
    ctx = strategy.train_round
    assert strategy.total_rounds(ctx) == 8
    assert strategy.round_config(ctx)[FRACTION] == pytest.approx(0.25)
    config = msgs[0].content["config"]
    assert config[ORDERING] == "anti" and config[RESCORE_EVERY] == 1
    assert config[FRACTION] == pytest.approx(0.25)


def test_pacing_needs_the_run_length():
    strategy = _strategy()
    with pytest.raises(ValueError, match=wire.NUM_ROUNDS):
        strategy.configure_train(1, to_record(ARRAYS), ConfigRecord(), FakeGrid([1]))


def test_scores_from_train_and_evaluate_replies_and_state_roundtrip(reply):
    strategy = _strategy(fraction_evaluate=1.0, min_evaluate_nodes=1)
    strategy.configure_train(1, to_record(ARRAYS), _config(2), FakeGrid([1, 2]))
    train = [
        reply(
            ARRAYS,
            {"num-examples": 4, MEAN_SCORE: 2.5},
            node_id=1,
            routine="curriculum",
        ),
        reply(
            ARRAYS,
            {"num-examples": 4, MEAN_SCORE: float("nan")},
            node_id=2,
            routine="curriculum",
        ),
    ]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, train))
    assert arrays is not None
    assert strategy.state["client-scores"] == {"1": 2.5}
    assert strategy.state["score-rounds"] == {"1": 1}
    strategy.configure_evaluate(2, to_record(ARRAYS), ConfigRecord(), FakeGrid([1, 2]))
    evaluate = [
        reply(None, {"num-examples": 3, "eval-loss": 0.7}, node_id=2),
        reply(None, {"num-examples": 0, "eval-loss": 0.1}, node_id=1),  # invalid
    ]
    strategy.aggregate_evaluate(2, answer(strategy, evaluate, "evaluate"))
    assert strategy.state["client-scores"] == {"1": 2.5, "2": 0.7}
    assert strategy.state["score-rounds"] == {"1": 1, "2": 2}

    fresh = _strategy()
    fresh.load_state(strategy.export_state())
    assert fresh.state["client-scores"] == strategy.state["client-scores"]
    assert fresh.state["score-rounds"] == strategy.state["score-rounds"]


def test_aggregation_is_fedavg(reply):
    strategy = _strategy()
    strategy.configure_train(1, to_record(ARRAYS), _config(2), FakeGrid([1, 2]))
    replies = [
        reply(
            {"w": np.array([1.0, 2.0], np.float32)},
            {"num-examples": 1},
            1,
            routine="curriculum",
        ),
        reply(
            {"w": np.array([4.0, -1.0], np.float32)},
            {"num-examples": 2},
            2,
            routine="curriculum",
        ),
    ]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0, 0.0])


def test_bad_options_fail():
    for kwargs in (
        {"ordering": "sideways"},
        {"pacing": "cubic"},
        {"client_pacing": "sometimes"},
        {"a": 0.0},
        {"b": 1.5},
        {"rescore_every": 0},
    ):
        with pytest.raises(ValueError, match="curriculum"):
            _strategy(**kwargs)


def test_start_sets_total_rounds():
    strategy = _strategy()
    # T = num-server-rounds, clamped: T is a divisor.
    strategy.configure_train(1, to_record(ARRAYS), _config(0), FakeGrid([1]))
    assert strategy.total_rounds(strategy.train_round) == 1
    assert math.isclose(strategy.data_fraction(strategy.train_round), 0.2)
    # start() (Bouquet's driver) puts num_rounds in the train config.
    strategy.start(FakeGrid([1]), to_record(ARRAYS), num_rounds=5)
    assert strategy.train_round.num_rounds == 5
    assert strategy.total_rounds(strategy.train_round) == 5
    sent = strategy.train_round.config
    assert sent[wire.NUM_ROUNDS] == 5
    assert sent[FRACTION] == pytest.approx(pacing("linear", 4, 5, 0.8, 0.2))


def test_inprocess_client_pacing_scores_every_node(tmp_path):
    from bouquet.simulations.inprocess import run_inprocess
    from bouquet.strategies.state import load_state

    config = {
        "algorithm": "curriculum",
        "curriculum.client-pacing": "linear",
        "num-server-rounds": 2,
        "fraction-train": 0.5,
        "local-epochs": 1,
        "output-dir": str(tmp_path),
    }
    _, path, grid = run_inprocess(config, num_nodes=4)
    # Round 1: nobody scored, pool = 2 unscored nodes, lowest ids first.
    trained = {n for n, c in grid.contexts.items() if "curriculum.scored" in c.state}
    first = {
        n
        for n, c in grid.contexts.items()
        if "curriculum.scored" in c.state
        and int(c.state["curriculum.scored"]["round"]) == 1
    }
    assert first <= {1000, 1001} and {1000, 1001} <= trained
    # Federated evaluation (fraction 1) scored every node after each round.
    state = load_state(path / "checkpoint").strategy
    assert state["score-rounds"] == {str(n): 2 for n in range(1000, 1004)}
    assert all(np.isfinite(v) for v in state["client-scores"].values())
