"""Bouquet strategies keep Flower's contract: Flower's start drives them, its wrappers wrap them.

Every run here is in-process: a small linear model, four nodes, Bouquet's
client routine in a user-style ClientApp.
"""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from bouquet.clientapps.routine import evaluate_client, train_client
from bouquet.simulations.inprocess import InProcessGrid
from bouquet.strategies.driver import Driver
from bouquet.strategies.fedavg import FedAvg
from bouquet.strategies.fedbuff import FedBuff

NODES = 4
gen = torch.Generator().manual_seed(0)
X = torch.randn(200, 4, generator=gen)
Y = (X[:, 0] + X[:, 1] > 0).long()


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def _app(*mods) -> ClientApp:
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])
        return train_client(msg, ctx, net(), (X[i::NODES], Y[i::NODES]))

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        return evaluate_client(msg, ctx, net(), (X, Y))

    return app


def _start(strategy, app=None, driver=None, rounds=2):
    grid = InProcessGrid(app or _app(), NODES, {})
    initial = ArrayRecord(net().state_dict())
    config = {"lr": 0.1, "local-epochs": 1, "momentum": 0.0, "batch-size": 10}
    kwargs = {"num_rounds": rounds, "train_config": ConfigRecord(config)}
    if driver is None:
        return Strategy.start(strategy, grid, initial, **kwargs)  # Flower's own
    return driver.run(strategy, grid, initial, **kwargs)


def _arrays(result):
    return {k: v.numpy() for k, v in result.arrays.items()}


def _fedavg():
    return FedAvg(min_available_nodes=NODES, fraction_evaluate=0.5, seed=1)


def test_flowers_start_drives_a_bouquet_strategy_like_bouquets_driver(caplog):
    flowers = _start(_fedavg())
    ours = _start(_fedavg(), driver=Driver())
    for key, value in _arrays(flowers).items():
        np.testing.assert_array_equal(value, _arrays(ours)[key])
    assert flowers.evaluate_metrics_clientapp[2]["eval-accuracy"] > 0.7
    # Bouquet's driver logs what Flower's start logs.
    for line in (
        "Starting FedAvg strategy",
        "Aggregated MetricRecord",
        "Final results",
    ):
        assert caplog.text.count(line) >= 2, line


def test_bouquet_start_has_flowers_signature():
    import inspect

    assert list(inspect.signature(FedAvg.start).parameters) == list(
        inspect.signature(Strategy.start).parameters
    )


def _moved(result) -> float:
    start = {k: v.detach().numpy() for k, v in net().state_dict().items()}
    return float(
        np.sqrt(sum(np.sum((_arrays(result)[k] - v) ** 2) for k, v in start.items()))
    )


@pytest.mark.parametrize("drive", ["flower", "bouquet"])
def test_server_side_dp_wrapper_clips_and_noises_a_bouquet_strategy(drive):
    driver = Driver() if drive == "bouquet" else None
    plain = _start(_fedavg(), driver=driver, rounds=1)
    # Without noise and with a clip far above any update, the wrapper is a no-op.
    loose = DifferentialPrivacyServerSideFixedClipping(_fedavg(), 0.0, 1e6, NODES)
    for key, value in _arrays(_start(loose, driver=driver, rounds=1)).items():
        np.testing.assert_allclose(value, _arrays(plain)[key], rtol=1e-6, atol=1e-7)
    # A tight clip bounds the mean update by the clipping norm.
    tight = DifferentialPrivacyServerSideFixedClipping(_fedavg(), 0.0, 0.05, NODES)
    clipped = _start(tight, driver=driver, rounds=1)
    assert _moved(clipped) <= 0.05 + 1e-6 < _moved(plain)
    # Noise reaches the global model.
    noisy = DifferentialPrivacyServerSideFixedClipping(_fedavg(), 1.0, 0.05, NODES)
    noisy_weight = _arrays(_start(noisy, driver=driver, rounds=1))["weight"]
    assert not np.allclose(noisy_weight, _arrays(clipped)["weight"])


@pytest.mark.parametrize("drive", ["flower", "bouquet"])
def test_client_side_dp_wrapper_with_flowers_mod(drive):
    driver = Driver() if drive == "bouquet" else None
    plain = _start(_fedavg(), driver=driver, rounds=1)
    wrapped = DifferentialPrivacyClientSideFixedClipping(_fedavg(), 0.0, 0.05, NODES)
    clipped = _start(wrapped, app=_app(fixedclipping_mod), driver=driver, rounds=1)
    assert _moved(clipped) <= 0.05 + 1e-6 < _moved(plain)


def test_bouquets_driver_refuses_a_wrapped_asynchronous_strategy():
    wrapped = DifferentialPrivacyServerSideFixedClipping(
        FedBuff(min_available_nodes=NODES), 0.0, 1.0, NODES
    )
    with pytest.raises(ValueError, match="asynchronous"):
        _start(wrapped, driver=Driver())
