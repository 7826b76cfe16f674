"""The causal-LM path: the generated corpus, gpt2-tiny, per-token evaluation."""

import json
import math

import numpy as np
import pytest
import torch

from bouquet.simulations.inprocess import run_inprocess
from bouquet.tasks.catalog import EMBEDDED
from bouquet.tasks.evaluation import evaluate_model
from bouquet.tasks.finetune import build_task_model
from bouquet.tasks.sources import source_task
from bouquet.tasks.text import CONTEXT, TOPICS, VOCAB, decode, encode, grammar_corpus

pytest.importorskip("transformers")
INFO = EMBEDDED["grammar-text"]


def test_the_corpus_is_fixed_and_its_targets_are_the_next_characters():
    a, b = grammar_corpus(), grammar_corpus()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    x, y = a["x"], a["label"]
    assert x.shape == y.shape and x.shape[1] == CONTEXT == INFO.input_shape[0]
    assert len(VOCAB) == INFO.num_classes
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # target t = input t + 1
    assert set(np.unique(a["topic"])) == set(range(len(TOPICS)))
    assert decode(encode("the cat .")) == "the cat ."
    # The source task (pretrained='source'): other sentences, two topics only.
    source_x, source_y = source_task("grammar-text")
    text = " ".join(decode(row) for row in source_x)
    assert "cat" in text and "bread" in text
    assert not any(word in text for word in ("sailor", "teacher"))
    np.testing.assert_array_equal(source_x[:, 1:], source_y[:, :-1])
    with pytest.raises(ValueError, match="'!'"):
        encode("hi!")


def test_sequence_evaluation_averages_over_tokens():
    # Logits (N, C, T): two sequences of two tokens, the last token wrong.
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[2.0, 2.0], [0.0, 0.0]]])
    y = torch.tensor([[0, 1], [0, 1]])

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return logits[x.long()] + self.w

    loss, accuracy = evaluate_model(Fixed(), torch.tensor([0.0, 1.0]), y)
    per_token = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert per_token.shape == (2, 2)
    assert loss == pytest.approx(float(per_token.mean()))
    assert accuracy == 0.75  # per token: 3 of 4, not per sequence


def test_gpt2_tiny_lora_adapts_the_fused_attention_and_the_head():
    model = build_task_model(
        {"model": "gpt2-tiny", "peft": "lora", "lora-rank": 2}, INFO
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [
        "net.transformer.h.0.attn.c_attn.lora_A.default.weight",
        "net.transformer.h.0.attn.c_attn.lora_B.default.weight",
        "net.transformer.h.1.attn.c_attn.lora_A.default.weight",
        "net.transformer.h.1.attn.c_attn.lora_B.default.weight",
        "net.lm_head.weight",
    ]
    ids = torch.randint(0, len(VOCAB), (3, CONTEXT)).float()
    assert model(ids).shape == (3, len(VOCAB), CONTEXT)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_fedavg_trains_the_language_model_and_reports_perplexity(peft, tmp_path):
    config = {
        "algorithm": "fedavg",
        "model": "gpt2-tiny",
        "dataset": "grammar-text",
        "peft": peft,
        "num-server-rounds": 1,
        "local-steps": 4,
        "optimizer": "adam",
        "lr": 0.003,
        "fraction-evaluate": 0.0,
        "plot": False,
        "output-dir": str(tmp_path),
    }
    _, path, _ = run_inprocess(config, num_nodes=2)
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    assert rows[-1]["train-replies"] == 2 and rows[-1]["error-replies"] == 0
    first, last = rows[0], rows[-1]
    assert first["central-perplexity"] == pytest.approx(math.exp(first["central-loss"]))
    assert last["central-perplexity"] < first["central-perplexity"]
