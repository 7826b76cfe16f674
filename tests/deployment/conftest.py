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
from bouquet.simulations.proctools import APP_DIR


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
