"""The worked example of docs/adding-an-algorithm.md runs as written."""

import re
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from bouquet.clientapps.app import app
from bouquet.simulations.inprocess import InProcessGrid, app_defaults

DOC = Path(__file__).resolve().parent.parent / "docs" / "adding-an-algorithm.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_server_only_example_is_a_working_algorithm():
    module, test = _blocks()[:2]
    # Run the module as written, without adding a name to the shared registry.
    module = module.replace("from bouquet.strategies.registry import register\n", "")
    assert "import register" not in module  # the doc's import line changed?
    namespace: dict = {"register": lambda cls: cls}
    exec(compile(module, str(DOC), "exec"), namespace)
    exec(compile(test, str(DOC), "exec"), namespace)
    namespace["test_trimmed_mean_drops_the_extremes"]()

    from bouquet.tasks import DataSpec, build_model, dataset_info

    strategy = namespace["FedTrimmedAvg"](beta=0.25, min_available_nodes=4)
    model = build_model("mlp", dataset_info(DataSpec(dataset="digits")), seed=0)
    grid = InProcessGrid(app, 4, {**app_defaults(), "plot": False})
    initial = ArrayRecord(model.state_dict())
    result = strategy.start(
        grid, initial, num_rounds=2, train_config=ConfigRecord({"lr": 0.05})
    )
    moved = [
        not np.array_equal(result.arrays[k].numpy(), initial[k].numpy())
        for k in initial
    ]
    assert any(moved)
    assert all(np.isfinite(a.numpy()).all() for a in result.arrays.values())
