"""Omniscient ALIE and min-max (``strategies/attacks.py``) on hand-made updates."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord

from bouquet.serverapps.run import checked_strategy
from bouquet.serverapps.settings import RunConfigError
from bouquet.simulations.inprocess import (
    InProcessGrid,
    app_defaults,
    ensure_task_identity,
    run_inprocess,
)
from bouquet.strategies.aggregation import to_record
from bouquet.strategies.attacks import alie_update, attack_on_server, min_max_update
from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.registry import get_algorithm
from tests.conftest import answer, make_reply


def test_alie_is_mean_minus_z_std_per_coordinate():
    updates = np.array([[1.0, 0.0], [3.0, 2.0]])  # mean (2, 1), std (1, 1)
    np.testing.assert_allclose(alie_update(updates, 1.5), [0.5, -0.5])


def test_min_max_goes_as_far_as_the_honest_spread_allows():
    # Rows (0, 0) and (2, 0): mean (1, 0), largest pairwise distance 2;
    # p = -(1, 0): (1 - g, 0) is within 2 of both rows while g <= 1.
    updates = np.array([[0.0, 0.0], [2.0, 0.0]])
    crafted = min_max_update(updates)
    np.testing.assert_allclose(crafted, [0.0, 0.0], atol=1e-4)
    assert np.sqrt(np.sum((updates - crafted) ** 2, axis=1)).max() <= 2.0
    # "std": p = -(1, 0) too here; "sign": -(1, 0).
    for kind in ("std", "sign"):
        np.testing.assert_allclose(min_max_update(updates, kind), [0, 0], atol=1e-4)


def test_the_attackers_replies_are_crafted_before_aggregation():
    ensure_task_identity()
    x = {"w": np.zeros(2, np.float32), "n": np.array(4, np.int64)}
    strategy = attack_on_server(FedAvg(), "alie-omniscient", {1}, z=1.0)
    grid = InProcessGrid(lambda msg, ctx: msg, 3, {})
    strategy.configure_train(1, to_record(x), ConfigRecord(), grid)
    models = [(1.0, 0.0), (3.0, 2.0), (2.0, 1.0)]
    replies = [
        make_reply(
            {"w": np.float32(w), "n": np.array(9, np.int64)},
            {"num-examples": 10, "partition-id": p},
            node_id=1000 + p,
        )
        for p, w in enumerate(models)
    ]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
    updates = np.array(models)
    crafted = updates.mean(0) - updates.std(0)  # partition 1 sends it instead
    expected = (updates[0] + crafted + updates[2]) / 3
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)
    assert arrays["n"].numpy() == 9  # integer entries: each reply's own


@pytest.mark.parametrize("name", ["frl", "fedbuff", "ef21"])
def test_algorithms_whose_replies_are_not_models_are_refused(name):
    with pytest.raises(ValueError, match="crafts a model"):
        attack_on_server(get_algorithm(name)(), "min-max", ())
    config = {**app_defaults(), "algorithm": name, "attack": "min-max"}
    with pytest.raises(RunConfigError, match="crafts a model"):
        checked_strategy(config)


def test_min_max_run_end_to_end(tmp_path):
    config = {
        "algorithm": "fedmedian",
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "local-steps": 2,
        "model": "mlp",
        "seed": 1,
        "plot": False,
        "attack": "min-max",
        "attack-fraction": 0.25,
        "output-dir": str(tmp_path),
    }
    _, path, _ = run_inprocess(config, num_nodes=4)
    rows = json.loads((path / "metrics.json").read_text())["rounds"][1:]
    assert [r["train-replies"] for r in rows] == [4, 4]
