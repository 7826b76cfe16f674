"""TLS + SuperNode authentication on loopback (issue #4, failure handling 1).

The certificates and keys come from the scripts the deployment guide tells
users to run (``simulations/deploy/generate-*.sh``); the SuperLink requires
HTTPS and registered SuperNode keys; two registered SuperNodes complete two
rounds; a SuperNode whose key was never registered is refused.
"""

import math
import subprocess

import pytest

from simulations.processes import (
    STATUS_COMPLETED,
    TlsFiles,
    generate_node_keys,
    read_run_metrics,
)

pytestmark = pytest.mark.slow

NODES = 2


@pytest.fixture(scope="module")
def secure(flower, tmp_path_factory):
    secrets = tmp_path_factory.mktemp("secrets")
    tls = TlsFiles.generate(secrets / "tls")
    keys = generate_node_keys(secrets / "keys", NODES + 1)
    deployment = flower.start_deployment(
        NODES, "secure", tls=tls, node_keys=keys[:NODES]
    )
    return deployment, keys[NODES]


def test_certificate_is_signed_by_the_ca(secure):
    deployment, _ = secure
    tls = deployment.superlink.tls
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tls.ca), str(tls.cert)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0 and "OK" in check.stdout


def test_unregistered_supernode_is_refused(flower, secure):
    deployment, rogue_key = secure
    rogue = flower.start_supernode(
        deployment.superlink,
        "rogue",
        {"partition-id": 0, "num-partitions": NODES},
        private_key=rogue_key,
        max_retries=1,
    )
    assert rogue.popen.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in rogue.log_tail()


def test_tls_and_authenticated_nodes_complete_two_rounds(
    flower, secure, app_dir, tmp_path
):
    deployment, _ = secure
    connection = deployment.superlink.connection
    run = flower.submit_run(
        connection,
        app_dir,
        run_config={
            "num-server-rounds": 2,
            "fraction-evaluate": 0.0,
            "output-dir": str(tmp_path),
        },
        timeout=300,
    )
    assert flower.wait_for_run(run.run_id, connection, timeout=60) == STATUS_COMPLETED
    rows, _ = read_run_metrics(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["train-replies"] == NODES for r in rows[1:]), rows
    assert all(math.isfinite(r["central-accuracy"]) for r in rows)
    listed = flower.flwr("supernode", "ls", connection, "--format", "json").stdout
    assert listed.count('"online"') == NODES, listed
