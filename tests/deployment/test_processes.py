"""The process helpers themselves: fast, no Flower process started."""

import sys
import time
import tomllib

import pytest

from bouquet.simulations.processes import FlowerProcesses
from bouquet.simulations.proctools import (
    free_ports,
    read_run_metrics,
    tagged_pids,
    toml_overrides,
    toml_value,
    write_connections,
)


def test_toml_overrides_are_parsed_back_by_flower():
    from flwr.common.config import parse_config_args

    values = {
        "algorithm": "fedavg",
        "lr": 0.1,
        "num-server-rounds": 3,
        "fedprox.proximal-mu": 1e-05,
        "resume": "",
        "use-x": True,
        "output-dir": "/tmp/a b/it's",
    }
    assert parse_config_args([toml_overrides(values)]) == values
    assert toml_value(2.0) == "2.0"
    with pytest.raises(TypeError):
        toml_value(None)


def test_connections_file(tmp_path):
    path = write_connections(tmp_path, {"sim": "127.0.0.1:1", "deploy": "127.0.0.1:2"})
    config = tomllib.loads(path.read_text())
    assert config["superlink"]["default"] == "sim"
    assert config["superlink"]["deploy"] == {"address": "127.0.0.1:2", "insecure": True}


def test_free_ports_are_distinct():
    ports = free_ports(5)
    assert len(set(ports)) == 5


def test_read_run_metrics_needs_exactly_one_run(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_run_metrics(tmp_path)
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "metrics.json").write_text('{"rounds": [{"round": 0}]}')
    rows, path = read_run_metrics(tmp_path)
    assert rows == [{"round": 0}] and path == tmp_path / "r1"


# A parent that ignores SIGTERM and starts a grandchild in its own session,
# escaping the process group: only the environment tag still finds it.
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                 start_new_session=True)
print("ready", flush=True)
time.sleep(600)
"""


def test_stop_all_kills_the_whole_tree(tmp_path):
    with FlowerProcesses(tmp_path, grace=0.5) as procs:
        proc = procs.start("stubborn", [sys.executable, "-c", STUBBORN])
        deadline = time.monotonic() + 20
        while len(tagged_pids(procs.tag)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(tagged_pids(procs.tag)) == 2, procs.logs()
        assert procs.env()["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert not procs.leftover_pids()
    assert not proc.running()
    assert "ready" in proc.log_tail()
