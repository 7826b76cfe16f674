"""End-to-end runs of the real ServerApp logic against in-process ClientApps."""

import json

import numpy as np
import pytest
from flwr.app import Message

from bouquet.clientapps.app import app as client_app
from bouquet.serverapps.settings import RunConfigError
from bouquet.simulations.inprocess import run_inprocess

FAST = {"num-server-rounds": 2, "local-epochs": 1, "fraction-evaluate": 0.5}


def _arrays(result):
    return {k: v.numpy() for k, v in result.arrays.items()}


def test_fedavg_run_writes_results(tmp_path):
    result, path, grid = run_inprocess(
        {**FAST, "output-dir": str(tmp_path)}, num_nodes=4
    )
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["train-replies"] == 4 and rows[-1]["bytes-sent"] > 0
    assert rows[-1]["central-accuracy"] > rows[0]["central-accuracy"]
    for row in rows[1:]:  # the latency split of bench_deployment
        assert 0 < row["client-time"] <= row["wait-time"] < row["wall-time"], row
        assert row["client-time"] <= row["client-time-total"], row
    for name in (
        "metrics.csv",
        "metrics.png",
        "config.json",
        "summary.json",
        "checkpoint.json",
        "checkpoint.npz",
    ):
        assert (path / name).exists(), name
    assert all(np.isfinite(a).all() for a in _arrays(result).values())
    assert len(grid.calls) == 2 * (4 + 2)  # train 4 nodes + evaluate 2 per round


def test_fedprox_mu_zero_equals_fedavg(tmp_path):
    base = {**FAST, "output-dir": str(tmp_path), "plot": False}
    fedavg, path, _ = run_inprocess(base, num_nodes=3)
    assert (path / "summary.json").exists()
    assert not (path / "metrics.png").exists()  # plot=false skips matplotlib
    fedprox, _, _ = run_inprocess(
        {**base, "algorithm": "fedprox", "fedprox.proximal-mu": 0.0}, num_nodes=3
    )
    for key, value in _arrays(fedavg).items():
        np.testing.assert_array_equal(value, _arrays(fedprox)[key])
    mu, _, _ = run_inprocess(
        {**base, "algorithm": "fedprox", "fedprox.proximal-mu": 1.0}, num_nodes=3
    )
    assert any(
        not np.array_equal(v, _arrays(mu)[k]) for k, v in _arrays(fedavg).items()
    )


def test_bad_replies_are_dropped_and_the_round_goes_on(tmp_path, caplog):
    def flaky(msg: Message, context):
        pid = context.node_config["partition-id"]
        if pid == 0 and msg.metadata.message_type == "train":
            raise RuntimeError("client crashed")
        reply = client_app(msg, context)
        if pid == 1 and msg.metadata.message_type == "train":
            arrays = reply.content["arrays"]
            key = next(iter(arrays.keys()))
            bad = arrays[key].numpy().copy()
            bad.flat[0] = np.nan
            from flwr.app import Array

            arrays[key] = Array(bad)
        return reply

    result, path, _ = run_inprocess(
        {**FAST, "output-dir": str(tmp_path)}, num_nodes=4, client_app=flaky
    )
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    assert rows[1]["train-replies"] == 2 and rows[1]["train-dropped"] == 2
    reasons = " ".join(rows[1]["drop-reasons"])
    assert "client crashed" in reasons and "non-finite" in reasons
    assert rows[1]["error-replies"] == 1 and rows[1]["train-missing"] == 0
    assert "Dropped reply" in caplog.text
    assert all(np.isfinite(a).all() for a in _arrays(result).values())
    summary = json.loads((path / "summary.json").read_text())
    assert summary["error-replies"] == 2 and summary["dropped-replies"] == 4
    assert "2 error replies and 0 missing replies" in caplog.text


def test_lost_nodes_are_logged_and_counted(tmp_path, caplog, monkeypatch):
    from bouquet.simulations.inprocess import InProcessGrid

    pull = InProcessGrid.pull_messages

    def lose_node_1001(self, message_ids):  # as if node 1001 went offline
        return [r for r in pull(self, message_ids) if r.metadata.src_node_id != 1001]

    monkeypatch.setattr(InProcessGrid, "pull_messages", lose_node_1001)
    # A lost node is waited for until the round timeout, as on a real grid.
    config = {**FAST, "fraction-evaluate": 1.0, "round-timeout": 0.3}
    _, path, _ = run_inprocess({**config, "output-dir": str(tmp_path)}, num_nodes=3)
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    for row in rows[1:]:
        assert row["wait-time"] >= 2 * 0.3  # train and evaluate
        assert row["train-replies"] == 2 and row["train-missing"] == 1
        assert row["evaluate-missing"] == 1 and not row["update-skipped"]
    assert "no train reply from node(s) [1001]" in caplog.text
    assert json.loads((path / "summary.json").read_text())["missing-replies"] == 4


