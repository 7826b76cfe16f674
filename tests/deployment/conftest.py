"""Fixtures for the real-process tests: Flower processes that cannot leak.

Every test module gets one :class:`~simulations.processes.FlowerProcesses`
(module scope): whatever it starts is stopped when the module ends, even when
a test fails, and a failed test shows the tail of every process's log. Set
``BOUQUET_APP_DIR`` to run the tests against another checkout of the app.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bouquet.simulations.processes import FlowerProcesses
from bouquet.simulations.proctools import APP_DIR, STATUS_COMPLETED, read_run_metrics


@pytest.fixture(scope="module")
def app_dir() -> Path:
    return Path(os.environ.get("BOUQUET_APP_DIR", APP_DIR)).resolve()


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    procs = FlowerProcesses(tmp_path_factory.mktemp("flower"))
    with procs:
        yield procs
    leftovers = procs.leftover_pids()
    assert not leftovers, f"Flower processes left running: {sorted(leftovers)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, FlowerProcesses):
                report.sections.append(("Flower process logs", value.logs()))


NODES = 2
"""SuperNodes of the SuperLink test files' deployments."""


def run_on_supernodes(flower, deployment, app_dir, tmp_path, run_config: dict) -> list:
    """Submit one run, wait until it completed, return its metrics rows."""
    connection = deployment.superlink.connection
    run = flower.submit_run(
        connection,
        app_dir,
        run_config={**run_config, "output-dir": str(tmp_path)},
        timeout=300,
    )
    status = flower.wait_for_run(run.run_id, connection, timeout=60)
    assert status == STATUS_COMPLETED, run.output
    rows, _ = read_run_metrics(tmp_path)
    return rows
