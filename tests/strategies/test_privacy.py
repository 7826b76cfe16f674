"""Differential privacy around Bouquet strategies (strategies/privacy.py).

Hand-made replies check the math (clipping of the update only, the noise's
scale, SCAFFOLD's records untouched); runs on the in-process grid check the
two wrappers end to end on a synchronous (FedAvg), a multi-record (SCAFFOLD)
and an asynchronous (FedBuff) strategy, with Flower's accountant.
"""

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.supercore.privacy_accounting import (
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from bouquet.clientapps import evaluate_client, train_client
from bouquet.simulations.inprocess import InProcessGrid
from bouquet.strategies import (
    SCAFFOLD,
    FedAvg,
    FedAvgMomentum,
    FedBuff,
    FedLD,
    FedMedian,
    Krum,
)
from bouquet.strategies.privacy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    PrivateMean,
)
from tests.conftest import answer
from tests.strategies.test_momentum import REPLIES, X, _configure, _reply


def _with_rng(strategy, seed):
    aggregator = strategy.aggregator
    strategy.aggregator = replace(
        aggregator,
        combine=replace(aggregator.combine, rng=lambda: np.random.default_rng(seed)),
    )


def _clipped(u, c):
    norm = np.sqrt(sum(float(np.sum(v**2)) for v in u.values()))
    return {k: v * min(1.0, c / norm) for k, v in u.items()}


def test_scaffold_model_update_is_clipped_and_its_control_variates_are_not():
    plain = SCAFFOLD(fraction_train=0.5, eta_g=2.0)
    private = SCAFFOLD(fraction_train=0.5, eta_g=2.0)
    DifferentialPrivacyServerSideFixedClipping(private, 0.0, 1.0, 2)
    got = {}
    for name, strategy in (("plain", plain), ("private", private)):
        _configure(strategy)
        replies = answer(strategy, [_reply(*r) for r in REPLIES])
        got[name], _ = strategy.aggregate_train(1, replies)
    x = {k: np.asarray(v, np.float64) for k, v in X.items()}
    updates = [
        {"w": np.asarray(y, np.float64) - x["w"], "n": np.float64(5) - x["n"]}
        for y, *_ in REPLIES
    ]
    clipped = [_clipped(u, 1.0) for u in updates]
    mean = {k: 0.5 * (clipped[0][k] + clipped[1][k]) for k in x}
    # x + eta_g * the mean clipped update (the integer buffer rounded back) ...
    new = got["private"]
    np.testing.assert_allclose(new["w"].numpy(), x["w"] + 2.0 * mean["w"], rtol=1e-6)
    assert new["n"].numpy() == np.rint(x["n"] + 2.0 * mean["n"])
    assert not np.allclose(new["w"].numpy(), got["plain"]["w"].numpy())
    # ... while the control variates are SCAFFOLD's, as without the wrapper.
    np.testing.assert_allclose(private.state["c"]["w"], plain.state["c"]["w"])


def test_noise_has_the_documented_scale_and_lands_on_the_update():
    strategy = FedAvg(weighting="uniform", min_train_nodes=2)
    DifferentialPrivacyServerSideFixedClipping(strategy, 2.0, 1.0, 2)
    _with_rng(strategy, 7)
    x = {"w": np.zeros(1000, np.float32)}
    from bouquet.strategies.aggregation import to_record
    from tests.conftest import make_reply

    list(strategy.configure_train(1, to_record(x), ConfigRecord({}), _grid()))
    ys = [np.full(1000, 0.1, np.float32), np.full(1000, -0.01, np.float32)]
    replies = [
        make_reply({"w": y}, {"num-examples": 5}, node_id=1000 + i)
        for i, y in enumerate(ys)
    ]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
    updates = [_clipped({"w": y.astype(np.float64)}, 1.0) for y in ys]
    mean = 0.5 * (updates[0]["w"] + updates[1]["w"])
    noise = np.random.default_rng(7).normal(0.0, 2.0 * 1.0 * 0.5, size=1000)
    np.testing.assert_allclose(arrays["w"].numpy(), (mean + noise).astype(np.float32))


def _grid(num_nodes=2):
    return InProcessGrid(lambda msg, ctx: msg, num_nodes, {})


