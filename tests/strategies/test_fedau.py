"""FedAU's server rule: interval bookkeeping, weights, reductions and state."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord

from bouquet.simulations.inprocess import ensure_task_identity
from bouquet.strategies.aggregation import to_numpy, to_record
from bouquet.strategies.fedau import FedAU, omega
from bouquet.strategies.fedavg import FedAvg
from tests.conftest import answer

A, B, C = 11, 22, 33


class Nodes:
    """The smallest Grid a strategy's configure_train needs."""

    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return self.ids


def play(strategy, rnd, arrays, deltas, make_reply, examples=None, nodes=(A, B, C)):
    """One round: configure for ``nodes``, reply ``arrays + delta`` from each key."""
    ensure_task_identity()
    record = to_record(arrays)
    list(strategy.configure_train(rnd, record, ConfigRecord(), Nodes(nodes)))
    replies = [
        make_reply(
            {k: (v + np.asarray(d, v.dtype)) for k, v in arrays.items()},
            {"num-examples": (examples or {}).get(node, 10)},
            node_id=node,
        )
        for node, d in deltas.items()
    ]
    new, _ = strategy.aggregate_train(rnd, answer(strategy, replies))
    return arrays if new is None else to_numpy(new)


def book(strategy):
    """FedAU's interval bookkeeping: the state of its weighting piece."""
    return strategy.state["aggregator"]["weighting"]


def omega_now(strategy, node_ids):
    """``omega_n`` of ``node_ids`` now (the strategy's state is left as it is)."""
    return omega(dict(book(strategy)), node_ids)


