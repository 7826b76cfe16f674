"""VCMA: the variance correction against NumPy, its reduction to D-PSGD, a run."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Message

from bouquet.clientapps.recipes.vcma import VarianceCorrectedMix, make_hooks
from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies.aggregation import to_record
from bouquet.strategies.context import RoundContext
from bouquet.strategies.gossip import STATE
from bouquet.strategies.topology import make_graph, spectral_gap
from bouquet.strategies.vcma import INIT_SEED, VCMA, conservative_mixing
from bouquet.tasks import wire

HELD = {"bouquet.personal": "the node's model"}
CORRECTED = ("0.weight", "0.bias", "1.weight", "1.bias")  # parameters, > 1 element


class Scaled(torch.nn.Module):
    """A layer with a scalar parameter (never corrected)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * x


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), Scaled()
    )
    with torch.no_grad():  # BatchNorm statistics and weights away from 1 and 0
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
        model[1].bias.normal_()
        model[2].gain.fill_(float(seed))
        model[1].num_batches_tracked.fill_(seed)
    return model


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _mix(hook, own_seed=0, neighbour_seeds=(1, 2, 3), state=HELD):
    """The node's model after ``hook.setup`` with neighbours drawn from seeds."""
    model = _model(own_seed)
    own = _state(model)
    neighbours = [_state(_model(s)) for s in neighbour_seeds]
    incoming = {wire.gossip_neighbor(k): to_record(m) for k, m in enumerate(neighbours)}
    run = SimpleNamespace(
        model=model, incoming=incoming, reply_records={}, state=state, stop=False
    )
    hook.setup(run)
    return own, neighbours, _state(model)


def _reference(own, neighbours, c, target, eps):
    """NumPy: the conservative average, then each layer rescaled to its target."""
    n = len(neighbours)
    out = {}
    for key, value in own.items():
        if value.dtype.kind != "f":
            out[key] = value
            continue
        avg = c * value.astype(np.float64) + (1 - c) / n * sum(
            m[key].astype(np.float64) for m in neighbours
        )
        if key in CORRECTED:
            others = np.mean([m[key].var(ddof=1, dtype=np.float64) for m in neighbours])
            mine = value.var(ddof=1, dtype=np.float64)
            sigma2 = {
                "follow-others": others,
                "follow-conservative": c * mine + (1 - c) * others,
                "follow-self": mine,
            }[target]
            mu, v = avg.mean(), avg.var(ddof=1)
            avg = (avg - mu) * np.sqrt((sigma2 + eps) / (v + eps)) + mu
        out[key] = avg
    return out


@pytest.mark.parametrize(
    "target", ["follow-others", "follow-conservative", "follow-self"]
)
@pytest.mark.parametrize("eps", [1e-4, 0.0])
def test_the_correction_matches_numpy_for_each_target(target, eps):
    c = 0.5
    hook = VarianceCorrectedMix([c, *[(1 - c) / 3] * 3], target=target, eps=eps)
    own, neighbours, got = _mix(hook)
    expected = _reference(own, neighbours, c, target, eps)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    # Skipped: BN statistics are only averaged, the scalar gain is only
    # averaged, the integer counter keeps the node's value.
    plain = _reference(own, neighbours, c, target="follow-self", eps=eps)
    for key in ("1.running_mean", "1.running_var", "2.gain"):
        np.testing.assert_allclose(got[key], plain[key], rtol=1e-6)
    assert got["1.num_batches_tracked"] == own["1.num_batches_tracked"] == 0
    assert got["2.gain"] == pytest.approx(0.5 * 0 + 0.5 * (1 + 2 + 3) / 3)


def test_the_mean_is_kept_and_the_variance_is_the_target():
    hook = VarianceCorrectedMix([0.25] * 4, target="follow-others", eps=0.0)
    own, neighbours, got = _mix(hook)
    for key in CORRECTED:
        avg = 0.25 * own[key].astype(np.float64) + sum(
            0.25 * m[key].astype(np.float64) for m in neighbours
        )
        assert got[key].mean() == pytest.approx(avg.mean(), abs=1e-6)
        target = np.mean([m[key].var(ddof=1, dtype=np.float64) for m in neighbours])
        assert got[key].var(ddof=1, dtype=np.float64) == pytest.approx(target, rel=1e-5)
        # Averaging uncorrelated models shrank the variance; VC restores it.
        assert avg.var(ddof=1) < 0.8 * target


def test_without_correction_it_is_the_conservative_average():
    hook = VarianceCorrectedMix([0.4, 0.2, 0.2, 0.2], correct=False)
    own, neighbours, got = _mix(hook)
    for key, value in own.items():
        if value.dtype.kind == "f":
            expected = 0.4 * value + 0.2 * sum(m[key] for m in neighbours)
            np.testing.assert_allclose(got[key], expected, rtol=1e-6, atol=1e-7)