@pytest.mark.parametrize(
    "strategy",
    [FedMedian(), Krum(), FedLD(), FedAvgMomentum(beta=0.5)],
    ids=["median", "krum", "fedld", "fedavg-m"],
)
def test_strategies_whose_server_reads_raw_replies_are_refused(strategy):
    with pytest.raises(ValueError, match="cannot protect"):
        DifferentialPrivacyServerSideFixedClipping(strategy, 1.0, 1.0, 2)


def test_flower_strategies_and_bad_settings_are_refused():
    with pytest.raises(TypeError, match="Flower's wrapper"):
        DifferentialPrivacyServerSideFixedClipping(FlowerFedAvg(), 1.0, 1.0, 2)
    with pytest.raises(ValueError, match="clipping norm"):
        DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 0.0, 2)
    with pytest.raises(ValueError, match="noise multiplier"):
        DifferentialPrivacyServerSideFixedClipping(
            FedAvg(), 0.0, 1.0, 2, accountant=_accountant()
        )


def test_accounting_requires_equal_weights():
    combine = PrivateMean(
        FedAvg().aggregator.combine, 1.0, 1.0, on_release=lambda w: None
    )
    assert combine.noise_multiplier == 1.0
    strategy = FedAvg(min_train_nodes=2)  # weighted by examples
    DifferentialPrivacyServerSideFixedClipping(
        strategy, 1.0, 1.0, 2, accountant=_accountant()
    )
    from bouquet.strategies.aggregation import to_record
    from tests.conftest import make_reply

    list(
        strategy.configure_train(
            1, to_record({"w": np.zeros(2)}), ConfigRecord({}), _grid()
        )
    )
    replies = [
        make_reply({"w": np.ones(2)}, {"num-examples": n}, node_id=1000 + i)
        for i, n in enumerate((5, 15))
    ]
    with pytest.raises(ValueError, match="equal client weights"):
        strategy.aggregate_train(1, answer(strategy, replies))


# -------------------------------------------------------- end to end --------
GEN = torch.Generator().manual_seed(0)
XS = torch.randn(240, 4, generator=GEN)
YS = (XS[:, 0] + XS[:, 1] > 0).long()
NODES = 3


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
    )


def _client(norms: list[float]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        i = int(ctx.node_config["partition-id"])
        reply = train_client(msg, ctx, _net(), (XS[i::NODES], YS[i::NODES]))
        sent = msg.content["arrays"]
        got = reply.content["arrays"]
        delta = msg.content["config"].get("client-routine") == "delta"
        norms.append(
            float(
                np.sqrt(
                    sum(
                        np.sum(
                            (
                                got[k].numpy().astype(np.float64)
                                - (0 if delta else sent[k].numpy())
                            )
                            ** 2
                        )
                        for k in got
                    )
                )
            )
        )
        return reply

    @app.evaluate()
    def evaluate(msg: Message, ctx: Context) -> Message:
        return evaluate_client(msg, ctx, _net(), (XS, YS))

    return app


def _accountant():
    return RdpAccountant(
        PrivacyConfig(
            target_delta=1e-5,
            population_size=NODES,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvg(weighting="uniform", min_available_nodes=NODES),
        lambda: SCAFFOLD(min_available_nodes=NODES),
        lambda: FedBuff(buffer_size=2, min_available_nodes=NODES),
    ],
    ids=["fedavg", "scaffold", "fedbuff"],
)
@pytest.mark.parametrize(
    "wrapper",
    [
        DifferentialPrivacyServerSideFixedClipping,
        DifferentialPrivacyClientSideFixedClipping,
    ],
    ids=["server-side", "client-side"],
)
def test_private_runs_keep_their_schedule_and_account_every_release(
    make, wrapper, caplog
):
    norms: list[float] = []
    strategy = make()
    clip = 0.05
    dp = wrapper(strategy, 0.5, clip, NODES, accountant=_accountant())
    grid = InProcessGrid(_client(norms), NODES, {"lr": 0.1})
    with caplog.at_level(logging.INFO, logger="flwr"):
        result = dp.start(grid, ArrayRecord(_net().state_dict()), num_rounds=3)
    assert dp.privacy_spent().num_releases == 3  # one per round or version
    assert "DP: " in caplog.text
    if isinstance(strategy, FedBuff):
        assert "[VERSION 3/3]" in caplog.text  # asynchronous, not rounds
    clipped_on_clients = wrapper is DifferentialPrivacyClientSideFixedClipping
    # Client-side: every reply's update is within the norm; server-side: not.
    assert (max(norms) <= clip * (1 + 1e-5)) == clipped_on_clients, norms
    assert result.arrays is not None
