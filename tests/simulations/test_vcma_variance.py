"""The VCMA variance measurement: its per-layer ratios by hand."""

import numpy as np
import pytest

from bouquet.simulations.vcma_variance import layer_variances


def test_layer_variances_by_hand():
    initial = {
        "w": np.array([0.0, 2.0, 4.0]),  # Var 4
        "b": np.array([1.0]),  # one entry: skipped
        "steps": np.array([1, 2, 3]),  # integer buffer: skipped
    }
    models = [
        {
            "w": np.array([0.0, 2.0, 4.0]),
            "b": np.array([0.0]),
            "steps": initial["steps"],
        },
        {
            "w": np.array([4.0, 2.0, 0.0]),
            "b": np.array([0.0]),
            "steps": initial["steps"],
        },
    ]
    out = layer_variances(models, initial)
    assert list(out) == ["w"]
    # Both nodes have Var 4; their average is [2, 2, 2], Var 0.
    assert out["w"] == {"node": pytest.approx(1.0), "average": pytest.approx(0.0)}
