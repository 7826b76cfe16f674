"""Client hooks of the momentum family against step-by-step references."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from bouquet.clientapps.app import app as client_app
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.momentum import (
    ControlVariate,
    EtaK,
    GlobalMomentum,
    StormMomentum,
    make_hooks,
)
from bouquet.clientapps.state import load_arrays, save_arrays
from bouquet.serverapps.run import run_server
from bouquet.simulations.inprocess import InProcessGrid, app_defaults, run_inprocess
from bouquet.strategies.state import load_state

GEN = torch.Generator().manual_seed(0)
DATA = (torch.randn(12, 3, generator=GEN, dtype=torch.float64), torch.arange(12) % 2)
K, LR = 3, 0.1
SETTINGS = TrainSettings(epochs=K, batch_size=12, lr=LR)  # full batch: K steps


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(3, 2).double()


def _record(tensors):
    return ArrayRecord({k: Array(v.detach().numpy()) for k, v in tensors.items()})


def _grads(model, params):
    """Full-batch CE gradient at ``params`` (a dict), by autograd."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(DATA[0]), DATA[1]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _reference(direction):
    """Gradient descent ``y <- y - LR * direction(y, raw_grad)``; returns y, grads."""
    model = _model()
    y = {n: p.detach().clone() for n, p in model.named_parameters()}
    raw = []
    for _ in range(K):
        g = _grads(model, y)
        raw.append(g)
        y = {n: y[n] - LR * direction(y, g)[n] for n in y}
    return y, raw


def _train(hooks, incoming=None, state=None, model=None):
    model = model or _model()
    state = {} if state is None else state
    result = train_local(
        model,
        DATA,
        SETTINGS,
        hooks,
        generator=torch.Generator().manual_seed(2),
        state=state,
        incoming=incoming or {},
    )
    return model, state, result


def _close(model, expected, atol=1e-12):
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=atol)


def _random_like(seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(p.shape, generator=gen, dtype=torch.float64)
        for n, p in _model().named_parameters()
    }


C, C_I, G = _random_like(3), _random_like(4), _random_like(5)


def test_control_variate_matches_reference_and_persists_c_i():
    state = {}
    save_arrays(state, "momentum", "c-i", {k: v.numpy() for k, v in C_I.items()})
    model, state, result = _train([ControlVariate()], {"momentum.c": _record(C)}, state)
    expected, raw = _reference(lambda y, g: {n: g[n] - C_I[n] + C[n] for n in g})
    _close(model, expected)
    # Option II: c_i+ = c_i - c + (x - y)/(K eta) = the mean raw gradient.
    new_c_i = load_arrays(state, "momentum", "c-i")
    dc = result.run.reply_records["momentum.dc"]
    for name in C:
        mean_grad = sum(g[name] for g in raw) / K
        np.testing.assert_allclose(new_c_i[name], mean_grad.numpy(), atol=1e-12)
        np.testing.assert_allclose(
            dc[name].numpy(), (mean_grad - C_I[name]).numpy(), atol=1e-12
        )
    assert result.run.metrics["momentum.eta-k"] == pytest.approx(K * LR)


def test_lr_zero_leaves_the_control_variate_as_it_was():
    # Option II divides by K lr: with lr 0 nothing moved, so c_i stays.
    state = {}
    save_arrays(state, "momentum", "c-i", {k: v.numpy() for k, v in C_I.items()})
    model = _model()
    result = train_local(
        model,
        DATA,
        TrainSettings(epochs=K, batch_size=12, lr=0.0),
        [ControlVariate()],
        generator=torch.Generator().manual_seed(2),
        state=state,
        incoming={"momentum.c": _record(C)},
    )
    kept = load_arrays(state, "momentum", "c-i")
    for name in C:
        np.testing.assert_array_equal(kept[name], C_I[name].numpy())
        assert not result.run.reply_records["momentum.dc"][name].numpy().any()


def test_zero_control_variates_equal_the_plain_client_exactly():
    plain, _, _ = _train([])
    zero = {k: torch.zeros_like(v) for k, v in C.items()}
    scaffold, _, _ = _train([ControlVariate()], {"momentum.c": _record(zero)})
    _close(scaffold, dict(plain.named_parameters()), atol=0)


def test_global_momentum_matches_reference_and_beta_one_is_plain():
    beta = 0.3
    model, _, _ = _train([GlobalMomentum(beta)], {"momentum.g": _record(G)})
    expected, _ = _reference(
        lambda y, g: {n: beta * g[n] + (1 - beta) * G[n] for n in g}
    )
    _close(model, expected)
    plain, _, _ = _train([])
    same, _, _ = _train([GlobalMomentum(1.0)], {"momentum.g": _record(G)})
    _close(same, dict(plain.named_parameters()), atol=0)
    first_round, _, _ = _train([GlobalMomentum(beta)])  # no g yet: plain steps
    _close(first_round, dict(plain.named_parameters()), atol=0)


def test_scaffold_m_scales_the_corrected_gradient():
    beta = 0.4
    incoming = {"momentum.c": _record(C), "momentum.g": _record(G)}
    model, _, _ = _train([ControlVariate(), GlobalMomentum(beta)], incoming)
    expected, _ = _reference(
        lambda y, g: {n: beta * (g[n] + C[n]) + (1 - beta) * G[n] for n in g}
    )
    _close(model, expected)


