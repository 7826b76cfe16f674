"""Conformance over the registry: every algorithm gets these tests the day it lands."""

import json

import numpy as np
import pytest

from serverapps.run import build_strategy
from simulations.inprocess import app_defaults, run_inprocess
from strategies.registry import get_algorithm, list_algorithms
from strategies.state import load_state

ALGORITHMS = list_algorithms()


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return a == b


@pytest.mark.parametrize("name", ALGORITHMS)
def test_pyproject_declares_the_algorithm_table(name):
    defaults = app_defaults()
    entry = get_algorithm(name)
    declared = {
        k.split(".", 1)[1]: v for k, v in defaults.items() if k.startswith(f"{name}.")
    }
    assert declared == dict(entry.hyperparameters)
    assert entry.paper and entry.summary


@pytest.mark.parametrize("name", ALGORITHMS)
def test_two_rounds_finite_state_roundtrip_and_replay(name, tmp_path):
    config = {
        "algorithm": name,
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "output-dir": str(tmp_path),
        "seed": 7,
        "model": "cnn",  # BatchNorm: float buffers and a 0-d integer buffer
    }
    first, path, _ = run_inprocess(config, num_nodes=4)
    arrays = {k: v.numpy() for k, v in first.arrays.items()}
    assert arrays and all(np.isfinite(a).all() for a in arrays.values())
    # Finite arrays alone would pass if every reply were dropped (the model
    # never moves): the algorithm's own replies must all be valid.
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    for row in rows[1:]:
        assert row["train-dropped"] == 0 and row["error-replies"] == 0, row
        assert row["train-replies"] > 0 and not row["update-skipped"], row

    state = load_state(path / "checkpoint")
    assert state.round == 2
    fresh = build_strategy({**app_defaults(), **config})
    fresh.load_state(state.strategy)
    assert _equal(fresh.export_state(), state.strategy)

    again, _, _ = run_inprocess(config, num_nodes=4)
    for key, value in arrays.items():
        np.testing.assert_array_equal(value, again.arrays[key].numpy())
