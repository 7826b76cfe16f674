"""The compressed uplink for plain algorithms: real bytes, decoding, refusals."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.uplink import ERROR_STATE, compress_reply
from bouquet.serverapps.run import checked_strategy
from bouquet.serverapps.settings import RunConfigError
from bouquet.simulations.inprocess import (
    InProcessGrid,
    app_defaults,
    ensure_task_identity,
    run_inprocess,
)
from bouquet.strategies.aggregation import to_numpy, to_record
from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.registry import get_algorithm
from bouquet.strategies.uplink import compress_uplink
from bouquet.tasks import compression, wire
from tests.conftest import answer, make_reply

CONFIG = {
    "num-server-rounds": 2,
    "fraction-evaluate": 0.0,
    "local-steps": 2,
    "momentum": 0.0,
    "model": "mlp",
    "seed": 4,
    "plot": False,
}


def _run(tmp_path, name, **extra):
    config = {**CONFIG, "algorithm": "fedavg", "output-dir": str(tmp_path / name)}
    result, path, grid = run_inprocess({**config, **extra}, num_nodes=3)
    rows = json.loads((path / "metrics.json").read_text())["rounds"][1:]
    arrays = {k: v.numpy() for k, v in result.arrays.items()}
    return arrays, rows, grid


def test_fedavg_with_topk_uplink_sends_fewer_bytes_and_still_learns(tmp_path):
    dense, dense_rows, _ = _run(tmp_path, "dense")
    same, _, _ = _run(tmp_path, "identity", compressor="identity")
    for key, value in dense.items():  # x + (y - x) in float32: y up to rounding
        np.testing.assert_allclose(same[key], value, rtol=1e-5, atol=1e-6)

    sparse, rows, grid = _run(
        tmp_path, "topk", compressor="topk", **{"compressor-k": 200}
    )
    for mine, theirs in zip(rows, dense_rows, strict=True):
        assert mine["train-replies"] == 3 and mine["train-dropped"] == 0
        # Measured from the serialised replies: 3 x 200 x (4 + 4) bytes + headers.
        assert 4800 <= mine["bytes-received"] <= 4800 + 3 * 2 * 128
        assert theirs["bytes-received"] > 20 * mine["bytes-received"]
    moved = sum(np.count_nonzero(sparse[k] != dense[k]) for k in dense)
    assert moved > 0
    assert not any(ERROR_STATE[1] in str(c.state) for c in grid.contexts.values())


def test_error_feedback_keeps_the_residual_in_context_state(tmp_path):
    _, rows, grid = _run(
        tmp_path,
        "ef",
        compressor="topk",
        **{"compressor-k": 50, "error-feedback": True},
    )
    assert all(r["train-dropped"] == 0 for r in rows)
    for context in grid.contexts.values():
        error = context.state[".".join(ERROR_STATE)]["e"].numpy()
        assert error.ndim == 1 and np.count_nonzero(error) > 50


def test_client_error_feedback_on_hand_made_arrays():
    config = {
        wire.UPLINK_COMPRESSOR: "topk",
        wire.UPLINK_K: 1,
        wire.UPLINK_ERROR_FEEDBACK: True,
    }
    sent = to_record({"w": np.zeros(3, np.float32), "n": np.array(1, np.int64)})
    state: dict = {}
    first = compress_reply(
        {"w": np.float32([3.0, -1.0, 0.5]), "n": np.array(2)}, sent, config, state, 0
    )
    assert list(first.keys()) == ["indices", "values"]  # the integer entry stays
    np.testing.assert_array_equal(first["indices"].numpy(), [0])
    np.testing.assert_allclose(state["bouquet.uplink-error"]["e"].numpy(), [0, -1, 0.5])
    # Next round: update (0, -0.2, 0) + e (0, -1, .5): coordinate 1 wins.
    second = compress_reply(
        {"w": np.float32([0.0, -0.2, 0.0]), "n": np.array(3)}, sent, config, state, 1
    )
    np.testing.assert_array_equal(second["indices"].numpy(), [1])
    np.testing.assert_allclose(second["values"].numpy(), [-1.2])
    np.testing.assert_allclose(
        state["bouquet.uplink-error"]["e"].numpy(), [0, 0, 0.5], atol=1e-6
    )


def test_the_server_decodes_the_model_and_drops_bad_payloads():
    ensure_task_identity()
    strategy = compress_uplink(FedAvg(min_train_nodes=1), "topk", k=1)
    x = {"w": np.array([1.0, 2.0, 3.0], np.float32), "n": np.array(5, np.int64)}
    grid = InProcessGrid(lambda msg, ctx: msg, num_nodes=2, run_config={})
    messages = list(strategy.configure_train(1, to_record(x), ConfigRecord(), grid))
    assert messages[0].content["config"][wire.UPLINK_COMPRESSOR] == "topk"
    nodes = sorted(m.metadata.dst_node_id for m in messages)
    good = {"indices": np.int32([2]), "values": np.float32([-3.0])}
    bad = {"indices": np.int32([3]), "values": np.float32([1.0])}
    replies = [make_reply(good, node_id=nodes[0]), make_reply(bad, node_id=nodes[1])]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
    new = to_numpy(arrays)
    np.testing.assert_allclose(new["w"], [1.0, 2.0, 0.0])
    assert new["n"] == 5 and new["w"].dtype == np.float32
    assert "outside" in strategy.train_round.outcome.dropped[0]


@pytest.mark.parametrize("name", ["ef21", "econtrol", "onebyte", "fedzip"])
def test_algorithms_whose_reply_is_not_the_model_or_update_are_refused(name):
    with pytest.raises(ValueError, match="their model or their update"):
        compress_uplink(get_algorithm(name)(), "topk")
    with pytest.raises(RunConfigError, match="compressor"):
        checked_strategy({**app_defaults(), "algorithm": name, "compressor": "sign"})


def test_unbiased_compressors_become_contractive_only_with_error_feedback():
    assert compress_uplink(FedAvg(), "randk", k=3).uplink == compression.RandK(3)
    scaled = compress_uplink(FedAvg(), "randk", k=3, error_feedback=True).uplink
    assert scaled == compression.Scaled(compression.RandK(3))
    assert compress_uplink(FedAvg(), "none").uplink is None


def test_a_client_refuses_compression_when_its_reply_is_not_what_is_decoded():
    from bouquet.clientapps.routine import train_client

    ensure_task_identity()
    config = {
        wire.ROUTINE: "delta",  # replies with Delta, the server expects a model
        wire.UPLINK_COMPRESSOR: "topk",
        wire.SEED: 0,
        wire.SERVER_ROUND: 1,
    }
    model = torch.nn.Linear(2, 2)
    sent = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    msg = Message(
        RecordDict({"arrays": to_record(sent), "config": ConfigRecord(config)}),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(1, 1, {}, RecordDict(), {})
    data = (torch.ones(4, 2), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match=r"uplink\.compressor"):
        train_client(msg, context, model, data)


def test_attacks_compose_with_a_compressed_uplink(tmp_path):
    # The attacker's model is what the uplink encodes: through the identity
    # compressor the round equals the uncompressed attacked round.
    attacked = {"attack": "sign-flip", "attack-fraction": 0.34, "num-server-rounds": 1}
    plain, _, _ = _run(tmp_path, "plain", **attacked)
    through, rows, _ = _run(tmp_path, "identity", compressor="identity", **attacked)
    honest, _, _ = _run(tmp_path, "honest", **{"num-server-rounds": 1})
    assert rows[0]["train-replies"] == 3 and rows[0]["error-replies"] == 0
    for key, value in plain.items():
        np.testing.assert_allclose(through[key], value, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(plain[k], honest[k]) for k in plain)
    # Attacks the uplink cannot carry are refused before the run starts.
    config = {**app_defaults(), "compressor": "topk", "attack-fraction": 0.2}
    with pytest.raises(RunConfigError, match="cannot carry the attack 'min-max'"):
        checked_strategy({**config, "attack": "min-max"})
    assert checked_strategy({**config, "attack": "sign-flip"}).uplink is not None


GOOD = {"indices": np.int32([0, 2]), "values": np.float32([1.0, -1.0])}


@pytest.mark.parametrize(
    "bad",
    [
        {**GOOD, "values": np.float32([np.nan, 1.0])},
        {**GOOD, "values": np.float32([1e20, 1.0])},
        {**GOOD, "indices": np.int64([0, 2])},
        {**GOOD, "indices": np.int32([2, 0])},
        {**GOOD, "indices": np.int32([0, 3])},
        {**GOOD, "indices": np.int32([0, 1, 2])},
        {"indices": GOOD["indices"]},
        {**GOOD, "extra": np.float32([0.0])},
        {"w": np.zeros(3, np.float32)},  # the dense model, not the payload
    ],
)
def test_a_round_with_invalid_compressed_replies_equals_the_round_without(bad):
    ensure_task_identity()
    x = {"w": np.array([1.0, 2.0, 3.0], np.float32)}

    def round_of(payloads):
        strategy = compress_uplink(FedAvg(min_train_nodes=1), "topk", k=2)
        grid = InProcessGrid(lambda msg, ctx: msg, num_nodes=3, run_config={})
        sent = strategy.configure_train(1, to_record(x), ConfigRecord(), grid)
        nodes = sorted(m.metadata.dst_node_id for m in sent)
        replies = [
            make_reply(p, {"num-examples": 4 + i}, node_id=nodes[i])
            for i, p in enumerate(payloads)
            if p is not None
        ]
        arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
        return to_numpy(arrays), strategy.export_state()

    other = {"indices": np.int32([1, 2]), "values": np.float32([0.5, 0.5])}
    mixed, mixed_state = round_of([GOOD, bad, other])
    clean, clean_state = round_of([GOOD, None, other])
    np.testing.assert_array_equal(mixed["w"], clean["w"])
    assert str(mixed_state) == str(clean_state)
