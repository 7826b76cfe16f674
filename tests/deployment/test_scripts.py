"""The deployment scripts themselves, on loopback (issue #16).

``start-superlink.sh`` / ``start-supernodes.sh`` / ``stop.sh`` / ``run.sh`` as
docs/deploy.md runs them (insecure demo, state in a temporary folder): the
SuperLink binds loopback and runs behind the admin guard; ``run.sh`` turns a
failed run into exit code 1 with its status; one SuperNode is restarted by
index while the other keeps running; a restarted SuperLink appends to its log;
``stop.sh`` returns only when every process it started is gone, Flower's
superexec processes included. Started with the ``flower`` fixture's
environment, so whatever a failing test leaves behind carries its tag and is
killed at the end of the module.
"""

import socket
import subprocess
import time

import pytest

from bouquet.simulations.proctools import (
    APP_DIR,
    DEPLOY_SCRIPTS,
    descendants,
    free_port,
    is_alive,
    wait_for_health,
)

pytestmark = pytest.mark.slow

NODES = 2


def _script(flower, name, *args, timeout=120, check=True):
    done = subprocess.run(
        ["bash", str(DEPLOY_SCRIPTS / name), *map(str, args)],
        env=flower.env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{name} failed:\n{done.stdout}\n{done.stderr}")
    return done


def _consecutive_free_ports(count):
    while True:
        first = free_port()
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                sockets.append(sock)
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()


def _pid(path):
    return int(path.read_text().split()[0])


@pytest.fixture(scope="module")
def scripted(flower, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    port = free_port()
    try:
        _script(flower, "start-superlink.sh", "--port", port, "--state", state)
        wait_for_health(port, 90)
        first = _consecutive_free_ports(NODES)
        _script(
            flower,
            "start-supernodes.sh",
            NODES,
            f"127.0.0.1:{port}",
            "--first-port",
            first,
            "--state",
            state,
        )
        flower.add_connection("scripts", f"127.0.0.1:{port}")
        yield state, port, first
    finally:
        _script(flower, "stop.sh", "--state", state, check=False)


def test_superlink_binds_loopback_behind_the_guard(scripted):
    state, port, _ = scripted
    pid = _pid(state / "superlink.pid")
    argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    assert any(a.endswith(b"admin_guard.py") for a in argv), argv
    assert argv[argv.index(b"--host") + 1] == b"127.0.0.1"
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True)
    if listening.returncode == 0:
        local = [line.split()[3] for line in listening.stdout.splitlines()]
        assert f"127.0.0.1:{port}" in local and f"0.0.0.0:{port}" not in local


def test_run_sh_reports_a_failed_run(flower, scripted):
    missing = "/nonexistent/bouquet-run"
    done = _script(
        flower,
        "run.sh",
        APP_DIR,
        "scripts",
        "--run-config",
        f"resume='{missing}'",
        timeout=300,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ended finished:failed" in done.stderr, done.stderr
    assert "flwr log" in done.stderr


def test_one_supernode_restarts_by_index(flower, scripted):
    state, port, first = scripted
    deadline = time.monotonic() + 120
    while len(flower.supernodes("scripts")) < NODES and time.monotonic() < deadline:
        time.sleep(1)
    keep, old = (
        _pid(state / "supernode-0/supernode.pid"),
        _pid(state / "supernode-1/supernode.pid"),
    )
    args = [NODES, f"127.0.0.1:{port}", "--first-port", first, "--state", state]
    _script(flower, "start-supernodes.sh", *args, "--only", 1)
    new = _pid(state / "supernode-1/supernode.pid")
    assert new != old and is_alive(new) and not is_alive(old) and is_alive(keep)
    log = (state / "supernode-1/supernode.log").read_text()
    assert log.count("===== ") == 2  # appended, not overwritten
    bad = _script(flower, "start-supernodes.sh", *args, "--only", NODES, check=False)
    assert bad.returncode == 2 and "not a SuperNode index" in bad.stderr


def test_stop_leaves_nothing_and_a_restarted_superlink_appends_its_log(
    flower, scripted
):
    state, port, _ = scripted
    leaders = [_pid(state / "superlink.pid")] + [
        _pid(state / f"supernode-{i}/supernode.pid") for i in range(NODES)
    ]
    tree = set(leaders) | descendants(leaders)
    assert len(tree) > len(leaders)  # the superexec processes
    start = time.monotonic()
    _script(flower, "stop.sh", "--state", state, timeout=120)
    assert not [pid for pid in tree if is_alive(pid)]
    assert time.monotonic() - start < 60
    assert not (state / "superlink.pid").exists()

    _script(flower, "start-superlink.sh", "--port", port, "--state", state)
    wait_for_health(port, 90)
    again = _script(
        flower, "start-superlink.sh", "--port", port, "--state", state, check=False
    )
    assert again.returncode == 1 and "is running" in again.stderr
    log = (state / "superlink/superlink.log").read_text()
    assert log.count("===== ") == 2 and "Starting Flower SuperLink" in log
    _script(flower, "stop.sh", "--state", state)
