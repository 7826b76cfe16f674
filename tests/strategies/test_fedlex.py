"""FedLEx's server: guidance golden numbers, the phases, state, and FedAvg reduction."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from bouquet.simulations.inprocess import ensure_task_identity, run_inprocess
from bouquet.strategies.fedlex import (
    BASE,
    GUIDANCE,
    FedLEx,
    guidance_matrix,
    normalize,
    squared_deviation,
)
from tests.conftest import answer

# Two explorers, squared deviations by hand: ls = mean = (0.5, 2, 2, 8).
DEV1 = {"w": np.array([1.0, 0.0, 4.0, 0.0])}
DEV2 = {"w": np.array([0.0, 4.0, 0.0, 16.0])}


class FakeGrid:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return list(self.ids)


def test_guidance_golden_numbers_minmax_robust_floor():
    # MinMax: (ls - 0.5) / 7.5
    g = guidance_matrix([DEV1, DEV2])["w"]
    np.testing.assert_allclose(g, [0.0, 0.2, 0.2, 1.0])
    # Robust: lower median 2; q1 = 0.5 + 0.75 * 1.5 = 1.625, q3 = 2 + 0.25 * 6 = 3.5
    g = guidance_matrix([DEV1, DEV2], "robust")["w"]
    np.testing.assert_allclose(g, [-0.8, 0.0, 0.0, 3.2])
    g = guidance_matrix([DEV1, DEV2], "minmax", floor=0.1)["w"]
    np.testing.assert_allclose(g, [0.1, 0.2, 0.2, 1.0])


def test_robust_scaler_matches_the_official_torch_ops():
    ls = np.random.default_rng(0).gamma(1.0, size=(6, 5))  # even count: medians differ
    t = torch.as_tensor(ls)
    expected = (t - torch.median(t)) / (
        torch.quantile(t, 0.75) - torch.quantile(t, 0.25)
    )
    np.testing.assert_allclose(normalize(ls, "robust"), expected.numpy(), rtol=1e-12)


def test_degenerate_tensors_get_ones_and_bad_method_fails():
    np.testing.assert_array_equal(normalize(np.array([3.0]), "minmax"), [1.0])
    np.testing.assert_array_equal(
        normalize(np.zeros((2, 2)), "robust"), np.ones((2, 2))
    )
    with pytest.raises(ValueError, match="normalization"):
        normalize(np.ones(3), "zscore")
    with pytest.raises(ValueError, match="explorer"):
        guidance_matrix([])


def test_squared_deviation_keeps_dtype_and_skips_integer_buffers():
    base = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(3, np.int64)}
    scout = {"w": np.array([0.5, 5.0], np.float32), "n": np.array(9, np.int64)}
    dev = squared_deviation(scout, base)
    assert set(dev) == {"w"} and dev["w"].dtype == np.float32
    np.testing.assert_array_equal(dev["w"], [0.25, 9.0])


def _arrays(values):
    return ArrayRecord({"w": Array(np.asarray(values, np.float32))})


def _explore(strategy, reply, ids=(11, 12, 13, 14)):
    """Round 1 on a fake grid; node 11 + i reports partition 3 - i."""
    ensure_task_identity()
    config = ConfigRecord({"local-epochs": 5, "local-steps": 7})
    messages = strategy.configure_train(1, _arrays([0, 1, 2, 3]), config, FakeGrid(ids))
    base = [1.0, 1.0, 2.0, 3.0]  # partition 0's model after one epoch
    replies = [
        reply(
            {"w": np.asarray(scout, np.float32)},
            {"num-examples": 10, "partition-id": 3 - i},
            node_id=node,
            extra={BASE: _arrays(base if 3 - i == 0 else [9, 9, 9, 9])},
            routine="fedlex",
        )
        for i, (node, scout) in enumerate(
            zip(
                ids,
                ([2, 1, 0, 3], [1, 3, 2, 7], [1, 1, 2, 3], [0, 0, 0, 0]),
                strict=False,
            )
        )
    ]
    sampled = {m.metadata.dst_node_id for m in messages}
    kept = [r for r in replies if r.metadata.src_node_id in sampled]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, kept))
    return messages, config, arrays


def test_exploration_round_settings_and_deviations(reply):
    strategy = FedLEx(seed=0, explore_epochs=3, patience=2, fraction_train=0.5)
    messages, config, arrays = _explore(strategy, reply)
    assert len(messages) == 4  # perc-clients-for-mask = 1: everyone explores
    sent = messages[0].content["config"]
    assert sent["fedlex.phase"] == "explore" and sent["fedlex.patience"] == 2
    assert sent["local-epochs"] == 3 and sent["local-steps"] == 0
    assert config["local-epochs"] == 5  # the shared train config is untouched
    assert GUIDANCE not in messages[0].content
    np.testing.assert_array_equal(arrays["w"].numpy(), [0, 1, 2, 3])  # theta_0 kept
    # base = node 14's record (partition 0), scouts minus base, squared
    deviations = strategy.state["deviations"]
    np.testing.assert_array_equal(deviations["11"]["w"], [1, 0, 4, 0])
    np.testing.assert_array_equal(deviations["12"]["w"], [0, 4, 0, 16])
    np.testing.assert_array_equal(deviations["14"]["w"], [1, 1, 4, 9])


def test_guided_round_sends_g_of_the_sampled_explorers(reply):
    strategy = FedLEx(seed=3, explore_epochs=3, patience=2, fraction_train=0.5)
    _explore(strategy, reply)
    config = ConfigRecord({"local-epochs": 5})
    messages = strategy.configure_train(
        2, _arrays([0, 1, 2, 3]), config, FakeGrid([11, 12, 13, 14])
    )
    assert len(messages) == 2
    assert strategy.expected_records(strategy.train_round) == ()  # no base reply
    deviations = strategy.state["deviations"]
    sampled = [deviations[str(m.metadata.dst_node_id)] for m in messages]
    for msg in messages:
        assert msg.content["config"]["fedlex.phase"] == "train"
        assert msg.content["config"]["local-epochs"] == 5
        np.testing.assert_allclose(
            msg.content[GUIDANCE]["w"].numpy(), guidance_matrix(sampled)["w"], rtol=1e-6
        )
    # Resume mid-phase: a fresh strategy with the exported state sends the same G.
    fresh = FedLEx(seed=3, explore_epochs=3, patience=2, fraction_train=0.5)
    fresh.load_state(strategy.export_state())
    again = fresh.configure_train(
        2, _arrays([0, 1, 2, 3]), ConfigRecord(), FakeGrid([11, 12, 13, 14])
    )
    np.testing.assert_array_equal(
        again[0].content[GUIDANCE]["w"].numpy(),
        messages[0].content[GUIDANCE]["w"].numpy(),
    )


def test_partial_exploration_uses_every_explorer(reply):
    strategy = FedLEx(
        seed=1, explore_epochs=3, perc_clients_for_mask=0.5, fraction_train=1.0
    )
    messages, _, _ = _explore(strategy, reply)
    assert len(messages) == 2 and len(strategy.state["deviations"]) == 2
    guided = strategy.configure_train(
        2, _arrays([0, 1, 2, 3]), ConfigRecord(), FakeGrid([11, 12, 13, 14])
    )
    assert len(guided) == 4
    np.testing.assert_allclose(
        guided[0].content[GUIDANCE]["w"].numpy(),
        guidance_matrix(list(strategy.state["deviations"].values()))["w"],
        rtol=1e-6,
    )


def test_bad_options_fail():
    with pytest.raises(ValueError, match="normalization"):
        FedLEx(guidance_normalization="zscore")
    with pytest.raises(ValueError, match="perc-clients"):
        FedLEx(perc_clients_for_mask=0.0)
    with pytest.raises(ValueError, match="patience"):
        FedLEx(patience=0)


FAST = {
    "model": "mlp",
    "fraction-evaluate": 0.0,
    "fraction-train": 0.5,
    "local-epochs": 1,
    "fedlex.explore-epochs": 2,
    "fedlex.patience": 1,
}


def _final(result):
    return {k: v.numpy() for k, v in result.arrays.items()}


def test_explore_epochs_zero_equals_fedavg(tmp_path):
    config = {**FAST, "num-server-rounds": 2, "output-dir": str(tmp_path)}
    fedavg, _, _ = run_inprocess({**config, "algorithm": "fedavg"}, num_nodes=4)
    fedlex, _, _ = run_inprocess(
        {**config, "algorithm": "fedlex", "fedlex.explore-epochs": 0}, num_nodes=4
    )
    for key, value in _final(fedavg).items():
        np.testing.assert_array_equal(value, _final(fedlex)[key])


def test_resume_after_exploration_matches_uninterrupted_run(tmp_path):
    config = {**FAST, "algorithm": "fedlex", "num-server-rounds": 3}
    full, _, grid = run_inprocess({**config, "output-dir": str(tmp_path / "a")}, 4)
    assert all(len(c.state) == 0 for c in grid.contexts.values())  # stateless
    _, path, _ = run_inprocess(
        {**config, "num-server-rounds": 1, "output-dir": str(tmp_path / "b")}, 4
    )
    resumed, _, _ = run_inprocess(
        {**config, "output-dir": str(tmp_path / "b"), "resume": str(path)}, 4
    )
    for key, value in _final(full).items():
        np.testing.assert_array_equal(value, _final(resumed)[key])
