"""Families' mechanisms on a real deployment: fine-tuning, DP-SGD, split learning.

The same setup as ``test_superlink.py`` (``flower-superlink`` + two
``flower-supernode`` on loopback, a fresh ``flwr-clientapp`` process per
message), in its own file so that pytest-xdist runs it beside that one.
"""

import pytest

from tests.deployment.conftest import NODES, run_on_supernodes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(flower):
    return flower.start_deployment(NODES)


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
