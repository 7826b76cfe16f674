"""DFedSAM(-MGS): the gossip-step schedule, mix-only exchanges, and a run."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.dfedsam import make_hooks
from bouquet.clientapps.recipes.dpsgd import GossipMix
from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies.context import RoundContext
from bouquet.strategies.dfedsam import DFedSAM
from bouquet.tasks import wire


def _ctx(server_round):
    return RoundContext(server_round, None, "train", (1, 2), (), {}, {}, 0, {"lr": 0.1})


def test_mgs_trains_every_q_th_exchange_with_the_decayed_rate():
    strategy = DFedSAM(gossip_steps=3, lr_decay=0.5)
    configs = [strategy.round_config(_ctx(r)) for r in range(1, 8)]
    assert [c[wire.GOSSIP_TRAIN] for c in configs] == [1, 0, 0, 1, 0, 0, 1]
    assert [c.get(wire.LR) for c in configs] == [
        0.1, None, None, 0.05, None, None, 0.025
    ]  # fmt: skip
    plain = DFedSAM()  # Q = 1: every exchange trains
    assert all(plain.round_config(_ctx(r))[wire.GOSSIP_TRAIN] for r in range(1, 4))


def test_a_gossip_step_mixes_and_takes_no_local_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    other = {k: torch.ones_like(v) for k, v in own.items()}
    incoming = {wire.gossip_neighbor(0): ArrayRecord(other)}
    x, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
    state = {"bouquet.personal": "held"}
    result = train_local(
        model,
        (x, y),
        TrainSettings(epochs=1, batch_size=4, lr=0.5),
        [GossipMix([0.25, 0.75], train=False)],
        generator=torch.Generator().manual_seed(0),
        state=state,
        incoming=incoming,
    )
    assert result.steps == 0
    for key, value in model.state_dict().items():
        expected = 0.25 * own[key] + 0.75 * other[key]
        torch.testing.assert_close(value, expected)
    reply = result.run.reply_records[wire.GOSSIP_MODEL]
    np.testing.assert_allclose(reply["weight"].numpy(), model.weight.detach().numpy())


def test_the_recipe_reads_rho_and_the_train_flag():
    hooks = make_hooks(
        {wire.GOSSIP_WEIGHTS: [1.0], wire.GOSSIP_TRAIN: False, "dfedsam.rho": 0.1}
    )
    assert not hooks[0].train and hooks[1].rho == 0.1


def test_mgs_run_mixes_between_trainings_and_consensus_shrinks(tmp_path):
    config = {
        "algorithm": "dfedsam",
        "dfedsam.gossip-steps": 2,
        "num-server-rounds": 3,
        "local-steps": 3,
        "model": "mlp",
        "seed": 2,
        "fraction-evaluate": 0.0,
        "plot": False,
        "output-dir": str(tmp_path),
    }
    _, path, _ = run_inprocess(config, num_nodes=4)
    rows = json.loads((path / "metrics.json").read_text())["rounds"][1:]
    assert [r["train-loss"] is not None for r in rows] == [True, False, True]
    assert [r["train-replies"] for r in rows] == [4, 4, 4]
    # A gossip step with a doubly stochastic W never increases the distance.
    distances = [r["train-consensus-distance"] for r in rows]
    assert 0 < distances[1] < distances[0]
    assert rows[1]["train-gossip-bytes-per-node"] > 0


def test_rho_zero_one_step_no_decay_is_dpsgd_by_declaration():
    (reduction,) = DFedSAM.reductions
    assert reduction.equals == "dpsgd" and reduction.settings["rho"] == 0.0
    with pytest.raises(ValueError, match="gossip-steps"):
        DFedSAM(gossip_steps=0)


def test_one_round_is_the_gossip_step_then_a_sam_step_by_hand():
    """No official code to run (module docstring): the paper's equations instead.

    ``z = sum_j W_ij x_j``, ``g = grad F_i(z)``, ``e = rho g / ||g||``,
    ``x_i <- z - eta grad F_i(z + e)`` on a linear model with a quadratic loss.
    """
    a = np.array([[1.0, 2.0], [0.5, -1.0], [-2.0, 0.25]])
    b = np.array([1.0, -0.5, 2.0])
    own, other = np.array([0.3, -0.2]), np.array([1.0, 0.6])
    weights, rho, eta = [0.25, 0.75], 0.05, 0.1
    model = torch.nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(own[None]))
    incoming = {
        wire.gossip_neighbor(0): ArrayRecord({"weight": torch.from_numpy(other[None])})
    }
    config = {wire.GOSSIP_WEIGHTS: weights, wire.GOSSIP_TRAIN: True, "dfedsam.rho": rho}
    train_local(
        model,
        (torch.from_numpy(a), torch.from_numpy(b)),
        TrainSettings(batch_size=3, max_steps=1, lr=eta),
        make_hooks(config),
        generator=torch.Generator().manual_seed(0),
        config=config,
        state={"bouquet.personal": "held"},  # the node holds its model
        incoming=incoming,
        loss=lambda out, y: 0.5 * ((out.squeeze(-1) - y) ** 2).mean(),
    )

    def grad(w):
        return a.T @ (a @ w - b) / len(b)

    z = weights[0] * own + weights[1] * other
    g = grad(z)
    # The shared SAM hook guards the norm with + 1e-7 (as SAM's reference code).
    expected = z - eta * grad(z + rho * g / (np.linalg.norm(g) + 1e-7))
    np.testing.assert_allclose(model.weight.detach().numpy()[0], expected, rtol=1e-12)
