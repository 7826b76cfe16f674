"""One-Byte SPSA: the server's replay on hand-made scalars, the client's
projected gradients against autograd, and the bytes of a real reply."""

import json
import math

import numpy as np
import pytest
import torch

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.onebyte import make_hooks
from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies.context import RoundContext
from bouquet.strategies.onebyte import SCALARS, OneByte, SeededSteps
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import compression, wire

X0 = {
    "w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
    "b": np.array([0.5], np.float32),
    "n": np.array(7, np.int64),  # an integer buffer: not perturbed, not moved
}


def test_seeded_steps_replay_every_direction():
    ctx = RoundContext(1, None, "train", (1, 2), (1, 2), X0, {})
    ctx.per_node.update({1: {"seed": 11}, 2: {"seed": 22}})
    scalars = {1: [0.5, -2.0], 2: [1.0, 0.0]}
    replies = [
        ClientReply(n, n, 1.0, {}, {SCALARS: np.array(g)}) for n, g in scalars.items()
    ]
    delta, _ = SeededSteps(lr=0.3).update(replies, np.ones(2) / 2, None, ctx)
    total = sum(
        g * compression.seeded_direction(seed, j, 5)
        for node, seed in ((1, 11), (2, 22))
        for j, g in enumerate(scalars[node])
    )
    expected = -0.3 / math.sqrt(4) * total  # N = 4 scalars
    np.testing.assert_allclose(delta["w"].reshape(-1), expected[:4])
    np.testing.assert_allclose(delta["b"], expected[4:])
    assert set(delta) == {"w", "b"}


def _client(config, x, y, model):
    settings = TrainSettings(batch_size=64, lr=0.1, momentum=0.0, max_steps=5)
    result = train_local(
        model,
        (x, y),
        settings,
        make_hooks(config),
        generator=torch.Generator().manual_seed(0),
        config=config,
    )
    return result, {
        k: a.numpy() for k, a in result.run.reply_records[wire.ARRAYS].items()
    }


def test_client_scalars_are_directional_derivatives_along_the_seeded_z():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = {
        "onebyte.seed": 123,
        "onebyte.eps": 1e-2,
        "onebyte.samples": 3,
        "onebyte.quantize": "float32",
    }
    result, payload = _client(config, x, y, model)
    assert result.steps == 0  # no local training: the reply is the scalars
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    loss = torch.nn.functional.cross_entropy(model(x), y)  # full batch (6 <= 64)
    grads = torch.autograd.grad(loss, [model.weight, model.bias])
    flat = torch.cat([g.reshape(-1) for g in grads]).double().numpy()
    expected = [flat @ compression.seeded_direction(123, j, 8) for j in range(3)]
    assert payload["values"].dtype == np.float32
    np.testing.assert_allclose(payload["values"], expected, rtol=2e-2, atol=2e-3)
    assert result.run.metrics[wire.TRAIN_LOSS] == pytest.approx(
        float(loss.detach()), rel=1e-3
    )

    # The byte coding sends the same scalars, one byte each.
    _, coded = _client({**config, "onebyte.quantize": "byte"}, x, y, model)
    assert coded["codes"].dtype == np.uint8 and coded["codes"].shape == (3,)
    exact = compression.LogByte().encode(payload["values"], None)["codes"]
    np.testing.assert_array_equal(coded["codes"], exact)


def test_two_rounds_reply_with_bytes_and_move_the_model(tmp_path):
    config = {
        "algorithm": "onebyte",
        "onebyte.samples": 4,
        "onebyte.lr": 0.01,
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "model": "mlp",
        "seed": 1,
        "plot": False,
        "output-dir": str(tmp_path),
    }
    _, path, _ = run_inprocess(config, num_nodes=3)
    rows = json.loads((path / "metrics.json").read_text())["rounds"][1:]
    for row in rows:
        assert row["train-replies"] == 3 and row["train-dropped"] == 0
        # 3 replies of 4 bytes each plus the message headers, vs ~70 KB models.
        assert row["bytes-received"] < 3 * 200 < row["bytes-sent"] / 100
    assert OneByte(samples=4).reply_codec(None).spec(10**6) == {
        "codes": ((4,), "uint8")
    }
