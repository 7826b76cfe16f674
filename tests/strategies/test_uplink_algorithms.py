"""The compressed uplink with FedAvg, SCAFFOLD, FedLD and FedBuff: 2 in-process
rounds each, and the bytes measured from the serialised replies shrink by the
compressor's declared ratio (within 10%); SCAFFOLD's control-variate record
``momentum.dc`` is compressed too, with its own error feedback."""

import json

import numpy as np
import pytest

from bouquet.clientapps.uplink import error_state
from bouquet.simulations.inprocess import run_inprocess
from bouquet.tasks import compression, wire

CONFIG = {
    "num-server-rounds": 2,
    "fraction-evaluate": 0.0,
    "local-steps": 2,
    "momentum": 0.0,
    "model": "mlp",
    "seed": 3,
    "plot": False,
}
K = 2000


def _per_reply(tmp_path, name, **extra):
    config = {**CONFIG, "algorithm": name, "output-dir": str(tmp_path / name), **extra}
    result, path, grid = run_inprocess(config, num_nodes=4)
    rows = json.loads((path / "metrics.json").read_text())["rounds"][1:]
    replies = sum(r["train-replies"] for r in rows)
    assert replies > 0 and all(r["train-dropped"] == 0 for r in rows)
    d = sum(v.numpy().size for k, v in result.arrays.items())
    return sum(r["bytes-received"] for r in rows) / replies, d, grid


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "fedld", "fedbuff"])
def test_measured_reply_bytes_shrink_by_the_declared_ratio(tmp_path, name):
    dense, d, _ = _per_reply(tmp_path / "dense", name)
    # SCAFFOLD with error feedback: the model's and dc's errors, kept apart.
    feedback = {"error-feedback": True} if name == "scaffold" else {}
    small, _, grid = _per_reply(
        tmp_path / "topk", name, compressor="topk", **{"compressor-k": K}, **feedback
    )
    codec = compression.TopK(K)
    assert dense / small == pytest.approx(codec.ratio(d), rel=0.10)
    if feedback:
        for context in grid.contexts.values():
            for record in (wire.ARRAYS, "momentum.dc"):
                error = context.state[".".join(error_state(record))]["e"].numpy()
                assert error.shape == (d,) and np.count_nonzero(error) > 0