def test_a_node_that_lost_its_model_follows_the_others():
    hook = VarianceCorrectedMix([0.5, 0.25, 0.25], target="follow-self", eps=0.0)
    own, neighbours, got = _mix(hook, neighbour_seeds=(1, 2), state={})
    expected = _reference(own, neighbours, 0.0, "follow-others", 0.0)
    for key in CORRECTED:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_independent_initialisation_is_drawn_from_the_seed_once():
    def first_round(seed, state):
        model = _model(0)
        run = SimpleNamespace(
            model=model,
            incoming={wire.ARRAYS: to_record(_state(model))},
            reply_records={},
            state=state,
            stop=False,
        )
        (hook,) = make_hooks({INIT_SEED: seed})
        hook.setup(run)
        return _state(model)

    a, b, again = first_round(7, {}), first_round(8, {}), first_round(7, {})
    kept = first_round(7, HELD)  # a node that holds its model keeps it
    for key in ("0.weight", "0.bias"):  # BatchNorm's reset is constant (1, 0)
        np.testing.assert_array_equal(a[key], again[key])
        assert not np.allclose(a[key], b[key])
        np.testing.assert_array_equal(kept[key], _state(_model(0))[key])


def _ctx(nodes, server_round):
    return RoundContext(
        server_round=server_round,
        num_rounds=None,
        phase="train",
        nodes=tuple(nodes),
        sampled=(),
        arrays={"weight": np.zeros((1, 3), np.float32)},
        config={wire.SERVER_ROUND: server_round},
    )


def test_the_relay_sends_the_conservative_rows_and_fresh_nodes_a_seed():
    nodes = (10, 11, 12, 13, 14)
    strategy = VCMA(conservative=0.5, seed=3)
    first = strategy.recipients(_ctx(nodes, 1))
    seeds = {n: c[wire.CONFIG][INIT_SEED] for n, c in first.items()}
    assert len(set(seeds.values())) == len(nodes)
    assert seeds == {
        n: c[wire.CONFIG][INIT_SEED]
        for n, c in VCMA(seed=3).recipients(_ctx(nodes, 1)).items()
    }
    strategy.state[STATE] = {
        **strategy.state[STATE],
        "models": {str(v): {"weight": np.ones((1, 3), np.float32)} for v in range(5)},
    }
    second = strategy.recipients(_ctx(nodes, 2))
    for content in second.values():
        assert content[wire.CONFIG][wire.GOSSIP_WEIGHTS] == [0.5, 0.25, 0.25]
        assert INIT_SEED not in content[wire.CONFIG]
    # An irregular graph: rows sum to 1, own weight c, the rest split evenly.
    path = make_graph("edges", 3, edges=[(0, 1), (1, 2)])
    w = conservative_mixing(path, 0.5)
    np.testing.assert_allclose(w, [[0.5, 0.5, 0], [0.25, 0.5, 0.25], [0, 0.5, 0.5]])
    assert spectral_gap(w) == pytest.approx(0.5)  # eigenvalues 1, 0.5, 0


def test_without_correction_from_a_shared_start_it_is_dpsgd(tmp_path):
    (reduction,) = VCMA.reductions
    config = {
        "num-server-rounds": 2,
        "local-steps": 2,
        "model": "mlp",
        "seed": 5,
        "plot": False,
        "output-dir": str(tmp_path),
    }
    mine = {f"vcma.{k}": v for k, v in reduction.settings.items()}
    got, _, _ = run_inprocess({**config, "algorithm": "vcma", **mine}, num_nodes=4)
    expected, _, _ = run_inprocess(
        {**config, "algorithm": "dpsgd", "dpsgd.mixing": "uniform"}, num_nodes=4
    )
    for key, value in expected.arrays.items():
        np.testing.assert_allclose(
            got.arrays[key].numpy(), value.numpy(), rtol=1e-6, atol=1e-7
        )


def test_a_run_corrects_and_trains_from_independent_starts(tmp_path):
    seen: list[Message] = []
    from bouquet.clientapps.app import app

    def client(msg, context):
        if msg.metadata.message_type == "train":
            seen.append(msg)
        return app(msg, context)

    config = {
        "algorithm": "vcma",
        "num-server-rounds": 2,
        "local-steps": 2,
        "model": "mlp",
        "seed": 1,
        "plot": False,
        "output-dir": str(tmp_path),
    }
    result, path, _ = run_inprocess(config, num_nodes=4, client_app=client)
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    assert [r["train-replies"] for r in rows[1:]] == [4, 4]
    assert rows[2]["train-spectral-gap"] == pytest.approx(0.5)  # ring, c = 0.5
    for row in rows[1:]:
        assert row["train-consensus-distance"] > 0
        assert row["node-accuracy-mean"] is not None
    first = [m for m in seen if m.content[wire.CONFIG][wire.SERVER_ROUND] == 1]
    assert len({m.content[wire.CONFIG][INIT_SEED] for m in first}) == 4
    second = [m for m in seen if m.content[wire.CONFIG][wire.SERVER_ROUND] == 2]
    assert all(INIT_SEED not in m.content[wire.CONFIG] for m in second)
    assert all(
        m.content[wire.CONFIG][wire.GOSSIP_WEIGHTS] == [0.5, 0.25, 0.25] for m in second
    )
    assert all(np.isfinite(a.numpy()).all() for a in result.arrays.values())
