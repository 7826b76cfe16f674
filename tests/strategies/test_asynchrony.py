"""The asynchronous driver and the four rules: hand-computed cases and reductions."""

import json
import math

import numpy as np
import pytest
from flwr.app import Message

from bouquet.serverapps.run import build_strategy
from bouquet.simulations.inprocess import app_defaults, run_inprocess
from bouquet.strategies.asynchrony import Update, staleness_weight
from bouquet.strategies.clocks import TIMER, DeviceSpeeds, Task, VirtualClock, WallClock
from bouquet.strategies.context import RoundContext
from bouquet.strategies.state import load_state


def _strategy(name, **hp):
    config = {**app_defaults(), "algorithm": name}
    config.update({f"{name}.{k}": v for k, v in hp.items()})
    return build_strategy(config)


def _update(node, version, delta, examples=10.0, start=0.0, arrival=1.0):
    return Update(
        node=node,
        version=version,
        steps=1,
        start=start,
        arrival=arrival,
        partition=None,
        num_examples=examples,
        metrics={},
        arrays={"w": np.array(delta, dtype=np.float64)},
    )


def _combine(s, updates):
    """The rule's increment ``sum_i c_i Delta_i`` (before ``eta_g``)."""
    coefficients = s.coefficients(updates)
    assert len(coefficients) == len(updates)
    return sum(c * u.arrays["w"] for c, u in zip(coefficients, updates, strict=True))


# ------------------------------------------------------------ mechanics --
def test_staleness_functions():
    assert staleness_weight("constant", 7) == 1.0
    assert staleness_weight("polynomial", 3, a=0.5) == pytest.approx(0.5)
    assert staleness_weight("hinge", 4, a=0.5, b=4) == 1.0
    assert staleness_weight("hinge", 6, a=0.5, b=4) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight("exponential", 1)


def test_device_speeds_linear_is_fedfix_f80_and_random_is_seeded():
    np.testing.assert_allclose(
        DeviceSpeeds("linear", ratio=5.0).step_times(5, seed=0), [1, 0.8, 0.6, 0.4, 0.2]
    )
    a = DeviceSpeeds("random", ratio=4.0).step_times(50, seed=3)
    assert a.min() >= 0.25 and a.max() <= 1.0 and len(set(a)) == 50
    np.testing.assert_array_equal(a, DeviceSpeeds("random", 4.0).step_times(50, 3))
    assert not np.array_equal(a, DeviceSpeeds("random", 4.0).step_times(50, 4))
    noisy = DeviceSpeeds("equal", noise=0.1)
    times = [noisy.task_time(1.0, 10, 0, 2, s) for s in range(200)]
    assert times[0] == noisy.task_time(1.0, 10, 0, 2, 0)
    assert 9.5 < np.mean(times) < 10.5 and 0.5 < np.std(times) < 1.5
    assert DeviceSpeeds().task_time(0.5, 10, 0, 0, 0) == 5.0
    with pytest.raises(ValueError, match="device-speeds"):
        DeviceSpeeds("fast")


def test_virtual_clock_releases_replies_in_simulated_order():
    clock = VirtualClock(DeviceSpeeds("linear", ratio=2.0))
    clock.bind({100: 0, 200: 1}, seed=0)  # node 100 slow (1.0/step), 200 fast (0.5)
    slow, fast = Task(100, "s", 0, 4, 0.0, 1), Task(200, "f", 0, 4, 0.0, 2)
    clock.schedule(slow)
    clock.schedule(fast)
    assert (slow.due, fast.due) == (4.0, 2.0)
    in_flight = {"s": slow, "f": fast}
    placeholder = Message.__new__(Message)
    # The slow reply arrived first physically: it must wait for the fast one.
    assert clock.next_event(in_flight, {"s": placeholder}, None) is None
    assert clock.next_event(in_flight, {"s": placeholder}, until=1.5) == TIMER
    assert clock.now() == 1.5
    assert clock.next_event(in_flight, {"s": placeholder, "f": placeholder}, 3) == "f"
    assert clock.now() == 2.0
    del in_flight["f"]
    assert clock.next_event(in_flight, {"s": placeholder}, until=4.0) == "s"
    assert clock.now() == 4.0


# --------------------------------------------------------- golden rules --
def test_fedasync_identical_and_staleness_weighted():
    s = _strategy("fedasync")
    s.book.version = 3
    assert s.coefficients([_update(1, 1, [2.0, -4.0])]) == [1.0]
    np.testing.assert_allclose(_combine(s, [_update(1, 1, [2.0, -4.0])]), [2.0, -4.0])
    s = _strategy("fedasync", staleness="polynomial", **{"staleness-a": 0.5})
    s.book.version = 3  # tau = 3 - 0 = 3: S = 4^-0.5 = 0.5
    assert s.coefficients([_update(1, 0, [2.0, -4.0])]) == pytest.approx([0.5])
    np.testing.assert_allclose(_combine(s, [_update(1, 0, [2.0, -4.0])]), [1, -2])


