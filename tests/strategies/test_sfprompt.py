"""SFPrompt's server: FedAvg on the prompts and classifier, split traffic summed."""

import json

import numpy as np
import pytest

from bouquet.clientapps.app import app as client_app
from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies.context import RoundContext
from bouquet.strategies.sfprompt import DOWNLINK_BYTES, KEPT, UPLINK_BYTES, SFPrompt
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire
from bouquet.tasks.arrays import array_record, npy_bytes


def test_the_round_totals_sum_the_clients_split_traffic():
    replies = [
        ClientReply(
            node=n,
            partition=n,
            num_examples=k,
            metrics={UPLINK_BYTES: up, DOWNLINK_BYTES: down, KEPT: float(k)},
            arrays={"w": np.zeros(1)},
        )
        for n, (k, up, down) in enumerate([(3, 10.0, 20.0), (5, 1.0, 2.0)])
    ]
    ctx = RoundContext(1, None, "train", (0, 1), (0, 1), {"w": np.zeros(1)}, {})
    totals = SFPrompt().train_metrics(replies, ctx)
    assert totals == {
        "sfprompt.split-bytes-total": 33.0,
        "sfprompt.kept-examples-total": 8.0,
    }


def test_a_prompt_run_sends_prompts_and_classifier_and_counts_the_split(tmp_path):
    config = {
        "algorithm": "sfprompt",
        "model": "vit-tiny",
        "dataset": "digits-shift",
        "peft": "prompt",
        "num-server-rounds": 1,
        "local-steps": 2,
        "batch-size": 16,
        "fraction-evaluate": 0.0,
        "plot": False,
        "output-dir": str(tmp_path),
    }
    result, path, _ = run_inprocess(config, num_nodes=2)
    names = sorted(result.arrays.keys())
    assert names == [
        "net.classifier.bias",
        "net.classifier.weight",
        "net.vit.embeddings.prompt",
    ]
    row = json.loads((path / "metrics.json").read_text())["rounds"][-1]
    assert row["train-replies"] == 2 and row["error-replies"] == 0, row
    # 2 nodes x 2 steps x 16 examples x (s, h, dL/dh, dL/ds) of 21 x 64 floats.
    assert row["train-sfprompt.split-bytes-total"] == 2 * 2 * 16 * 4 * 21 * 64 * 4


def _split_run(tmp_path, split, peft="prompt", client_app=None, **extra):
    config = {
        "algorithm": "sfprompt",
        "model": "vit-tiny",
        "dataset": "digits-shift",
        "peft": peft,
        "num-server-rounds": 1,
        "local-steps": 2,
        "batch-size": 16,
        "optimizer": "adam",  # its moments cross the split messages' state
        "lr": 0.01,
        "fraction-evaluate": 0.0,
        "plot": False,
        "output-dir": str(tmp_path / split),
        "sfprompt.split": split,
        **extra,
    }
    result, path, grid = run_inprocess(config, num_nodes=2, client_app=client_app)
    row = json.loads((path / "metrics.json").read_text())["rounds"][-1]
    return result, row, grid


def _npy_header(shape):
    return len(npy_bytes(np.zeros(shape, np.float32))) - 4 * int(np.prod(shape))


def test_the_split_as_messages_trains_as_the_simulated_split(tmp_path):
    simulated, sim_row, _ = _split_run(tmp_path, "simulated")
    messages, row, grid = _split_run(tmp_path, "messages")
    for name in simulated.arrays.keys():
        np.testing.assert_allclose(
            messages.arrays[name].numpy(), simulated.arrays[name].numpy(), atol=1e-6
        )
    for key in ("uplink-bytes", "downlink-bytes", "bytes-total"):
        assert (
            row[f"train-sfprompt.split-{key}"] == sim_row[f"train-sfprompt.split-{key}"]
        )
    assert row["train-loss"] == pytest.approx(sim_row["train-loss"], abs=1e-6)
    # Per node: begin, then per step tail and step, then the round's train message.
    types = [t for node, t in grid.calls if node == 1000]
    assert types == ["train.split"] * 5 + ["train"], types
    # What the exchange counted: the arrays twice down (begin, train) and once
    # up, and per step s and dL/dh up, h and dL/ds down (16 x 21 tokens x 64).
    arrays = sum(len(a.data) for a in messages.arrays.values())
    tensor = 16 * 21 * 64 * 4 + _npy_header((16, 21, 64))
    assert row["bytes-sent"] == 2 * (2 * arrays + 2 * 2 * tensor)
    assert row["bytes-received"] == 2 * (arrays + 2 * 2 * tensor)
    assert row["train-sfprompt.split-uplink-bytes"] == 2 * 2 * 16 * 21 * 64 * 4
    assert row["train-sfprompt.split-client-time"] > 0  # the nodes' split compute


def test_a_frozen_head_needs_no_gradient_exchange(tmp_path):
    simulated, sim_row, _ = _split_run(tmp_path, "simulated", peft="head")
    messages, row, grid = _split_run(tmp_path, "messages", peft="head")
    for name in simulated.arrays.keys():
        np.testing.assert_allclose(
            messages.arrays[name].numpy(), simulated.arrays[name].numpy(), atol=1e-6
        )
    # s up, h down (in the step message): no tail exchange, no gradients;
    # no prompt tokens (16 patches + the class token).
    assert [t for n, t in grid.calls if n == 1000] == ["train.split"] * 3 + ["train"]
    assert (
        row["train-sfprompt.split-bytes-total"]
        == sim_row["train-sfprompt.split-bytes-total"]
    )
    assert row["train-sfprompt.split-bytes-total"] == 2 * 2 * 2 * 16 * 17 * 64 * 4


def test_a_node_sending_bad_activations_leaves_the_split(tmp_path):
    def corrupting(msg, context):
        reply = client_app(msg, context)
        if context.node_id == 1000 and wire.SPLIT_TENSORS in reply.content:
            s = reply.content[wire.SPLIT_TENSORS]["s"].numpy().copy()
            s[0, 0, 0] = np.nan
            reply.content[wire.SPLIT_TENSORS] = array_record({"s": s})
        return reply

    _, row, grid = _split_run(tmp_path, "messages", client_app=corrupting)
    assert row["train-replies"] == 1 and row["train-dropped"] == 1, row
    assert "node 1000: 's' not finite" in row["drop-reasons"][0]
    assert (1000, "train") not in grid.calls


def test_the_split_as_messages_refuses_a_body_that_trains(tmp_path):
    with pytest.raises(ValueError, match="needs a frozen body"):
        _split_run(tmp_path, "messages", peft="bias")
