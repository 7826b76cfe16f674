"""Federated fine-tuning: only trainable entries travel, on an identical backbone."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from bouquet.clientapps import train_client
from bouquet.clientapps.bounds import ConfigError
from bouquet.simulations.inprocess import ensure_task_identity, give_id, run_inprocess
from bouquet.tasks import DataSpec, dataset_info, wire
from bouquet.tasks.finetune import (
    FROZEN_DIGEST,
    FineTuning,
    build_task_model,
    frozen_digest,
    frozen_names,
    pretrain_on_source,
)
from bouquet.tasks.sources import _digits_domains, _digits_halves, _digits_shift

DIGITS = dataset_info(DataSpec(dataset="digits-shift"))
MLP = {"model": "mlp", "dataset": "digits-shift", "seed": 3}


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match=r"'peft' must be one of .*got 'full'"):
        FineTuning.from_run_config({"peft": "full"})
    with pytest.raises(ValueError, match="'lora-rank' must be >= 1; got 0"):
        FineTuning.from_run_config({"lora-rank": 0})
    with pytest.raises(ValueError, match=r"'lora-freeze-a' must be bool.*got 'yes'"):
        FineTuning.from_run_config({"lora-freeze-a": "yes"})
    with pytest.raises(ValueError, match="ssf-top-k=2: expected <= ssf-pool-size=1"):
        FineTuning.from_run_config({"ssf-top-k": 2})
    assert FineTuning.from_run_config({"lora-freeze-a": "true"}).lora_freeze_a
    # One declaration: the dataclass's defaults are the params'.
    assert FineTuning.from_run_config({}) == FineTuning()


def test_each_method_trains_its_entries_and_freezes_the_rest():
    head = ["5.weight", "5.bias"]
    model = build_task_model({**MLP, "peft": "head"}, DIGITS)
    assert _trainable(model) == head
    assert frozen_names(model) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    model = build_task_model({**MLP, "peft": "bias"}, DIGITS)
    assert _trainable(model) == ["1.bias", "3.bias", *head]
    model = build_task_model({**MLP, "peft": "lora", "lora-rank": 2}, DIGITS)
    lora = [n for n in _trainable(model) if ".lora_" in n]
    assert lora == [
        "1.lora_A.default.weight",
        "1.lora_B.default.weight",
        "3.lora_A.default.weight",
        "3.lora_B.default.weight",
    ]
    assert set(_trainable(model)) == {*lora, *head}
    assert model.get_submodule("1").lora_A["default"].weight.shape == (2, 64)
    # LoRA starts at B = 0: the model is the backbone's.
    plain = build_task_model({**MLP}, DIGITS)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(model(x), plain(x))
    ffa = build_task_model({**MLP, "peft": "lora", "lora-freeze-a": True}, DIGITS)
    assert not any(".lora_A." in n for n in _trainable(ffa))
    assert "1.lora_A.default.weight" in frozen_names(ffa)
    with pytest.raises(ValueError, match="matches no layer"):
        build_task_model({**MLP, "peft": "lora", "lora-targets": "conv*"}, DIGITS)
    with pytest.raises(ValueError, match="adapters need a transformers encoder"):
        build_task_model({**MLP, "peft": "adapter"}, DIGITS)


def test_the_backbone_is_the_same_for_the_same_settings_only():
    a = build_task_model({**MLP, "peft": "lora", "lora-freeze-a": True}, DIGITS)
    b = build_task_model({**MLP, "peft": "lora", "lora-freeze-a": True}, DIGITS)
    c = build_task_model(
        {**MLP, "peft": "lora", "lora-freeze-a": True, "seed": 4}, DIGITS
    )
    assert frozen_digest(a) == frozen_digest(b) != frozen_digest(c)


def test_digits_shift_is_the_other_half_rotated_and_noisy():
    source, target = _digits_halves()
    assert len(source["label"]) + len(target["label"]) == 1797
    # Stratified: every class split in halves (within one example).
    counts = np.bincount(source["label"]) - np.bincount(target["label"])
    assert np.abs(counts).max() <= 1
    shifted = _digits_shift().arrays
    assert shifted["x"].shape == target["x"].shape
    np.testing.assert_array_equal(shifted["label"], target["label"])
    difference = np.abs(shifted["x"] - target["x"]).mean()
    assert 0.05 < difference < 0.5
    np.testing.assert_array_equal(_digits_shift().arrays["x"], shifted["x"])


def test_digits_domains_mixes_four_transformations_of_the_same_half():
    _, target = _digits_halves()
    clean = target["x"].reshape(-1, 8, 8)
    mixed = _digits_domains().arrays
    np.testing.assert_array_equal(mixed["label"], target["label"])
    x = mixed["x"].reshape(-1, 8, 8)
    shifted = _digits_shift().arrays["x"].reshape(-1, 8, 8)
    found = np.stack(
        [
            np.isclose(x, shifted).all(axis=(1, 2)),
            np.isclose(x, 1.0 - clean).all(axis=(1, 2)),
            np.isclose(x, np.rot90(clean, axes=(1, 2))).all(axis=(1, 2)),
        ]
    )
    faint = ~found.any(axis=0)  # the rest: 0.4 x plus noise, fainter
    assert found.all(axis=0).sum() == 0
    shares = [*found.mean(axis=1), faint.mean()]
    assert all(0.2 < share < 0.3 for share in shares), shares
    assert x[faint].mean() < clean[faint].mean()


def test_pretraining_is_deterministic_and_learns_the_source():
    setup = FineTuning(pretrained="source", pretrain_epochs=5)
    first = pretrain_on_source(MLP, DIGITS, setup)
    again = pretrain_on_source(MLP, DIGITS, setup)
    for key in first:
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=0)
    model = build_task_model({**MLP}, DIGITS)
    model.load_state_dict(first)
    x, y = (torch.from_numpy(a) for a in _digits_halves()[0].values())
    accuracy = (model(x.reshape(-1, 1, 8, 8)).argmax(1) == y).float().mean()
    assert accuracy > 0.8


def _train_message(model, digest=None):
    frozen = set(frozen_names(model))
    arrays = ArrayRecord(
        {k: v for k, v in model.state_dict().items() if k not in frozen}
    )
    config = {
        wire.ROUTINE: wire.PLAIN_ROUTINE,
        "server-round": 1,
        "seed": 0,
        "local-steps": 3,
        "lr": 0.1,
    }
    if digest is not None:
        config[FROZEN_DIGEST] = digest
    content = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(config)})
    ensure_task_identity()
    msg = Message(content, dst_node_id=1, message_type="train")
    give_id(msg)
    return msg


def _context():
    return Context(1, 1, {}, RecordDict(), {})


def test_replies_carry_the_trainable_entries_and_the_backbone_stays():
    server = build_task_model({**MLP, "peft": "lora", "lora-rank": 2}, DIGITS)
    node = build_task_model({**MLP, "peft": "lora", "lora-rank": 2}, DIGITS)
    backbone = {k: node.state_dict()[k].clone() for k in frozen_names(node)}
    x, y = torch.rand(20, 1, 8, 8), torch.arange(20) % 10
    msg = _train_message(server, frozen_digest(server))
    reply = train_client(msg, _context(), node, (x, y))
    sent = list(msg.content[wire.ARRAYS].keys())
    assert list(reply.content[wire.ARRAYS].keys()) == sent
    assert not set(sent) & set(backbone)
    moved = any(
        not np.array_equal(reply.content[wire.ARRAYS][k].numpy(), a.numpy())
        for k, a in msg.content[wire.ARRAYS].items()
    )
    assert moved
    for key, value in backbone.items():
        torch.testing.assert_close(node.state_dict()[key], value, rtol=0, atol=0)


def test_a_node_with_another_backbone_refuses_the_message():
    server = build_task_model({**MLP, "peft": "head"}, DIGITS)
    other = build_task_model({**MLP, "peft": "head", "seed": 9}, DIGITS)
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 10
    msg = _train_message(server, frozen_digest(server))
    with pytest.raises(ConfigError, match=FROZEN_DIGEST):
        train_client(msg, _context(), other, (x, y))


FINETUNE = {
    **MLP,
    "pretrained": "source",
    "pretrain-epochs": 2,
    "peft": "lora",
    "lora-rank": 2,
    "num-server-rounds": 2,
    "local-steps": 3,
    "fraction-evaluate": 0.0,
    "plot": False,
}


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold", "fedld"])
def test_lora_runs_with_any_algorithm_and_only_adapters_travel(algorithm, tmp_path):
    config = {**FINETUNE, "algorithm": algorithm, "output-dir": str(tmp_path)}
    result, path, _ = run_inprocess(config, num_nodes=3)
    model = build_task_model(config, DIGITS)
    trainable = _trainable(model)
    assert list(result.arrays.keys()) == trainable
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    for row in rows[1:]:
        assert row["train-replies"] == 3 and row["error-replies"] == 0, row
    full = sum(v.numel() * 4 for v in model.state_dict().values())
    adapters = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    per_reply = rows[-1]["bytes-received"] / rows[-1]["train-replies"]
    # Serialised replies: the adapters (and, for SCAFFOLD, their control
    # variates) plus a fixed overhead; far from the full model's bytes.
    assert per_reply < 0.25 * full
    assert per_reply > adapters
    start = model.state_dict()
    assert any(
        not np.array_equal(result.arrays[k].numpy(), start[k].numpy())
        for k in trainable
    )


VIT = {"model": "vit-tiny", "dataset": "digits-shift", "seed": 0}


def test_vit_adapters_start_as_the_backbone_and_prompts_add_tokens():
    x = torch.rand(3, 1, 8, 8)
    plain = build_task_model(VIT, DIGITS).eval()
    adapted = build_task_model({**VIT, "peft": "adapter", "adapter-dim": 4}, DIGITS)
    torch.testing.assert_close(adapted.eval()(x), plain(x))
    names = _trainable(adapted)
    assert sum(".adapter." in n for n in names) == 4 * 4  # 4 blocks, down/up w+b
    assert {n for n in names if ".adapter." not in n} == {
        "net.classifier.weight",
        "net.classifier.bias",
    }
    prompted = build_task_model({**VIT, "peft": "prompt", "prompt-length": 3}, DIGITS)
    assert _trainable(prompted) == [
        "net.vit.embeddings.prompt",
        "net.classifier.weight",
        "net.classifier.bias",
    ]
    seen = []
    layer = prompted.net.vit.layers[0]
    layer.register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
    assert prompted(x).shape == (3, 10)
    assert seen == [(3, 1 + 16 + 3, 64)]  # class token, 16 patches, 3 prompts
    lora = build_task_model({**VIT, "peft": "lora", "lora-rank": 2}, DIGITS)
    assert {n.split(".lora_")[0] for n in _trainable(lora) if ".lora_" in n} == {
        f"net.vit.layers.{i}.attention.{p}"
        for i in range(4)
        for p in ("q_proj", "v_proj")
    }