def test_async_chain_adds_eta_g_times_the_combined_update():
    s = _strategy("fedasync", staleness="polynomial", **{"eta-g": 0.5})
    s.book.version = 3  # S = 0.5 as above: increment [1, -2], times eta_g 0.5
    ctx = RoundContext(
        server_round=4,
        num_rounds=None,
        phase="train",
        nodes=(1,),
        sampled=(1,),
        arrays={"w": np.array([1.0, 1.0])},
        config={},
    )
    new = s.aggregate([_update(1, 0, [2.0, -4.0])], ctx)
    np.testing.assert_allclose(new["w"], [1.5, 0.0])


def test_fedasync_weight_variant_uses_durations():
    s = _strategy("fedasync", weights="weight")
    s.book.nodes = [1, 2]
    s.durations.add(1, 1.0)
    s.durations.add(2, 4.0)
    # d_1 = (1/1 + 1/4) * 1 * 1/2 = 0.625 ; d_2 = 1.25 * 4 * 0.5 = 2.5
    assert s.d(1) == pytest.approx(0.625) and s.d(2) == pytest.approx(2.5)


def test_fedbuff_weights():
    ups = [_update(1, 2, [1.0], 10), _update(2, 1, [4.0], 30)]
    s = _strategy("fedbuff", **{"buffer-size": 2})
    s.book.version = 2
    np.testing.assert_allclose(_combine(s, ups), [2.5])  # (1 + 4) / 2
    s = _strategy("fedbuff", weights="examples")
    np.testing.assert_allclose(s.coefficients(ups), [0.25, 0.75])
    np.testing.assert_allclose(_combine(s, ups), [0.25 * 1 + 0.75 * 4])
    s = _strategy("fedbuff", staleness="polynomial")
    s.book.version = 2  # staleness 0 and 1: S = 1 and 2^-0.5
    np.testing.assert_allclose(_combine(s, ups), [0.5 + 0.5 * 4 / math.sqrt(2)])
    s = _strategy("fedbuff", weights="weight")
    s.book.nodes = [1, 2, 3, 4]
    _combine(s, ups)  # aggregation 1: both included
    assert s.state["aggregations"] == 1
    assert s.state["inclusions"] == {1: 1, 2: 1}
    s.state["inclusions"][3] = 0
    got = _combine(s, [_update(1, 0, [8.0])])  # aggregation 2: f_1 = 2/2 -> d = 1/4
    np.testing.assert_allclose(got, [2.0])
    got = _combine(s, [_update(2, 0, [8.0])])  # aggregation 3: f_2 = 2/3 -> d = 3/8
    np.testing.assert_allclose(got, [3.0])


def test_fedfix_weights_are_ceil_tau_over_period_times_p():
    s = _strategy("fedfix", **{"delta-t": 0.5})
    s.book.clock = WallClock()  # no known speeds: the period follows measurements
    s.book.nodes = [1, 2, 3, 4]
    s.durations.add(1, 2.0)  # period 0.5 * 4 (slowest, node 2) = 2
    s.durations.add(2, 4.0)
    s.durations.add(3, 2.5)
    assert s.period() == 2.0
    assert s.d(1, 2.0) == pytest.approx(1 * 0.25)
    assert s.d(2, 2.0) == pytest.approx(2 * 0.25)
    assert s.d(3, 2.0) == pytest.approx(2 * 0.25)
    inc = _combine(s, [_update(1, 0, [4.0]), _update(2, 0, [4.0])])
    np.testing.assert_allclose(inc, [0.25 * 4 + 0.5 * 4])


def test_fedcompass_group_aggregation():
    s = _strategy("fedcompass")  # alpha 0.9, polynomial a 0.5, p = 1/N
    s.book.nodes = [1, 2, 3]
    s.book.version = 1
    inc = _combine(s, [_update(1, 1, [3.0]), _update(2, 0, [3.0])])
    np.testing.assert_allclose(inc, [0.9 / 3 * 3 + 0.9 / 3 * 3 / math.sqrt(2)])


def test_fedcompass_assignment_follows_the_official_scheduler():
    s = _strategy("fedcompass")  # q-max 100, q-min 20, lambda 1.5
    s.clock.restore(0.0)
    s.state["speed"] = {1: 0.1, 2: 0.2, 3: 0.5, 4: 2.0}
    groups, group_of = s.state["groups"], s.state["group-of"]
    steps = s.state["assigned-steps"]
    s._assign(1)  # no group yet: a new one with Q_max
    g0 = groups[0]
    assert steps[1] == 100
    assert (g0["expected"], g0["latest"]) == pytest.approx((10.0, 15.0))
    s._assign(2)  # joins: floor(10 / 0.2) = 50 in [20, 100]
    assert group_of[2] == 0 and steps[2] == 50
    s._assign(3)  # joins: floor(10 / 0.5) = 20 = Q_min
    assert group_of[3] == 0 and steps[3] == 20
    s._assign(4)  # floor(10/2) = 5 < Q_min: new group landing after g0's next
    # cycle: floor((15 + 0.1 * 100 - 0) / 2) = 12 -> raised to Q_min = 20.
    assert group_of[4] == 1 and steps[4] == 20
    assert groups[1]["expected"] == pytest.approx(40.0)
    assert groups[1]["latest"] == pytest.approx(60.0)
    s.clock.restore(30.0)
    s.state["speed"][5] = 0.25
    s._assign(5)  # g0 closed for joining (E passed); g1: floor(10/0.25) = 40
    assert group_of[5] == 1 and steps[5] == 40
    assert s.state["group-counter"] == 2