def test_storm_matches_reference():
    beta = 0.2
    x_prev = _random_like(6)
    model, _, _ = _train(
        [StormMomentum(beta)],
        {"momentum.g": _record(G), "momentum.x-prev": _record(x_prev)},
    )
    probe = _model()
    prev_grad = _grads(probe, x_prev)  # full batch: the same at every step
    expected, _ = _reference(
        lambda y, g: {n: g[n] + (1 - beta) * (G[n] - prev_grad[n]) for n in g}
    )
    _close(model, expected)


def test_storm_leaves_batchnorm_statistics_to_the_real_step():
    def net():
        torch.manual_seed(1)
        return torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
        ).double()

    g = {n: torch.zeros_like(p) for n, p in net().named_parameters()}
    x_prev = {n: p.detach() + 1.0 for n, p in net().named_parameters()}
    model, _, _ = _train(
        [StormMomentum(0.5)],
        {"momentum.g": _record(g), "momentum.x-prev": _record(x_prev)},
        model=net(),
    )
    assert int(model[1].num_batches_tracked) == K  # one tracked pass per step


def test_make_hooks_composition():
    def kinds(config):
        return [type(h) for h in make_hooks(config)]

    assert kinds({}) == [EtaK]
    assert kinds({"momentum.scaffold": True}) == [ControlVariate]
    assert kinds({"momentum.beta": 0.1}) == [GlobalMomentum]
    assert kinds({"momentum.beta": 0.1, "momentum.scaffold": True}) == [
        ControlVariate,
        GlobalMomentum,
    ]
    assert kinds({"momentum.beta": 0.1, "momentum.vr": True}) == [StormMomentum]


FAST = {"local-epochs": 1, "fraction-evaluate": 0.0, "momentum": 0.0, "seed": 3}


def test_server_c_is_the_mean_of_all_client_c_i(tmp_path):
    # Partial participation: c = (1/N) sum_i c_i over ALL N nodes (unsampled = 0).
    config = {
        **FAST,
        "algorithm": "scaffold",
        "num-server-rounds": 3,
        "fraction-train": 0.5,
        "output-dir": str(tmp_path),
    }
    _, path, grid = run_inprocess(config, num_nodes=4)
    server_c = load_state(path / "checkpoint").strategy["c"]
    assert server_c
    per_node = [
        load_arrays(ctx.state, "momentum", "c-i") for ctx in grid.contexts.values()
    ]
    assert sum(c is not None for c in per_node) >= 2
    for name, value in server_c.items():
        clients = [
            c[name] if c and name in c else np.zeros_like(value) for c in per_node
        ]
        np.testing.assert_allclose(value, np.mean(clients, axis=0), atol=1e-6)


@pytest.mark.parametrize(
    "name", ["scaffold", "fedavg-m", "scaffold-m", "fedavg-m-vr", "scaffold-m-vr"]
)
def test_every_variant_runs_without_dropped_replies(tmp_path, name):
    config = {**FAST, "algorithm": name, "num-server-rounds": 2}
    _, path, grid = run_inprocess({**config, "output-dir": str(tmp_path)}, num_nodes=3)
    rows = json.loads((path / "metrics.json").read_text())["rounds"][1:]
    assert [r["train-replies"] for r in rows] == [3, 3]
    assert [r["train-dropped"] for r in rows] == [0, 0]
    state = load_state(path / "checkpoint").strategy
    assert bool(state["c"]) == name.startswith("scaffold")
    assert bool(state["g"]) == (name != "scaffold")
    assert bool(state["x_prev"]) == name.endswith("-vr")
    has_c_i = [
        load_arrays(c.state, "momentum", "c-i") is not None
        for c in grid.contexts.values()
    ]
    assert all(has_c_i) == name.startswith("scaffold")


def test_resume_with_persistent_nodes_matches_uninterrupted_run(tmp_path):
    config = {
        **app_defaults(),
        **FAST,
        "algorithm": "scaffold-m-vr",
        "num-server-rounds": 4,
        "output-dir": str(tmp_path),
    }
    full, _, _ = run_inprocess(config, num_nodes=3)
    grid = InProcessGrid(client_app, 3, config)
    _, path = run_server(grid, {**config, "num-server-rounds": 2}, settle=0.0)
    assert all(isinstance(c.state, RecordDict) for c in grid.contexts.values())
    resumed, _ = run_server(grid, {**config, "resume": str(path)}, settle=0.0)
    for key, value in full.arrays.items():
        np.testing.assert_array_equal(value.numpy(), resumed.arrays[key].numpy())
    # Fresh nodes (client state lost, c_i = 0) give a different model.
    cold = InProcessGrid(client_app, 3, config)
    _, path2 = run_server(cold, {**config, "num-server-rounds": 2}, settle=0.0)
    cold = InProcessGrid(client_app, 3, config)
    other, _ = run_server(cold, {**config, "resume": str(path2)}, settle=0.0)
    assert any(
        not np.array_equal(v.numpy(), other.arrays[k].numpy())
        for k, v in full.arrays.items()
    )
