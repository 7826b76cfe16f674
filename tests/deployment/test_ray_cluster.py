"""A Bouquet simulation attached to an existing two-node Ray cluster (issue #8).

The test starts a Ray head and one worker node on loopback. The worker runs
from a neutral directory in a Python environment that has every dependency
but not Bouquet (a venv that sees the test venv's site-packages as a plain
path, so no editable install of Bouquet is active). Two simulation SuperLinks
attach with ``RAY_ADDRESS``:

- with ``simulations.ray_cluster.strip_bouquet_paths`` (nothing shipped, no
  path to the code forwarded) the worker node's ClientApp calls fail, and the
  run's results count the error replies instead of hiding them behind a
  completed status;
- with ``simulations.ray_cluster.ship_bouquet`` (the code shipped as Ray
  ``py_modules``) ClientApp actors run on both nodes and no reply is an error.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from bouquet.simulations.processes import FlowerProcesses
from bouquet.simulations.proctools import (
    APP_DIR,
    STATUS_COMPLETED,
    Poll,
    all_pids,
    free_ports,
    read_run_metrics,
)

pytestmark = pytest.mark.slow

NODE_TAG = "BOUQUET_RAY_NODE"


def _worker_python(root: Path) -> Path:
    """A venv with the test venv's packages on its path, Bouquet not importable."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(root)], check=True)
    purelib = sysconfig.get_paths()["purelib"]
    site = next(root.glob("lib/python*/site-packages"))
    (site / "test-venv.pth").write_text(purelib + "\n")
    python = root / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import ray, flwr, torch; import clientapps"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert "No module named 'clientapps'" in probe.stderr, probe.stderr
    return python


class ActorWatch(Poll):
    """Records which Ray node (by environment tag) ran ClientAppActor processes."""

    def __init__(self) -> None:
        super().__init__(self._sample)
        self.nodes: set[str] = set()

    def _sample(self) -> None:
        for pid in all_pids():
            try:
                if b"ClientAppActor" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in environ:
                if item.startswith(f"{NODE_TAG}=".encode()):
                    self.nodes.add(item.split(b"=", 1)[1].decode())


@pytest.fixture(scope="module")
def cluster(flower, tmp_path_factory):
    port, client_port = free_ports(2)

    def private_ports() -> list[str]:
        # Ray's defaults (52365, 10001, ...) are shared by everything on the
        # machine; each node of this cluster gets its own.
        names = (
            "node-manager",
            "object-manager",
            "dashboard-agent-listen",
            "dashboard-agent-grpc",
            "runtime-env-agent",
            "metrics-export",
        )
        ports = free_ports(len(names))
        return [
            x
            for n, p in zip(names, ports, strict=True)
            for x in (f"--{n}-port", str(p))
        ]

    address = f"127.0.0.1:{port}"
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start"]
    common = ["--num-cpus", "1", "--disable-usage-stats", "--block"]
    head = [
        "--head",
        "--port",
        str(port),
        "--ray-client-server-port",
        str(client_port),
        "--include-dashboard=false",
    ]
    flower.start(
        "ray-head",
        [*ray, *head, *private_ports(), *common],
        env={NODE_TAG: "head", "RAY_ADDRESS": ""},
    )
    python = _worker_python(tmp_path_factory.mktemp("worker-venv"))
    flower.start(
        "ray-worker",
        [str(python), *ray[1:], "--address", address, *private_ports(), *common],
        env={NODE_TAG: "worker", "RAY_ADDRESS": "", "PYTHONPATH": ""},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "ray.scripts.scripts",
                "status",
                "--address",
                address,
            ],
            capture_output=True,
            text=True,
        ).stdout
        if status.count("node_") >= 2:
            return address
        time.sleep(1)
    pytest.fail(f"Ray cluster did not reach two nodes:\n{flower.logs()}")


def _attached_run(workdir: Path, address: str, hook: str, out: Path):
    env = {"RAY_ADDRESS": address, "RAY_RUNTIME_ENV_HOOK": hook}
    with FlowerProcesses(workdir, env=env) as procs, ActorWatch() as watch:
        link = procs.start_simulation_superlink()
        run = procs.submit_run(
            link.connection,
            APP_DIR,
            run_config={
                "num-server-rounds": 2,
                "fraction-evaluate": 0.0,
                "min-train-nodes": 1,
                "output-dir": str(out),
            },
            # No init-args-* keys: Ray refuses them when attaching to a cluster.
            federation_config={"num-supernodes": 4, "client-resources-num-cpus": 1},
            timeout=400,
        )
        status = procs.wait_for_run(run.run_id, link.connection, timeout=60)
    rows, _ = read_run_metrics(out)
    return status, rows, watch.nodes, run.output


def test_workers_without_the_code_fail_visibly(cluster, tmp_path):
    status, rows, _, output = _attached_run(
        tmp_path / "procs",
        cluster,
        "bouquet.simulations.ray_cluster.strip_bouquet_paths",
        tmp_path / "out",
    )
    assert status == STATUS_COMPLETED  # Flower's status hides the failures ...
    errors = sum(r["error-replies"] for r in rows[1:])
    assert errors > 0, rows  # ... Bouquet's results count them
    assert "ModuleNotFoundError" in " ".join(
        " ".join(r.get("drop-reasons", [])) for r in rows
    )
    assert "error replies" in output


def test_shipped_code_runs_on_both_nodes_without_errors(cluster, tmp_path):
    status, rows, nodes, output = _attached_run(
        tmp_path / "procs",
        cluster,
        "bouquet.simulations.ray_cluster.ship_bouquet",
        tmp_path / "out",
    )
    assert status == STATUS_COMPLETED, output
    assert nodes == {"head", "worker"}, nodes
    for row in rows[1:]:
        assert row["error-replies"] == 0 and row["train-replies"] == 4, row
