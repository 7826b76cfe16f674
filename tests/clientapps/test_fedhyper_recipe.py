"""FedHyper-CL on the one loop: golden multipliers, the lr sequence, reductions."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.fedhyper import (
    GLOBAL_UPDATE,
    LocalLrScheduler,
    make_hooks,
    multiplier,
)
from bouquet.simulations.inprocess import run_inprocess

T = torch.tensor


def test_multiplier_golden_values():
    # x = .1 * <(1,0),(2,0)> / 10 = .02, y = <(1,0),(.5,0)> = .5: gamma capped at 1.1
    assert multiplier(
        1.0, T([1.0, 0]), T([0.5, 0]), T([2.0, 0]), num_sampled=10
    ) == pytest.approx(1.1)
    # x = .1 * .1 / 10 = .001, y = .1 * .2 = .02: gamma = 1.021, beta 2 -> 2.042
    assert multiplier(
        2.0, T([0.1, 0]), T([0.2, 0]), T([1.0, 0]), num_sampled=10
    ) == pytest.approx(2.042)
    # opposing steps: gamma = 1 - 3 < 0 -> beta clipped at .1; huge beta capped at 10
    assert (
        multiplier(1.0, T([1.0, 0]), T([-3.0, 0]), T([0.0, 0]), num_sampled=10) == 0.1
    )
    assert (
        multiplier(9.9, T([1.0, 0]), T([1.0, 0]), T([0.0, 0]), num_sampled=10) == 10.0
    )
    # hypergradient step size 0: beta never moves
    assert (
        multiplier(
            1.0, T([1.0, 0]), T([9.0, 0]), T([0.0, 0]), num_sampled=1, hypergrad_lr=0.0
        )
        == 1.0
    )


class Recorder(Hook):
    """Records the lr each step used and the parameters after it."""

    def __init__(self):
        self.lrs, self.params = [], []

    def before_step(self, run):
        self.lrs.append(run.optimizer.param_groups[0]["lr"])

    def after_step(self, run):
        self.params.append(
            torch.cat([p.detach().reshape(-1) for p in run.parameters]).double()
        )


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(24, 3, generator=gen), torch.randint(0, 2, (24,), generator=gen)


def _train(hooks, model, incoming, epochs=2):
    return train_local(
        model,
        _data(),
        TrainSettings(epochs=epochs, batch_size=6, lr=0.5),
        hooks,
        generator=torch.Generator().manual_seed(1),
        incoming=incoming,
    )


def _model():
    torch.manual_seed(3)
    return torch.nn.Linear(3, 2)


def _incoming(model, scale=0.3):
    update = {
        n: np.full(tuple(p.shape), scale, np.float32)
        for n, p in model.named_parameters()
    }
    return RecordDict(
        {GLOBAL_UPDATE: ArrayRecord({k: Array(v) for k, v in update.items()})}
    )


CONFIG = {"fedhyper.client-scheduler": True, "fedhyper.num-sampled": 4}


def test_lr_sequence_matches_the_official_rule_written_out():
    model = _model()
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    incoming = _incoming(model)
    recorder = Recorder()
    result = _train([recorder, *make_hooks(CONFIG)], model, incoming, epochs=2)
    # Reference: 4 steps per epoch; the first step of each epoch is not counted.
    delta = torch.full_like(start, float(np.float32(0.3)))
    last, u_prev, beta, expected = start, delta, 1.0, [0.5]
    for k, params in enumerate(recorder.params):
        u = params - last
        last = params
        if k % 4 != 0:
            gamma = min(1.1, 1 + 0.1 * float(u @ delta) / 4 + float(u @ u_prev))
            beta = min(max(gamma * beta, 0.1), 10.0)
            u_prev = u
        expected.append(0.5 * beta)
    assert recorder.lrs == pytest.approx(expected[:-1], rel=1e-12)
    assert len(set(recorder.lrs)) > 2  # the schedule really moved
    assert result.run.metrics["fedhyper.beta"] == pytest.approx(beta)


def test_hypergradient_step_zero_equals_plain_sgd_exactly():
    states = []
    for hooks in ([], make_hooks({**CONFIG, "fedhyper.hypergrad-lr": 0.0})):
        model = _model()
        _train(hooks, model, _incoming(model))
        states.append(model.state_dict())
    for key, value in states[0].items():
        torch.testing.assert_close(value, states[1][key], rtol=0, atol=0)


def test_recipe_is_off_unless_enabled_and_needs_the_record():
    assert (
        make_hooks({}) == [] and make_hooks({"fedhyper.client-scheduler": False}) == []
    )
    assert isinstance(make_hooks(CONFIG)[0], LocalLrScheduler)
    with pytest.raises(ValueError, match="global-update"):
        _train(make_hooks(CONFIG), _model(), RecordDict())


def test_inprocess_clients_receive_the_previous_global_update(tmp_path):
    from bouquet.clientapps.app import app

    seen = []

    def spy(msg, context):
        if GLOBAL_UPDATE in msg.content:
            seen.append(
                (
                    int(msg.content["config"]["server-round"]),
                    {k: v.numpy() for k, v in msg.content["arrays"].items()},
                    {k: v.numpy() for k, v in msg.content[GLOBAL_UPDATE].items()},
                )
            )
        return app(msg, context)

    config = {
        "algorithm": "fedhyper",
        "fedhyper.scheduler": "full",
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "output-dir": str(tmp_path),
        "model": "logreg",
        "local-epochs": 1,
        "lr": 0.05,
    }
    result, _, _ = run_inprocess(config, num_nodes=2, client_app=spy)
    (r1, x1, d1), (r2, x2, d2) = seen[0], seen[-1]
    assert (r1, r2) == (1, 2) and not any(v.any() for v in d1.values())
    # full = gm on the server: round 1 is FedAvg, so Delta_1 = x_2 - x_1
    for key, value in d2.items():
        np.testing.assert_allclose(value, x2[key] - x1[key], rtol=1e-5, atol=1e-7)
    assert result.train_metrics_clientapp[2]["fedhyper.beta"] != 1.0
