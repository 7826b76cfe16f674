"""A real deployment on loopback: ``flower-superlink`` + two ``flower-supernode``.

Each SuperNode has its own ``FLWR_HOME``, ``--port`` and ``partition-id``;
every ClientApp call runs in a fresh ``flwr-clientapp`` process.
"""

import math

import pytest

from bouquet.simulations.proctools import STATUS_COMPLETED, read_run_metrics

pytestmark = pytest.mark.slow

NODES = 2


@pytest.fixture(scope="module")
def deployment(flower):
    return flower.start_deployment(NODES)


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


def test_two_supernodes_complete_two_rounds(flower, deployment, app_dir, tmp_path):
    rows = run_on_supernodes(
        flower,
        deployment,
        app_dir,
        tmp_path,
        {
            "algorithm": "fedavg",
            "num-server-rounds": 2,
            "fraction-train": 1.0,
            # Every Grid round trip costs ~10 s here (3 s polls on both sides
            # and a fresh flwr-clientapp process per message), so federated
            # evaluation is left to the Ray test.
            "fraction-evaluate": 0.0,
        },
    )
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["train-replies"] == NODES and row["train-dropped"] == 0, row
        assert not row["update-skipped"], row
    assert all(math.isfinite(r["central-accuracy"]) for r in rows), rows
    assert all(p.running() for p in deployment.supernodes), "a SuperNode died"


def test_async_run_with_different_simulated_speeds(
    flower, deployment, app_dir, tmp_path
):
    """FedAsync on two SuperNodes whose simulated step times are 1.0 and 0.25.

    Tasks take 5 and 1.25 simulated time units: the fast node's replies make
    versions 1-3 (t = 1.25, 2.5, 3.75, staleness 0); at t = 5 both are due,
    the slow node's task (sent first) makes version 4 with staleness 3, then
    the fast one version 5 with staleness 1. This holds whatever order the
    replies reach the SuperLink in (virtual clock).
    """
    rows = run_on_supernodes(
        flower,
        deployment,
        app_dir,
        tmp_path,
        {
            "algorithm": "fedasync",
            "num-server-rounds": 5,
            "local-steps": 5,
            "device-speeds": "linear",
            "device-speed-ratio": 4.0,
        },
    )
    trained = rows[1:]
    assert [r["round"] for r in trained] == [1, 2, 3, 4, 5]
    assert [r["sim-time"] for r in trained] == pytest.approx([1.25, 2.5, 3.75, 5, 5])
    assert [r["staleness-max"] for r in trained] == [0, 0, 0, 3, 1]
    assert all(r["train-dropped"] == 0 and r["error-replies"] == 0 for r in trained)


def test_gossip_nodes_keep_their_models_across_calls(
    flower, deployment, app_dir, tmp_path
):
    """D-PSGD on SuperNodes: each node's model lives in its Context.state.

    Every ClientApp call runs in a fresh process, so round 2 can only start
    from the node's own model (and its neighbour's, relayed) if the state
    survived between calls on the SuperNode.
    """
    rows = run_on_supernodes(
        flower,
        deployment,
        app_dir,
        tmp_path,
        {
            "algorithm": "dpsgd",
            "num-server-rounds": 2,
            "local-steps": 20,
            "fraction-evaluate": 0.0,
        },
    )
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["train-replies"] == NODES and row["error-replies"] == 0, row
        assert row["train-consensus-distance"] >= 0, row
    # Round 2 starts from each node's trained model (its state): its first
    # loss is below round 1's, which started from the initial model (the
    # in-process runner measures 2.316 and 2.007 on this config).
    first = [r["train-train-loss-first"] for r in rows[1:]]
    assert first[1] < first[0] - 0.05, first


def test_fine_tuning_sends_only_the_trainable_entries(
    flower, deployment, app_dir, tmp_path
):
    """FedPEFT (bias) on a pretrained MLP, on SuperNodes.

    Each SuperNode's fresh ClientApp process builds the same backbone (the
    frozen digest matches) and replies with the biases and the head only.
    """
    rows = run_on_supernodes(
        flower,
        deployment,
        app_dir,
        tmp_path,
        {
            "algorithm": "fedpeft",
            "dataset": "digits-shift",
            "pretrained": "source",
            "pretrain-epochs": 2,
            "num-server-rounds": 1,
            "local-steps": 3,
            "fraction-evaluate": 0.0,
        },
    )
    row = rows[1]
    assert row["train-replies"] == NODES and row["error-replies"] == 0, row
    # mlp on 8x8 digits: 17,226 floats; biases and head: 128 + 64 + 650 = 842.
    assert row["bytes-received"] < NODES * 842 * 4 * 2, row


def test_composed_run_fedld_dp_sgd_sign_flip_topk(
    flower, deployment, app_dir, tmp_path
):
    """Issue #23's composed run on SuperNodes, all through run-config keys.

    FedLD with DP-SGD on every node (its own accountant in ``Context.state``,
    which each fresh ClientApp process reads), one sign-flip attacker of two,
    and a top-k uplink with error feedback.
    """
    rows = run_on_supernodes(
        flower,
        deployment,
        app_dir,
        tmp_path,
        {
            "algorithm": "fedld",
            "num-server-rounds": 2,
            "local-steps": 3,
            "fraction-evaluate": 0.0,
            "dp-sgd-epsilon": 4.0,
            "attack": "sign-flip",
            "attack-fraction": 0.5,
            "compressor": "topk",
            "compressor-k": 1000,
            "error-feedback": True,
        },
    )
    for row in rows[1:]:
        assert row["train-replies"] == NODES and row["error-replies"] == 0, row
        # mlp on 8x8 digits: 17,226 floats a model; top-k sends 1,000 pairs.
        assert row["bytes-received"] < NODES * 17_226 * 4 / 4, row
    spent = [r["train-dp-sgd.epsilon"] for r in rows[1:]]
    assert 0 < spent[0] < spent[1] <= 4.0, spent


def test_sfprompt_split_as_messages_on_supernodes(
    flower, deployment, app_dir, tmp_path
):
    """SFPrompt with ``split='messages'``: the body runs in the ServerApp.

    One step: ``begin``, ``tail``, ``step`` (``train.split`` messages) and the
    round's train message, each in a fresh ``flwr-clientapp`` process, so the
    node's split progress can only come from its Context.state.
    """
    rows = run_on_supernodes(
        flower,
        deployment,
        app_dir,
        tmp_path,
        {
            "algorithm": "sfprompt",
            "sfprompt.split": "messages",
            "model": "vit-tiny",
            "dataset": "digits-shift",
            "peft": "prompt",
            "num-server-rounds": 1,
            "local-steps": 1,
            "batch-size": 16,
            "fraction-evaluate": 0.0,
        },
    )
    row = rows[1]
    assert row["train-replies"] == NODES and row["train-dropped"] == 0, row
    assert row["error-replies"] == 0 and row["train-missing"] == 0, row
    # Per node, s and dL/dh of one batch up: 16 examples x 21 tokens x 64 floats.
    assert row["train-sfprompt.split-uplink-bytes"] == 2 * 16 * 21 * 64 * 4, row
    assert row["bytes-received"] > NODES * 2 * 16 * 21 * 64 * 4, row
    assert row["train-sfprompt.split-client-time"] > 0, row
