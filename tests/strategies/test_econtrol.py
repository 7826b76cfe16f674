"""EControl's server is EF21's; a 2-round run keeps client and server h in step."""

import numpy as np
import pytest

from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies.econtrol import EControl
from bouquet.strategies.ef21 import ErrorFeedbackMean
from bouquet.strategies.state import load_state
from bouquet.tasks import compression


def test_declaration_and_codec():
    strategy = EControl(k=5, eta=0.1)
    assert isinstance(strategy.make_aggregator().combine, ErrorFeedbackMean)
    assert strategy.codec == compression.TopK(5)
    assert EControl(compressor="randk").codec == compression.Scaled(
        compression.RandK(1)
    )
    with pytest.raises(ValueError, match="eta"):
        EControl(eta=1.5)


def test_two_rounds_client_h_averages_to_server_h(tmp_path):
    config = {
        "algorithm": "econtrol",
        "econtrol.k": 100,
        "econtrol.eta": 0.1,
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "local-steps": 2,
        "momentum": 0.0,
        "model": "mlp",
        "seed": 5,
        "plot": False,
        "output-dir": str(tmp_path),
    }
    _, path, grid = run_inprocess(config, num_nodes=3)
    server_h = load_state(path / "checkpoint").strategy["aggregator"]["combine"]
    client_h = [c.state["econtrol.h"]["h"].numpy() for c in grid.contexts.values()]
    errors = [c.state["econtrol.e"]["e"].numpy() for c in grid.contexts.values()]
    assert len(client_h) == 3
    flat = np.concatenate([server_h[k].reshape(-1) for k in server_h])
    np.testing.assert_allclose(flat, np.mean(client_h, axis=0), rtol=1e-6, atol=1e-9)
    assert np.count_nonzero(flat) <= 3 * 2 * 100
    assert all(np.abs(e).sum() > 0 for e in errors)
