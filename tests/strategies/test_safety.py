"""A round that would leave the model or state unusable is refused, state restored."""

import numpy as np
import pytest

from bouquet.strategies.context import RoundContext
from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.safety import snapshot, state_problem

X = {"w": np.zeros(3, np.float32)}


class Blowing(FedAvg):
    """FedAvg whose aggregation writes ``value`` into its state and arrays."""

    name = ""
    value = 0.0

    def aggregate(self, replies, ctx):
        self.state["mine"] = {"x": np.full(3, self.value), "rate": self.value}
        return {"w": np.full(3, self.value, np.float32)}


def _ctx():
    return RoundContext(1, None, "train", (), (), dict(X), {})


@pytest.mark.parametrize(
    ("value", "refused"), [(1.0, False), (2e10, True), (np.inf, True), (np.nan, True)]
)
def test_out_of_bounds_round_is_refused_and_state_restored(value, refused):
    strategy = Blowing()
    strategy.state["mine"] = {"x": np.ones(3), "rate": 0.5}
    strategy.value = value
    ctx = _ctx()
    arrays = strategy.aggregate_safely([], ctx)
    assert (arrays is None) == refused
    assert ctx.outcome.update_skipped == refused
    if refused:
        assert strategy.state["mine"]["rate"] == 0.5
        np.testing.assert_array_equal(strategy.state["mine"]["x"], np.ones(3))
        assert "global array 'w'" in ctx.outcome.refused


def test_state_beyond_its_limit_is_refused():
    assert state_problem(X, {"v": np.full(2, 1e21)}) is not None
    assert state_problem(X, {"v": [1.0, float("inf")]}) is not None
    assert state_problem(X, {"v": np.full(2, 1e19), "n": 10**30}) is None


def test_snapshot_copies_containers_and_freezes_arrays():
    table = {"a": [np.zeros(4)], "b": np.zeros(8)}
    saved = snapshot(table)
    table["a"].append(np.ones(1))
    table["c"] = 1.0
    assert len(saved.value["a"]) == 1 and "c" not in saved.value
    assert saved.value["b"] is table["b"] and id(table["b"]) in saved.shared
    with pytest.raises(ValueError):
        table["b"][0] = 1.0  # state arrays are replaced, never written into
    # a shared array was checked when it entered: it is not read again
    bad = np.full(8, np.inf)
    again = snapshot({"b": bad})
    assert state_problem(X, {"b": bad}, again) is None
    assert state_problem(X, {"b": bad}) is not None
    assert state_problem(X, {"b": bad.copy()}, again) is not None
