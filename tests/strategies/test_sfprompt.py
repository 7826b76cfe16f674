"""SFPrompt's server: FedAvg on the prompts and classifier, split traffic summed."""

import json

import numpy as np

from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies.context import RoundContext
from bouquet.strategies.sfprompt import DOWNLINK_BYTES, KEPT, UPLINK_BYTES, SFPrompt
from bouquet.strategies.validation import ClientReply


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
