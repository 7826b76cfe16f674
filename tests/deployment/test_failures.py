"""Failures in a real deployment on loopback (issue #4, failure handling 2 and 4).

- The ServerApp process is killed after round k; a resume that would change
  the run config fails and names the key with both values; a new run with
  only ``resume`` gets the saved config back (rounds, evaluation off,
  algorithm, seed: on the server and on the nodes) and ends with the arrays of
  an uninterrupted run (computed in-process: same seed, same partitions).
- A SuperNode is killed in the middle of a round; the run completes with the
  remaining nodes (``min-train-nodes`` respected, and ``min-available-nodes``
  no longer reachable does not stop it) and the log says which node was lost.

Both wait on events, not on time: the metrics file for round k, the killed
node's ClientApp process for "mid-round"; the timeouts are only upper bounds,
large enough for a loaded machine.
"""

import os
import signal
import time

import numpy as np
import pytest

from bouquet.simulations.inprocess import run_inprocess
from bouquet.simulations.proctools import (
    STATUS_COMPLETED,
    STATUS_FAILED,
    descendants,
    read_run_metrics,
    signal_pid,
)
from bouquet.strategies.state import load_state

pytestmark = pytest.mark.slow

NODES = 3


@pytest.fixture(scope="module")
def deployment(flower):
    return flower.start_deployment(NODES)


def _wait_for_round(output_dir, round_: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows, _ = read_run_metrics(output_dir)
        except (FileNotFoundError, ValueError):
            rows = []
        if rows and rows[-1]["round"] >= round_:
            return
        time.sleep(0.2)
    raise TimeoutError(f"round {round_} not reached in {timeout:.0f}s")


def test_serverapp_killed_then_resumed_matches_uninterrupted(
    flower, deployment, app_dir, tmp_path
):
    connection = deployment.superlink.connection
    config = {
        "algorithm": "fedavgm",  # server momentum: state that resume must carry
        "num-server-rounds": 4,
        "fraction-evaluate": 0.0,
        "min-available-nodes": NODES,
        "local-epochs": 1,
        "seed": 5,
    }
    out = tmp_path / "deployed"
    first = flower.submit_run(
        connection,
        app_dir,
        run_config={**config, "output-dir": str(out)},
        stream=False,
    )
    _wait_for_round(out, 2)
    servers = flower.pids_of("flwr-serverapp")
    assert servers, "no ServerApp process found"
    for pid in servers:
        os.kill(pid, signal.SIGKILL)
    status = flower.wait_for_run(first.run_id, connection, timeout=120)
    assert status != STATUS_COMPLETED
    rows, run_dir = read_run_metrics(out)
    killed_after = rows[-1]["round"]
    assert 2 <= killed_after < 4

    changed = flower.submit_run(
        connection,
        app_dir,
        run_config={"resume": str(run_dir), "seed": 6},
        timeout=300,
        check=False,
    )
    assert changed.status == STATUS_FAILED
    assert "seed: 5 in the run, 6 now" in changed.output, changed.output
    assert read_run_metrics(out)[0] == rows  # nothing was written

    # Only the run directory: the saved config comes back (not 10 rounds of
    # the default algorithm with evaluation on and seed 42).
    second = flower.submit_run(
        connection, app_dir, run_config={"resume": str(run_dir)}, timeout=600
    )
    assert second.status == STATUS_COMPLETED
    assert "num-server-rounds = 4" in second.output, second.output
    rows, _ = read_run_metrics(out)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4][: len(rows)]
    assert rows[-1]["round"] == 4
    assert all(r["client-accuracy"] is None for r in rows)  # evaluation stays off
    resumed = load_state(run_dir / "checkpoint")

    reference, _, _ = run_inprocess(
        {**config, "output-dir": str(tmp_path / "reference")}, num_nodes=NODES
    )
    assert resumed.round == 4
    for key, value in reference.arrays.items():
        # flwr-clientapp processes use torch's default thread count, the
        # in-process reference one thread: last-bit differences only.
        np.testing.assert_allclose(
            resumed.arrays[key], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=key
        )


def _clientapps_under(flower, pid: int) -> list[int]:
    tree = descendants([pid])
    return [p for p in flower.pids_of("flwr-clientapp") if p in tree]


def test_supernode_killed_mid_round_run_completes(
    flower, deployment, app_dir, tmp_path
):
    connection = deployment.superlink.connection
    run = flower.submit_run(
        connection,
        app_dir,
        run_config={
            "num-server-rounds": 2,
            "fraction-evaluate": 0.0,
            "min-available-nodes": NODES,
            "min-train-nodes": NODES - 1,
            # The SuperLink drops a node 2 missed heartbeats (at most 60 s)
            # after its last one and answers its pending message with an
            # error: round 1 ends then, not at round-timeout. The long
            # round-timeout is for the survivors on a loaded machine (their
            # ClientApps can take minutes to start). Round 2 starts without
            # the lost node: 2 of the 3 min-available nodes. It waits
            # node-wait-timeout for the third, then goes on with them
            # (Flower's sampler waits for ever).
            "round-timeout": 600.0,
            "node-wait-timeout": 5.0,
            "output-dir": str(tmp_path),
        },
        stream=False,
    )
    victim = deployment.supernodes[-1]
    # Mid-round: the victim has its round-1 train message (a flwr-clientapp
    # process runs under it), whatever the load.
    deadline = time.monotonic() + 600
    while not _clientapps_under(flower, victim.pid):
        assert time.monotonic() < deadline, "the victim never got a message"
        status = flower.run_status(run.run_id, connection)
        assert not status.startswith("finished"), flower.run_log(run.run_id, connection)
        time.sleep(0.2)
    tree = descendants([victim.pid])
    os.killpg(victim.pid, signal.SIGKILL)
    for pid in tree:  # its superexec and ClientApp live in their own sessions
        signal_pid(pid, signal.SIGKILL)
    assert flower.wait_for_run(run.run_id, connection, timeout=900) == (
        STATUS_COMPLETED
    ), flower.run_log(run.run_id, connection)
    rows, _ = read_run_metrics(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["train-replies"] == NODES - 1 and not row["update-skipped"], row
    lost = rows[1]["train-missing"] + rows[1]["error-replies"]
    assert lost == 1, rows[1]
    log = flower.run_log(run.run_id, connection)
    assert "no train reply from node(s)" in log or "Dropped reply from node" in log
    assert "fewer than min_available_nodes=3; going on with them" in log
