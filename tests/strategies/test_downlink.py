"""The compressed downlink: both halves' x_hat, real bytes, stale nodes refused."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.downlink import keep, received_model
from bouquet.serverapps.run import checked_strategy
from bouquet.serverapps.settings import RunConfigError
from bouquet.simulations.inprocess import (
    InProcessGrid,
    app_defaults,
    ensure_task_identity,
    run_inprocess,
)
from bouquet.strategies.aggregation import to_numpy, to_record
from bouquet.strategies.downlink import compress_downlink
from bouquet.strategies.fedavg import FedAvg
from bouquet.tasks import compression, wire
from tests.conftest import answer, make_reply


def _client(msg: Message, state: dict) -> dict[str, np.ndarray]:
    """The client half on a delivered message: its x_hat_t, then kept."""
    config = dict(msg.content[wire.CONFIG])
    model = received_model(msg.content, config, state)
    keep(model, config, state)
    return model


def test_server_and_client_x_hat_stay_equal_and_a_skipping_node_gets_it_dense():
    ensure_task_identity()
    strategy = compress_downlink(FedAvg(min_train_nodes=1), "topk", k=2)
    grid = InProcessGrid(lambda msg, ctx: msg, num_nodes=3, run_config={})
    x = {
        "w": np.array([1.0, -2.0, 3.0, 0.5, -0.25], np.float32),
        "n": np.array(7, np.int64),  # an integer entry travels dense
    }
    states: dict[int, dict] = {}
    rng = np.random.default_rng(0)
    skipping = None
    for server_round in (1, 2, 3):
        sent = list(strategy.configure_train(server_round, to_record(x), {}, grid))
        nodes = sorted(m.metadata.dst_node_id for m in sent)
        skipping = nodes[2]
        state = strategy.export_state()["downlink"]
        assert state["version"] == server_round
        replies = []
        for msg in sent:
            node = msg.metadata.dst_node_id
            config = msg.content[wire.CONFIG]
            base = config[wire.DOWNLINK_BASE]
            if server_round == 1 or (server_round == 3 and node == skipping):
                assert base == 0 and list(msg.content["arrays"]) == ["w", "n"]
            else:  # the payload, and the integer entry dense
                assert base == server_round - 1
                assert list(msg.content["arrays"]) == ["n"]
                assert list(msg.content[wire.DOWNLINK_PAYLOAD]) == ["indices", "values"]
            if server_round == 2 and node == skipping:
                continue  # this node misses round 2: no call, no reply
            model = _client(msg, states.setdefault(node, {}))
            # Bit for bit what the server holds and aggregates against.
            np.testing.assert_array_equal(model["w"], state["x_hat"]["w"])
            np.testing.assert_array_equal(model["w"], strategy.train_round.arrays["w"])
            assert model["n"] == x["n"]
            y = model["w"] + rng.normal(size=5).astype(np.float32)
            replies.append(make_reply({"w": y, "n": model["n"]}, node_id=node))
        x_hat = state["x_hat"]["w"].astype(np.float64)
        step = np.mean([r.content["arrays"]["w"].numpy() - x_hat for r in replies], 0)
        arrays, _ = strategy.aggregate_train(server_round, answer(strategy, replies))
        new = to_numpy(arrays)
        # x_{t+1} = x_t + mean(y_i - x_hat_t): the unsent part is kept.
        np.testing.assert_allclose(new["w"], x["w"] + step, rtol=1e-6, atol=1e-6)
        assert new["w"].dtype == np.float32 and new["n"] == 7
        x = new
    held = strategy.export_state()["downlink"]["held"]
    assert held == {str(n): 3 for n in states}


def test_a_node_whose_version_does_not_match_refuses():
    ensure_task_identity()
    strategy = compress_downlink(FedAvg(min_train_nodes=1), "topk", k=1)
    grid = InProcessGrid(lambda msg, ctx: msg, num_nodes=2, run_config={})
    x = {"w": np.array([1.0, 2.0, 3.0], np.float32)}
    first = list(strategy.configure_train(1, to_record(x), {}, grid))
    state: dict = {}
    model = _client(first[0], state)
    node = first[0].metadata.dst_node_id
    replies = [make_reply(model, node_id=m.metadata.dst_node_id) for m in first]
    strategy.aggregate_train(1, answer(strategy, replies))
    x = {"w": np.array([1.0, 2.0, 5.0], np.float32)}
    second = next(
        m
        for m in strategy.configure_train(2, to_record(x), {}, grid)
        if m.metadata.dst_node_id == node
    )
    assert second.content[wire.CONFIG][wire.DOWNLINK_BASE] == 1
    config = dict(second.content[wire.CONFIG])
    stale = {**state}
    keep(model, {**config, wire.DOWNLINK_VERSION: 7}, stale)  # another version
    with pytest.raises(ConfigError, match=r"downlink\.base"):
        received_model(second.content, config, stale)
    with pytest.raises(ConfigError, match=r"downlink\.base"):
        received_model(second.content, config, {})  # a node that lost its state
    bad = RecordDict(dict(second.content.items()))
    bad[wire.DOWNLINK_PAYLOAD] = to_record({"indices": np.int32([3]), "values": [1.0]})
    with pytest.raises(ConfigError, match=r"downlink\.payload"):
        received_model(bad, config, state)
    np.testing.assert_array_equal(
        received_model(second.content, config, state)["w"], [1.0, 2.0, 5.0]
    )

    # Through train_client: refused before anything is trained or stored.
    from bouquet.clientapps.routine import train_client

    torch_model = torch.nn.Linear(1, 3, bias=False)
    context = Context(1, node, {}, RecordDict(), {})
    data = (torch.ones(4, 1), torch.tensor([0, 1, 0, 1]))
    msg = Message(second.content, dst_node_id=node, message_type="train")
    with pytest.raises(ConfigError, match=r"downlink\.base"):
        train_client(msg, context, torch_model, data)
    assert not any("downlink" in k for k in context.state)


CONFIG = {
    "num-server-rounds": 2,
    "fraction-evaluate": 0.0,
    "local-steps": 1,
    "model": "mlp",
    "seed": 4,
    "plot": False,
}


@pytest.mark.parametrize(
    ("algorithm", "uplink"),
    [("fedavg", {}), ("fedprox", {"compressor": "topk", "compressor-k": 300})],
)
def test_a_topk_downlink_shrinks_the_train_messages_by_the_declared_ratio(
    tmp_path, algorithm, uplink
):
    k = 500
    config = {
        **CONFIG,
        **uplink,  # the uplink is independent: its replies decode against x_hat_t
        "algorithm": algorithm,
        "output-dir": str(tmp_path / algorithm),
        "downlink-compressor": "topk",
        "downlink-k": k,
    }
    result, path, grid = run_inprocess(config, num_nodes=2)
    rows = json.loads((path / "metrics.json").read_text())["rounds"][1:]
    assert [r["train-replies"] for r in rows] == [2, 2]
    assert all(r["train-dropped"] == 0 for r in rows)
    arrays = {k_: v.numpy() for k_, v in result.arrays.items()}
    keys = compression.compressed_keys(arrays)
    d = sum(arrays[k_].size for k_ in keys)
    rest = sum(arrays[k_].nbytes for k_ in arrays if k_ not in keys)
    ratio = compression.TopK(k).ratio(d)
    dense, sparse = rows[0]["bytes-sent"] / 2, rows[1]["bytes-sent"] / 2
    assert 4 * d + rest <= dense <= 4 * d + rest + 128 * len(arrays)  # npy headers
    # The array bytes of each message shrink by the declared ratio (within 10%).
    measured = (dense - rest) / (sparse - rest)
    assert abs(measured / ratio - 1) < 0.1
    for context in grid.contexts.values():
        assert context.state["bouquet.downlink-version"]["version"] == 2
    if uplink:  # the replies travelled as Top-k payloads too
        assert all(r["bytes-received"] < rows[0]["bytes-sent"] / 10 for r in rows)


def test_the_downlink_state_survives_a_checkpoint(tmp_path):
    from bouquet.strategies.state import ServerState, load_state, save_state

    ensure_task_identity()
    strategy = compress_downlink(FedAvg(min_train_nodes=1), "qsgd", levels=4)
    grid = InProcessGrid(lambda msg, ctx: msg, num_nodes=2, run_config={})
    x = {"w": np.arange(4, dtype=np.float32)}
    for server_round in (1, 2):
        sent = list(strategy.configure_train(server_round, to_record(x), {}, grid))
        replies = [make_reply(x, node_id=m.metadata.dst_node_id) for m in sent]
        strategy.aggregate_train(server_round, answer(strategy, replies))
        x = {"w": x["w"] + 1}
    save_state(ServerState(2, x, strategy.export_state()), tmp_path / "ckpt")
    resumed = compress_downlink(FedAvg(min_train_nodes=1), "qsgd", levels=4)
    resumed.load_state(load_state(tmp_path / "ckpt").strategy)
    before, after = strategy.state["downlink"], resumed.state["downlink"]
    assert after["version"] == 2 and after["held"] == before["held"]
    np.testing.assert_array_equal(after["x_hat"]["w"], before["x_hat"]["w"])
    assert after["x_hat"]["w"].dtype == np.float32


def test_the_downlink_is_refused_where_there_is_no_single_global_model():
    for name in ("fedasync", "dpsgd", "modest", "afa-cd", "hidenseek", "fedcac"):
        with pytest.raises(RunConfigError, match="downlink-compressor"):
            checked_strategy(
                {**app_defaults(), "algorithm": name, "downlink-compressor": "topk"}
            )
    strategy = checked_strategy({**app_defaults(), "downlink-compressor": "sign"})
    assert strategy.downlink is not None and "downlink" in strategy.export_state()
    assert checked_strategy(app_defaults()).downlink is None
    assert compress_downlink(FedAvg(), "none").downlink is None