@pytest.mark.parametrize(("algorithm", "model"), [("fedavg", "mlp"), ("fedld", "cnn")])
def test_resume_matches_uninterrupted_run(tmp_path, algorithm, model):
    config = {
        "model": model,
        "num-server-rounds": 6,
        "fraction-evaluate": 0.0,
        "output-dir": str(tmp_path),
        "algorithm": algorithm,
    }
    full, _, _ = run_inprocess(config, num_nodes=3)
    _, path, _ = run_inprocess({**config, "num-server-rounds": 3}, num_nodes=3)
    resumed, path2, _ = run_inprocess({**config, "resume": str(path)}, num_nodes=3)
    assert path2 == path
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == list(range(7))
    for key, value in _arrays(full).items():
        np.testing.assert_array_equal(value, _arrays(resumed)[key])


class _KilledError(Exception):
    pass


def test_resume_restores_the_saved_config_and_refuses_changes(tmp_path, monkeypatch):
    """``resume`` alone continues the interrupted run with its own config."""
    import bouquet.serverapps.run
    from bouquet.serverapps.resume import ResumeConfigError

    config = {
        "algorithm": "fedavgm",
        "num-server-rounds": 4,
        "fraction-evaluate": 0.0,
        "lr": 0.05,
        "seed": 5,
        "local-epochs": 1,
    }
    full, _, _ = run_inprocess(
        {**config, "output-dir": str(tmp_path / "full")}, num_nodes=3
    )
    line = bouquet.serverapps.run.progress_line

    def die_after_round_2(row, num_rounds):
        if row["round"] == 2:
            raise _KilledError  # as if the ServerApp died after round 2's checkpoint
        return line(row, num_rounds)

    monkeypatch.setattr(bouquet.serverapps.run, "progress_line", die_after_round_2)
    out = str(tmp_path / "cut")
    with pytest.raises(_KilledError):
        run_inprocess({**config, "output-dir": out}, num_nodes=3)
    monkeypatch.undo()
    (path,) = (tmp_path / "cut").iterdir()

    for changed, message in [
        ({"lr": 0.1}, "lr: 0.05 in the run, 0.1 now"),
        ({"fraction-evaluate": 1.0}, "fraction-evaluate: 0.0 in the run, 1.0 now"),
        ({"num-server-rounds": 3}, "num-server-rounds: 4 in the run, 3 now"),
    ]:
        with pytest.raises(ResumeConfigError, match=message):
            run_inprocess({"resume": str(path), **changed}, num_nodes=3)

    # Nothing but the run directory: rounds, evaluation, lr, seed come back.
    resumed, path2, _ = run_inprocess({"resume": str(path)}, num_nodes=3)
    assert path2 == path
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(r["client-accuracy"] is None for r in rows)  # evaluation stays off
    for key, value in _arrays(full).items():
        np.testing.assert_array_equal(value, _arrays(resumed)[key])


def test_unknown_algorithm_and_bad_value_fail_at_once(tmp_path):
    with pytest.raises(RunConfigError, match=r"Known algorithms: .*fedavg"):
        run_inprocess({"algorithm": "nope", "output-dir": str(tmp_path)}, num_nodes=2)
    with pytest.raises(ValueError, match=r"'fedprox\.proximal-mu' must be float"):
        run_inprocess(
            {
                "algorithm": "fedprox",
                "fedprox.proximal-mu": "oops",
                "output-dir": str(tmp_path),
            },
            num_nodes=2,
        )


def test_separate_shares_no_mutable_object():
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from bouquet.simulations.inprocess import separate

    original = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.arange(3.0))}),
            "config": ConfigRecord({"lr": 0.1, "ks": [1, 2]}),
            "metrics": MetricRecord({"loss": 1.0}),
        }
    )
    copy_ = separate(original)
    copy_["arrays"]["w"].data = Array(np.zeros(3)).data
    copy_["arrays"]["v"] = Array(np.ones(1))
    copy_["config"]["ks"].append(3)
    copy_["config"]["lr"] = 9.0
    copy_["metrics"]["loss"] = 0.0
    assert list(original["arrays"]) == ["w"]
    np.testing.assert_array_equal(original["arrays"]["w"].numpy(), np.arange(3.0))
    assert original["config"]["ks"] == [1, 2] and original["config"]["lr"] == 0.1
    assert original["metrics"]["loss"] == 1.0
    assert copy_["arrays"]["w"].data is not original["arrays"]["w"].data
