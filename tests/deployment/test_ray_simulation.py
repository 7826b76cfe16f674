"""A real ``flwr run`` of the app on a simulation SuperLink (Ray backend).

One SuperLink serves the module. One 3-round FedAvg run over 4 simulated
SuperNodes serves two checks: the run itself (status, every node in every
round) and acceptance check 3 (the in-process runner reaches the same final
central accuracy for the same seed). A run with an unknown algorithm is
submitted first, without waiting, so that it fails while the FedAvg run goes on
(runs on one SuperLink are concurrent).
"""

import math
import shutil
from pathlib import Path

import pytest

from bouquet.simulations.inprocess import run_inprocess
from bouquet.simulations.proctools import (
    STATUS_COMPLETED,
    STATUS_FAILED,
    read_run_metrics,
)

pytestmark = pytest.mark.slow

NODES = 4
FEDAVG = {
    "algorithm": "fedavg",
    "num-server-rounds": 3,
    "fraction-train": 1.0,
    "seed": 42,
}
FEDERATION = {"num-supernodes": NODES, "client-resources-num-cpus": 1}


@pytest.fixture(scope="module")
def superlink(flower):
    return flower.start_simulation_superlink()


@pytest.fixture(scope="module")
def failing_run(flower, superlink, app_dir, tmp_path_factory):
    """An unknown algorithm, submitted without waiting: it fails while others run."""
    return flower.submit_run(
        superlink.connection,
        app_dir,
        run_config={
            "algorithm": "nope",
            "num-server-rounds": 1,
            "output-dir": str(tmp_path_factory.mktemp("failing-run")),
        },
        federation_config={"num-supernodes": 2, "client-resources-num-cpus": 1},
        stream=False,
        timeout=120,
    )


@pytest.fixture(scope="module")
def fedavg_run(flower, superlink, app_dir, tmp_path_factory, failing_run):
    output = tmp_path_factory.mktemp("ray-runs")
    run = flower.submit_run(
        superlink.connection,
        app_dir,
        run_config={**FEDAVG, "output-dir": str(output)},
        federation_config=FEDERATION,
        timeout=300,
    )
    status = flower.wait_for_run(run.run_id, superlink.connection, timeout=60)
    return run, status, output


def test_ray_run_completes_with_every_node_every_round(fedavg_run):
    run, status, output = fedavg_run
    assert status == STATUS_COMPLETED, run.output
    rows, path = read_run_metrics(output)
    assert path.name.endswith("-fedavg-digits-42")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        assert row["train-replies"] == NODES, row
        assert row["train-dropped"] == 0 and row["evaluate-dropped"] == 0, row
        assert not row.get("drop-reasons") and not row["update-skipped"], row
    for row in rows:
        assert math.isfinite(row["central-accuracy"]), row
    # The engine's one-pass poll (tasks/flower_engine.py) ran, in the engine only.
    assert run.output.count("all nodes polled in one pass") == 1, run.output


def test_ray_and_inprocess_reach_the_same_accuracy(fedavg_run, tmp_path):
    run, status, output = fedavg_run
    assert status == STATUS_COMPLETED, run.output
    ray_rows, _ = read_run_metrics(output)
    _, path, _ = run_inprocess({**FEDAVG, "output-dir": str(tmp_path)}, num_nodes=NODES)
    local_rows, _ = read_run_metrics(path.parent)
    ray_acc = [r["central-accuracy"] for r in ray_rows]
    local_acc = [r["central-accuracy"] for r in local_rows]
    assert abs(ray_acc[-1] - local_acc[-1]) <= 1e-6, (ray_acc, local_acc)


def test_unknown_algorithm_fails_the_run(flower, superlink, failing_run):
    status = flower.wait_for_run(failing_run.run_id, superlink.connection, timeout=180)
    log = flower.run_log(failing_run.run_id, superlink.connection)
    assert status == STATUS_FAILED, log
    # One line says what is wrong, before any traceback.
    assert "Invalid run config: Unknown algorithm 'nope'" in log, log
    assert "Known algorithms" in log, log


def test_fedld_runs_in_ray(flower, superlink, app_dir, tmp_path):
    run = flower.submit_run(
        superlink.connection,
        app_dir,
        run_config={
            "algorithm": "fedld",
            "fedld.lambda": 0.05,  # a namespaced key passes Flower's config check
            "model": "cnn",  # BatchNorm buffers through the SVD path
            "num-server-rounds": 2,
            "fraction-evaluate": 0.0,
            "output-dir": str(tmp_path),
        },
        federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1},
        timeout=300,
    )
    status = flower.wait_for_run(run.run_id, superlink.connection, timeout=60)
    assert status == STATUS_COMPLETED, run.output
    rows, path = read_run_metrics(tmp_path)
    assert path.name.endswith("-fedld-digits-42")
    assert [r["train-replies"] for r in rows[1:]] == [3, 3]
    assert not any(r["train-dropped"] or r["update-skipped"] for r in rows[1:])