# ------------------------------------------------------- whole runs --
def _rows(path):
    return json.loads((path / "metrics.json").read_text())["rounds"]


def test_fedbuff_with_every_node_is_one_fedavg_round(tmp_path):
    # Full-batch local steps: the batch order cannot matter, so the only
    # difference left would be the rule itself.
    common = {
        "num-server-rounds": 1,
        "fraction-evaluate": 0.0,
        "local-steps": 3,
        "local-epochs": 3,
        "batch-size": 4096,
        "momentum": 0.0,
        "device-speeds": "linear",
        "output-dir": str(tmp_path),
    }
    sync, _, _ = run_inprocess({**common, "algorithm": "fedavg"}, num_nodes=4)
    buff, path, _ = run_inprocess(
        {
            **common,
            "algorithm": "fedbuff",
            "fedbuff.buffer-size": 0,
            "fedbuff.weights": "examples",
        },
        num_nodes=4,
    )
    for key in sync.arrays:
        np.testing.assert_allclose(
            buff.arrays[key].numpy(), sync.arrays[key].numpy(), rtol=1e-5, atol=1e-6
        )
    row = _rows(path)[1]
    assert row["train-replies"] == 4 and row["staleness-max"] == 0
    assert row["sim-time"] == pytest.approx(3.0)  # the slowest: 3 steps x 1.0


def test_fedasync_fast_clients_dominate_and_staleness_is_tracked(tmp_path):
    _, path, grid = run_inprocess(
        {
            "algorithm": "fedasync",
            "num-server-rounds": 12,
            "local-steps": 2,
            "device-speeds": "linear",
            "device-speed-ratio": 4.0,
            "output-dir": str(tmp_path),
        },
        num_nodes=3,
    )
    rows = _rows(path)[1:]
    times = [r["sim-time"] for r in rows]
    assert times == sorted(times) and all(r["train-replies"] == 1 for r in rows)
    # Step times 1, 0.625, 0.25 -> tasks of 2, 1.25, 0.5: by t = 2 the fastest
    # client returned 4 times, the middle one once, the slowest once.
    trained = [n for n, kind in grid.calls if kind == "train"]
    fastest = max(
        grid.contexts, key=lambda n: grid.contexts[n].node_config["partition-id"]
    )
    assert trained.count(fastest) > len(trained) / 2
    assert max(r["staleness-max"] for r in rows) >= 3


def test_fedfix_aggregates_on_boundaries_only(tmp_path):
    _, path, _ = run_inprocess(
        {
            "algorithm": "fedfix",
            "fedfix.delta-t": 0.5,
            "num-server-rounds": 4,
            "local-steps": 4,
            "device-speeds": "linear",
            "output-dir": str(tmp_path),
        },
        num_nodes=3,
    )
    rows = _rows(path)[1:]
    # Task times 4, 2.4, 0.8 (ratio 5); period 0.5 x 4 = 2.
    assert [r["sim-time"] for r in rows] == pytest.approx([2.0, 4.0, 6.0, 8.0])
    assert [r["train-replies"] for r in rows] == [1, 3, 1, 3]


def test_async_resume_continues_the_version_count(tmp_path):
    config = {
        "algorithm": "fedcompass",
        "fedcompass.q-max": 6,
        "fedcompass.q-min": 2,
        "num-server-rounds": 3,
        "device-speeds": "random",
        "device-speed-noise": 0.05,
        "output-dir": str(tmp_path),
        "seed": 3,
    }
    _, path, _ = run_inprocess(config, num_nodes=4)
    state = load_state(path / "checkpoint")
    assert state.round == 3 and state.driver["in-flight"]
    resumed, path2, _ = run_inprocess(
        {**config, "num-server-rounds": 6, "resume": str(path)}, num_nodes=4
    )
    assert path2 == path
    rows = _rows(path)
    assert [r["round"] for r in rows] == list(range(7))
    times = [r["sim-time"] for r in rows]
    assert times == sorted(times)
    assert all(np.isfinite(a.numpy()).all() for a in resumed.arrays.values())


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="device-speeds"):
        run_inprocess({"algorithm": "fedasync", "device-speeds": "fast"}, num_nodes=2)
    with pytest.raises(ValueError, match="async-clock"):
        run_inprocess({"algorithm": "fedbuff", "async-clock": "sundial"}, num_nodes=2)
    with pytest.raises(ValueError, match="q-min"):
        _strategy("fedcompass", **{"q-min": 50, "q-max": 10})
