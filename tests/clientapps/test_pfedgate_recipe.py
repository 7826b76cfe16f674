"""pFedGate's client: one step against a hand-written reference; the gate stays home."""

import numpy as np
import pytest
import torch
from flwr.app import Message
from torch import nn

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.pfedgate import KEPT_FRACTION, make_hooks
from bouquet.simulations.inprocess import run_inprocess
from bouquet.tasks import wire
from bouquet.tasks.gating import GatedModel

CONFIG = {
    "pfedgate.sparse-factor": 0.5,
    "pfedgate.lr-gating": 0.3,
    "pfedgate.grad-clip": 0.5,
}


def _model() -> GatedModel:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    return GatedModel(base, (6,), split=3)


def test_one_step_equals_the_reference():
    # Prepare: one full batch, so the order does not matter.
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    model, reference = _model(), _model()
    lr = 0.1
    # Execute
    result = train_local(
        model,
        (x, y),
        TrainSettings(epochs=1, batch_size=8, lr=lr),
        make_hooks(CONFIG),
        generator=torch.Generator().manual_seed(0),
    )
    # Reference: s into the gate, CE of the gated model, clip the gate's and
    # the model's gradients apart at 0.5, gate step lr-gating, model step lr.
    reference.gate.sparse_factor.fill_(0.5)
    reference.train()
    loss = nn.functional.cross_entropy(reference(x), y)
    loss.backward()
    gate = list(reference.gate.parameters())
    base = list(reference.base.parameters())
    torch.nn.utils.clip_grad_norm_(gate, 0.5)
    torch.nn.utils.clip_grad_norm_(base, 0.5)
    with torch.no_grad():
        for p in gate:
            p -= 0.3 * p.grad
        for p in base:
            p -= lr * p.grad
    # Assert
    assert result.loss_first == pytest.approx(float(loss.detach()))
    for (name, got), want in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, msg=name)
    assert 0 < result.run.metrics[KEPT_FRACTION] < 1


def test_a_model_without_the_gate_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    with pytest.raises(ConfigError, match="model-wrapper"):
        train_local(
            model,
            (torch.randn(4, 6), torch.tensor([0, 1, 2, 0])),
            TrainSettings(),
            make_hooks(CONFIG),
            generator=torch.Generator().manual_seed(0),
        )


def test_the_gate_is_personal_and_kept_in_the_node_state(tmp_path):
    seen: list[Message] = []

    def client(msg, context):
        from bouquet.clientapps.app import app

        reply = app(msg, context)
        if msg.metadata.message_type == "train":
            seen.append(reply)
        return reply

    config = {
        "algorithm": "pfedgate",
        "num-server-rounds": 2,
        "local-steps": 2,
        "plot": False,
        "output-dir": str(tmp_path),
    }
    result, _, grid = run_inprocess(config, num_nodes=3, client_app=client)
    gate = [k for k in result.arrays.keys() if k.startswith("gate.")]
    assert gate and all(k.startswith("base.") for k in result.arrays if k not in gate)
    for reply in seen:
        assert not set(gate) & set(reply.content[wire.ARRAYS].keys())
    kept = [ctx.state["bouquet.personal"] for ctx in grid.contexts.values()]
    assert all(set(k.keys()) == set(gate) for k in kept)
    budgets = {float(k["gate.sparse_factor"].numpy()) for k in kept}
    assert budgets == {0.5}
    # The server's gate is off (dense global model) and never aggregated.
    assert float(result.arrays["gate.sparse_factor"].numpy()) == 0.0
    a, b = (k["gate.linear.weight"].numpy() for k in kept[:2])
    assert not np.array_equal(a, b)
