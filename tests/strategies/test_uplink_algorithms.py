"""The compressed uplink with FedAvg, SCAFFOLD, FedLD and FedBuff: 2 in-process
rounds each, and the bytes measured from the serialised replies shrink by the
compressor's declared ratio (within 10%)."""

import json

import pytest

from bouquet.simulations.inprocess import run_inprocess
from bouquet.tasks import compression

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
    result, path, _ = run_inprocess(config, num_nodes=4)
    rows = json.loads((path / "metrics.json").read_text())["rounds"][1:]
    replies = sum(r["train-replies"] for r in rows)
    assert replies > 0 and all(r["train-dropped"] == 0 for r in rows)
    d = sum(v.numpy().size for k, v in result.arrays.items())
    return sum(r["bytes-received"] for r in rows) / replies, d


@pytest.mark.parametrize("name", ["fedavg", "scaffold", "fedld", "fedbuff"])
def test_measured_reply_bytes_shrink_by_the_declared_ratio(tmp_path, name):
    dense, d = _per_reply(tmp_path / "dense", name)
    small, _ = _per_reply(
        tmp_path / "topk", name, compressor="topk", **{"compressor-k": K}
    )
    codec = compression.TopK(K)
    if name == "scaffold":
        # Only arrays is compressed; the control-variate record stays dense, so
        # the reply loses exactly the model's bytes less the payload's.
        saved = 4 * d - codec.payload_bytes(d)
        assert dense - small == pytest.approx(saved, rel=0.10)
    else:
        assert dense / small == pytest.approx(codec.ratio(d), rel=0.10)
