"""FedPEFT: its variant sets the shared ``peft``, on the server and on every node."""

import json

import pytest

from bouquet.serverapps.settings import RunConfigError
from bouquet.simulations.inprocess import run_inprocess

RUN = {
    "algorithm": "fedpeft",
    "model": "vit-tiny",
    "dataset": "digits-shift",
    "num-server-rounds": 1,
    "local-steps": 2,
    "fraction-evaluate": 0.0,
    "plot": False,
}


def test_the_variant_reaches_the_nodes_and_only_its_module_travels(tmp_path):
    config = {**RUN, "fedpeft.variant": "adapter", "output-dir": str(tmp_path)}
    result, path, _ = run_inprocess(config, num_nodes=2)
    names = list(result.arrays.keys())
    assert names and all(".adapter." in n or ".classifier." in n for n in names)
    assert sum(".adapter." in n for n in names) == 16  # 4 blocks x down/up x w, b
    row = json.loads((path / "metrics.json").read_text())["rounds"][-1]
    assert row["train-replies"] == 2 and row["error-replies"] == 0, row
    saved = json.loads((path / "config.json").read_text())
    assert saved["peft"] == "adapter"


def test_a_run_config_that_sets_peft_otherwise_is_refused(tmp_path):
    config = {**RUN, "peft": "lora", "output-dir": str(tmp_path)}
    with pytest.raises(RunConfigError, match="fedpeft sets peft='bias'"):
        run_inprocess(config, num_nodes=2)
    # The shared default is no choice: a full run config passes.
    config = {**RUN, "model": "mlp", "peft": "none"}
    run_inprocess({**config, "output-dir": str(tmp_path / "defaults")}, num_nodes=2)
