"""A real deployment on loopback: ``flower-superlink`` + two ``flower-supernode``.

Each SuperNode has its own ``FLWR_HOME``, ``--port`` and ``partition-id``;
every ClientApp call runs in a fresh ``flwr-clientapp`` process.
"""

import math

import pytest

from simulations.proctools import STATUS_COMPLETED, read_run_metrics

pytestmark = pytest.mark.slow

NODES = 2


@pytest.fixture(scope="module")
def deployment(flower):
    return flower.start_deployment(NODES)


def test_two_supernodes_complete_two_rounds(flower, deployment, app_dir, tmp_path):
    connection = deployment.superlink.connection
    run = flower.submit_run(
        connection,
        app_dir,
        run_config={
            "algorithm": "fedavg",
            "num-server-rounds": 2,
            "fraction-train": 1.0,
            "output-dir": str(tmp_path),
            # Every Grid round trip costs ~10 s here (3 s polls on both sides
            # and a fresh flwr-clientapp process per message), so federated
            # evaluation is left to the Ray test.
            "fraction-evaluate": 0.0,
        },
        timeout=300,
    )
    status = flower.wait_for_run(run.run_id, connection, timeout=60)
    assert status == STATUS_COMPLETED, run.output
    rows, _ = read_run_metrics(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["train-replies"] == NODES and row["train-dropped"] == 0, row
        assert not row["update-skipped"], row
    assert all(math.isfinite(r["central-accuracy"]) for r in rows), rows
    assert all(p.running() for p in deployment.supernodes), "a SuperNode died"