def test_async_run_in_ray_replays_the_inprocess_run(
    flower, superlink, app_dir, tmp_path
):
    """FedCompass under the virtual clock: Ray's actors finish in any order,
    yet versions, simulated times and accuracies equal the in-process run's."""
    config = {
        "algorithm": "fedcompass",
        "fedcompass.q-max": 6,
        "fedcompass.q-min": 2,
        "num-server-rounds": 5,
        "device-speeds": "random",
        "device-speed-noise": 0.05,
        "seed": 9,
    }
    run = flower.submit_run(
        superlink.connection,
        app_dir,
        run_config={**config, "output-dir": str(tmp_path / "ray")},
        federation_config=FEDERATION,
        timeout=300,
    )
    status = flower.wait_for_run(run.run_id, superlink.connection, timeout=60)
    assert status == STATUS_COMPLETED, run.output
    ray_rows, _ = read_run_metrics(tmp_path / "ray")
    _, path, _ = run_inprocess(
        {**config, "output-dir": str(tmp_path / "local")}, num_nodes=NODES
    )
    local_rows, _ = read_run_metrics(path.parent)
    assert [r["round"] for r in ray_rows] == list(range(6))
    for ray_row, local_row in zip(ray_rows, local_rows, strict=True):
        assert ray_row["sim-time"] == local_row["sim-time"]
        assert ray_row["train-replies"] == local_row["train-replies"]
        assert ray_row.get("staleness-max") == local_row.get("staleness-max")
        assert abs(ray_row["central-accuracy"] - local_row["central-accuracy"]) <= 1e-6


QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart_app"


def _quickstart_copy(tmp_path: Path, clientapp: str) -> Path:
    app = tmp_path / "quickstart_app"
    shutil.copytree(QUICKSTART, app, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = app / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace(
            'clientapp = "quickstart.bouquet_client_app:app"',
            f'clientapp = "{clientapp}"',
        )
    )
    return app


def test_a_user_app_runs_an_async_bouquet_strategy_under_flwr_run(
    flower, superlink, tmp_path
):
    # The quickstart-shaped app (its own tasks.py and strategies/), the
    # documented client change, FedBuff: asynchronous under Ray, with the
    # data-profile query answered by the user's query handler.
    app = _quickstart_copy(tmp_path, "quickstart.bouquet_client_app:app")
    run = flower.submit_run(
        superlink.connection,
        app,
        run_config={"algorithm": "fedbuff", "num-server-rounds": 2},
        federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1},
        timeout=300,
    )
    status = flower.wait_for_run(run.run_id, superlink.connection, timeout=60)
    assert status == STATUS_COMPLETED, run.output
    log = flower.run_log(run.run_id, superlink.connection)
    assert "[VERSION 2/2]" in log and "Federated evaluation of version 2" in log, log


def test_a_user_app_without_the_client_change_fails_the_run(
    flower, superlink, tmp_path
):
    app = _quickstart_copy(tmp_path, "quickstart.client_app:app")
    run = flower.submit_run(
        superlink.connection,
        app,
        run_config={"algorithm": "scaffold", "num-server-rounds": 2},
        federation_config={"num-supernodes": 2, "client-resources-num-cpus": 1},
        stream=False,
        timeout=120,
    )
    status = flower.wait_for_run(run.run_id, superlink.connection, timeout=240)
    log = flower.run_log(run.run_id, superlink.connection)
    assert status == STATUS_FAILED, log
    assert "RoutineMissingError" in log and "train_client" in log, log


def test_flwr_run_runs_the_shipped_copy_even_where_bouquet_is_installed(
    flower, superlink, app_dir, tmp_path
):
    # Bouquet is installed (editable) in this environment under the name
    # `bouquet`; a changed copy of the app must run its own code.
    app = tmp_path / "changed_app"
    shutil.copytree(
        app_dir,
        app,
        ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "results"),
    )
    module = app / "strategies" / "fedavg.py"
    module.write_text(
        module.read_text()
        + "\nfrom logging import WARNING as _W\n"
        + "from flwr.supercore import log as _log\n"
        + '_log(_W, "shipped copy: %s", __file__)\n'
    )
    run = flower.submit_run(
        superlink.connection,
        app,
        run_config={
            "algorithm": "fedavg",
            "num-server-rounds": 1,
            "output-dir": str(tmp_path),
        },
        federation_config={"num-supernodes": 2, "client-resources-num-cpus": 1},
        timeout=300,
    )
    status = flower.wait_for_run(run.run_id, superlink.connection, timeout=60)
    log = flower.run_log(run.run_id, superlink.connection)
    assert status == STATUS_COMPLETED, log
    assert "shipped copy: " in log, log
