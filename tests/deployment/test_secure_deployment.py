"""TLS + SuperNode authentication on loopback (issue #4, failure handling 1; #16).

The certificates and keys come from the scripts the deployment guide tells
users to run (``simulations/deploy/generate-*.sh``); the SuperLink requires
HTTPS and registered SuperNode keys and runs behind the admin guard, as
``start-superlink.sh`` starts it; two registered SuperNodes complete two
rounds; a SuperNode whose key was never registered is refused.

Who may register nodes: the SuperLink here binds every interface, like a
server that devices reach over the network. Requests to its Control API that
arrive from this machine's non-loopback address (a real TCP peer address that
is not loopback, the only thing the SuperLink can judge a client by) are
refused, so ``flwr supernode register`` from there fails and registers
nothing, while a SuperNode reaching the Fleet API at that same address comes
online. Over loopback, registration works. Not covered: traffic from other
machines (the SuperLink sees it the same way: by its source address).
"""

import math
import re
import subprocess
import time

import pytest

from bouquet.simulations.proctools import (
    HOST,
    STATUS_COMPLETED,
    TlsFiles,
    generate_node_keys,
    non_loopback_address,
    read_run_metrics,
)

pytestmark = pytest.mark.slow

NODES = 2
OUTSIDE = non_loopback_address()


@pytest.fixture(scope="module")
def secure(flower, tmp_path_factory):
    secrets = tmp_path_factory.mktemp("secrets")
    tls = TlsFiles.generate(secrets / "tls", [OUTSIDE] if OUTSIDE else [])
    keys = generate_node_keys(secrets / "keys", NODES + 2)
    deployment = flower.start_deployment(
        NODES,
        "secure",
        tls=tls,
        node_keys=keys[:NODES],
        host="0.0.0.0" if OUTSIDE else HOST,
    )
    if OUTSIDE:
        port = deployment.superlink.port
        flower.add_connection("outside", f"{OUTSIDE}:{port}", tls.ca)
    return deployment, keys[NODES], keys[NODES + 1]


def test_certificate_is_signed_by_the_ca(secure):
    deployment, _, _ = secure
    tls = deployment.superlink.tls
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tls.ca), str(tls.cert)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0 and "OK" in check.stdout


def test_unregistered_supernode_is_refused(flower, secure):
    deployment, rogue_key, _ = secure
    rogue = flower.start_supernode(
        deployment.superlink,
        "rogue",
        {"partition-id": 0, "num-partitions": NODES},
        private_key=rogue_key,
        max_retries=1,
    )
    # Flower logs "Exit Code: 305" and the process exits with status 1.
    assert rogue.popen.wait(timeout=120) == 1
    assert "Failed to activate SuperNode" in rogue.log_tail()
    assert "Exit Code: 305" in rogue.log_tail()


@pytest.mark.skipif(OUTSIDE is None, reason="no non-loopback address")
def test_registration_from_a_non_loopback_address_is_refused(flower, secure):
    deployment, _, outsider = secure
    before = {n["node-id"] for n in flower.supernodes("secure")}
    refused = flower.flwr(
        "supernode", "register", f"{outsider}.pub", "outside", check=False
    )
    assert refused.returncode != 0, refused.stdout
    assert {n["node-id"] for n in flower.supernodes("secure")} == before
    listing = flower.flwr("ls", "outside", check=False)  # the whole Control API
    assert listing.returncode != 0, listing.stdout
    # The guard answered 403, in the SuperLink's access log with the peer address.
    log = deployment.superlink.process.log_tail(200_000)
    assert re.search(rf'{OUTSIDE}:\d+ - "POST /v1/control/\S+ HTTP/[\d.]+" 403', log)


def test_tls_and_authenticated_nodes_complete_two_rounds(
    flower, secure, app_dir, tmp_path
):
    deployment, _, _ = secure
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
    assert run.status == STATUS_COMPLETED
    rows, _ = read_run_metrics(tmp_path)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["train-replies"] == NODES for r in rows[1:]), rows
    assert all(math.isfinite(r["central-accuracy"]) for r in rows)
    listed = flower.flwr("supernode", "ls", connection, "--format", "json").stdout
    assert listed.count('"online"') == NODES, listed


@pytest.mark.skipif(OUTSIDE is None, reason="no non-loopback address")
def test_a_node_registered_on_loopback_joins_from_a_non_loopback_address(
    flower, secure
):
    deployment, _, outsider = secure
    flower.register_supernode(deployment.superlink, outsider)
    node = flower.start_supernode(
        deployment.superlink,
        "outsider",
        {"partition-id": 0, "num-partitions": NODES},
        private_key=outsider,
        address=f"{OUTSIDE}:{deployment.superlink.port}",
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        online = [n for n in flower.supernodes("secure") if n["status"] == "online"]
        if len(online) == NODES + 1:
            break
        assert node.running(), node.log_tail()
        time.sleep(1)
    assert len(online) == NODES + 1, flower.supernodes("secure")