def assert_state_equal(got, expected):
    """Nested dicts / lists of arrays and scalars are equal, leaf by leaf."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected)
        for key, value in expected.items():
            assert_state_equal(got[key], value)
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert_state_equal(g, e)
    else:
        np.testing.assert_array_equal(got, expected)


# Participation sequence, K = 3 (worked out in the test below).
SEQUENCE = [{A}, {A, B}, set(), {A}, set(), set(), set(), {A, C}]


def test_interval_bookkeeping_golden_with_cutoff(reply):
    strategy = FedAU(seed=0, k=3, min_train_nodes=1)
    w = {"w": np.zeros(2)}
    omegas = []
    for rnd, who in enumerate(SEQUENCE, start=1):
        omegas.append(
            dict(zip(sorted(who), omega_now(strategy, sorted(who)), strict=True))
        )
        w = play(strategy, rnd, w, {n: [0.0, 0.0] for n in who}, reply)
    # A: intervals 1 (r1), 1 (r2), 2 (r4), 3 (cutoff at r7), 1 (r8).
    # B: 2 (r2), 3 (cutoff r5), 3 (cutoff r8). C: 3 (r3), 3 (r6), 2 (r8).
    state = book(strategy)
    slots = {int(n): i for i, n in enumerate(state["node-ids"])}
    got = {
        n: (state["interval-sums"][slots[n]], state["interval-counts"][slots[n]])
        for n in (A, B, C)
    }
    assert got == {A: (8.0, 5), B: (8.0, 3), C: (8.0, 3)}
    assert list(state["counters"]) == [0, 0, 0]
    # Weights use past intervals only; first participation weighs 1.
    assert omegas[0] == {A: 1.0}
    assert omegas[1] == {A: 1.0, B: 1.0}
    assert omegas[3] == {A: 1.0}
    assert omegas[7] == {A: pytest.approx(7 / 4), C: 3.0}


def test_update_is_omega_weighted_sum_over_all_nodes(reply):
    strategy = FedAU(seed=0, k=3, eta_g=2.0, min_train_nodes=1)
    w = {"w": np.zeros(2)}
    for rnd, who in enumerate(SEQUENCE[:-1], start=1):
        w = play(strategy, rnd, w, {n: [0.0, 0.0] for n in who}, reply)
    start = {"w": np.array([0.5, -1.0])}
    out = play(strategy, 8, start, {A: [1.0, 2.0], C: [-1.0, 0.5]}, reply)
    # eta_g / N (1.75 * dA + 3 * dC) = 2/3 * (-1.25, 5.0)
    np.testing.assert_allclose(out["w"], [0.5 - 2.5 / 3, -1.0 + 10 / 3])


def test_counters_keep_running_without_a_cutoff(reply):
    strategy = FedAU(seed=0, min_train_nodes=1)  # K = 100000
    w = {"w": np.zeros(1)}
    for rnd in range(1, 6):
        w = play(strategy, rnd, w, {A: [0.0]} if rnd == 5 else {}, reply)
    assert omega_now(strategy, [A, B]).tolist() == [5.0, 1.0]  # A: one interval of 5
    assert book(strategy)["counters"].tolist() == [0, 5, 5]


@pytest.mark.parametrize("weighting", ["adaptive", "average-participating"])
def test_full_participation_equals_fedavg_with_equal_weights(reply, weighting):
    fedau, fedavg = FedAU(seed=0, weighting=weighting), FedAvg(seed=0)
    rng = np.random.default_rng(0)
    x = y = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    for rnd in range(1, 4):
        deltas = {n: rng.normal(size=(3, 2)) for n in (A, B, C)}
        x = play(fedau, rnd, x, deltas, reply)
        y = play(fedavg, rnd, y, deltas, reply)
        np.testing.assert_allclose(x["w"], y["w"], rtol=1e-6, atol=1e-7)
    assert omega_now(fedau, [A, B, C]).tolist() == [1.0, 1.0, 1.0]


def test_baseline_weightings(reply):
    d = {A: [3.0], B: [6.0]}
    zero = {"w": np.zeros(1)}
    participating = FedAU(seed=0, weighting="average-participating")
    np.testing.assert_allclose(play(participating, 1, zero, d, reply)["w"], [4.5])
    average_all = FedAU(seed=0, weighting="average-all")
    np.testing.assert_allclose(play(average_all, 1, zero, d, reply)["w"], [3.0])
    with pytest.raises(ValueError, match="weighting"):
        FedAU(weighting="oracle")


def test_dropped_replies_and_skipped_rounds_count_as_absent(reply):
    strategy = FedAU(seed=0, min_train_nodes=2)
    w = {"w": np.zeros(1)}
    w = play(strategy, 1, w, {A: [1.0]}, reply)  # one reply < min: skipped
    assert w["w"][0] == 0.0
    assert book(strategy)["counters"].tolist() == [1, 1, 1]
    bad = {A: [np.nan], B: [1.0], C: [2.0]}  # A's reply is invalid
    w = play(strategy, 2, w, bad, reply)
    np.testing.assert_allclose(w["w"], [(1.0 + 2.0) / 3])
    assert book(strategy)["counters"].tolist() == [2, 0, 0]


def test_state_roundtrip_resumes_identically(reply):
    rng = np.random.default_rng(1)
    rounds = [
        {n: rng.normal(size=2) for n in (A, B, C) if rng.random() < 0.5}
        for _ in range(8)
    ]
    straight = FedAU(seed=0, k=3, min_train_nodes=1)
    w = {"w": np.zeros(2)}
    for rnd, d in enumerate(rounds, start=1):
        w = play(straight, rnd, w, d, reply)

    first = FedAU(seed=0, k=3, min_train_nodes=1)
    v = {"w": np.zeros(2)}
    for rnd, d in enumerate(rounds[:4], start=1):
        v = play(first, rnd, v, d, reply)
    resumed = FedAU(seed=0, k=3, min_train_nodes=1)
    resumed.load_state(first.export_state())
    for rnd, d in enumerate(rounds[4:], start=5):
        v = play(resumed, rnd, v, d, reply)
    np.testing.assert_array_equal(v["w"], w["w"])
    assert_state_equal(resumed.export_state(), straight.export_state())


def test_new_nodes_join_with_fresh_counters(reply):
    strategy = FedAU(seed=0, min_train_nodes=1, min_available_nodes=1)
    w = play(strategy, 1, {"w": np.zeros(1)}, {A: [1.0]}, reply, nodes=(A,))
    play(strategy, 2, w, {B: [3.0]}, reply, nodes=(A, B))
    assert book(strategy)["node-ids"].tolist() == [A, B]
    assert book(strategy)["counters"].tolist() == [1, 0]
    assert isinstance(to_record(w), ArrayRecord)


def test_inprocess_bernoulli_run_counts_participation_and_resumes(tmp_path):
    from bouquet.simulations.inprocess import run_inprocess
    from bouquet.strategies.state import load_state

    run = {
        "algorithm": "fedau",
        "local-steps": 2,
        "fraction-evaluate": 0.0,
        "min-train-nodes": 1,
        "participation": "bernoulli",
        "participation-mean": 0.4,
        "seed": 3,
        "output-dir": str(tmp_path),
    }
    straight, path, grid = run_inprocess({**run, "num-server-rounds": 4}, num_nodes=6)
    state = load_state(path / "checkpoint").strategy
    intervals = state["aggregator"]["weighting"]
    trained = [n for n, kind in grid.calls if kind == "train"]
    # Every node was registered; each participation recorded one interval.
    assert sorted(intervals["node-ids"].tolist()) == list(range(1000, 1006))
    assert 0 < len(trained) < 24
    assert int(intervals["interval-counts"].sum()) == len(trained)

    _, part, _ = run_inprocess({**run, "num-server-rounds": 2}, num_nodes=6)
    resumed, _, _ = run_inprocess(
        {**run, "num-server-rounds": 4, "resume": str(part)}, num_nodes=6
    )
    for key, value in straight.arrays.items():
        np.testing.assert_array_equal(value.numpy(), resumed.arrays[key].numpy())
    final = load_state(part / "checkpoint").strategy
    assert_state_equal(final, state)
