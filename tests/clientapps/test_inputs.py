"""What train_client takes: data in the shapes users have, their settings,
optimizer and loss (clientapps/inputs.py, clientapps/routine.py)."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from torch.utils.data import DataLoader, TensorDataset

from bouquet.clientapps import train_client
from bouquet.clientapps.inputs import as_tensors
from bouquet.simulations.inprocess import ensure_task_identity, give_id
from bouquet.tasks import wire

X = torch.arange(40, dtype=torch.float32).reshape(10, 4) / 40
Y = torch.tensor([0, 1] * 5)


def _same(pair):
    x, y = pair
    order = torch.argsort(x[:, 0])
    torch.testing.assert_close(x[order], X)
    torch.testing.assert_close(y[order], Y)


@pytest.mark.parametrize(
    "data",
    [
        (X, Y),
        (X.numpy(), Y.numpy()),
        TensorDataset(X, Y),
        DataLoader(TensorDataset(X, Y), batch_size=3, shuffle=True),
        [(X[:4], Y[:4]), (X[4:], Y[4:])],
        DataLoader(
            Dataset.from_dict({"img": X.tolist(), "label": Y.tolist()}).with_format(
                "torch"
            ),
            batch_size=4,
        ),
        Dataset.from_dict({"img": X.tolist(), "label": Y.tolist()}).with_format(
            "torch"
        ),
    ],
    ids=[
        "tensors",
        "arrays",
        "dataset",
        "loader",
        "batches",
        "hf-loader",
        "hf-dataset",
    ],
)
def test_every_shape_of_data_reads_as_the_same_tensors(data):
    _same(as_tensors(data))


def test_mapping_batches_name_their_keys_when_ambiguous():
    batches = [{"a": X, "b": X, "label": Y}]
    with pytest.raises(ValueError, match="batch_keys"):
        as_tensors(batches)
    _same(as_tensors(batches, batch_keys=("b", "label")))
    with pytest.raises(KeyError, match="no \\['image'\\]"):
        as_tensors(batches, batch_keys=("image", "label"))
    with pytest.raises(ValueError, match="no example"):
        as_tensors(DataLoader(TensorDataset(X[:0], Y[:0])))
    with pytest.raises(TypeError, match="must be"):
        as_tensors(42)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


def _msg(config: dict) -> Message:
    ensure_task_identity()
    msg = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(_net().state_dict()),
                "config": ConfigRecord(
                    {"server-round": 1, "seed": 1, "batch-size": 2, **config}
                ),
            }
        ),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    give_id(msg)
    return msg


def _ctx(run_config: dict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0},
        state=RecordDict(),
        run_config=run_config or {},
    )


def _weights(reply: Message) -> np.ndarray:
    return reply.content["arrays"]["weight"].numpy()


def test_a_loader_trains_exactly_as_its_tensors_and_replays_when_shuffled():
    loader = DataLoader(TensorDataset(X, Y), batch_size=3)
    by_loader = train_client(_msg({}), _ctx(), _net(), loader)
    by_tensors = train_client(_msg({}), _ctx(), _net(), (X, Y))
    np.testing.assert_array_equal(_weights(by_loader), _weights(by_tensors))
    # A shuffling loader is read under the call's seed: the update replays.
    shuffled = DataLoader(TensorDataset(X, Y), batch_size=3, shuffle=True)
    first = train_client(_msg({}), _ctx(), _net(), shuffled)
    torch.manual_seed(123)  # the caller's global RNG does not matter
    again = train_client(_msg({}), _ctx(), _net(), shuffled)
    np.testing.assert_array_equal(_weights(first), _weights(again))


def test_settings_come_from_the_message_then_the_run_config_then_defaults():
    def trained(config, run_config, defaults):
        reply = train_client(
            _msg(config), _ctx(run_config), _net(), (X, Y), defaults=defaults
        )
        return _weights(reply)

    base = trained({"momentum": 0.5}, {}, None)
    # The message wins over the run config and the user's defaults ...
    np.testing.assert_array_equal(
        trained({"momentum": 0.5}, {"momentum": 0.9}, {"momentum": 0.0}), base
    )
    # ... the run config over the defaults, and defaults over Bouquet's.
    np.testing.assert_array_equal(
        trained({}, {"momentum": 0.5}, {"momentum": 0.0}), base
    )
    np.testing.assert_array_equal(trained({}, {}, {"momentum": 0.5}), base)
    assert not np.array_equal(trained({}, {}, None), base)  # Bouquet's momentum 0
    with pytest.raises(ValueError, match="not local-training settings"):
        trained({}, {}, {"learning-rate": 0.1})


def test_a_user_optimizer_and_loss_replace_the_configured_ones():
    config = {"lr": 0.1, "momentum": 0.0}

    def sgd(params):
        return torch.optim.SGD(params, lr=0.1)

    same = train_client(_msg(config), _ctx(), _net(), (X, Y), optimizer=sgd)
    configured = train_client(_msg(config), _ctx(), _net(), (X, Y))
    np.testing.assert_allclose(_weights(same), _weights(configured), rtol=1e-6)

    def adam(params):
        return torch.optim.Adam(params, lr=0.1)

    other = train_client(_msg(config), _ctx(), _net(), (X, Y), optimizer=adam)
    assert not np.allclose(_weights(other), _weights(configured))

    def zero_loss(logits, y):
        return (logits * 0).sum()

    still = train_client(_msg(config), _ctx(), _net(), (X, Y), loss=zero_loss)
    np.testing.assert_array_equal(_weights(still), _net().weight.detach().numpy())


def test_routines_whose_math_assumes_the_configured_sgd_refuse_a_user_optimizer():
    msg = _msg({"client-routine": "momentum", "momentum.scaffold": True})
    with pytest.raises(ValueError, match="pass no optimizer"):
        train_client(
            msg,
            _ctx(),
            _net(),
            (X, Y),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        )


def test_client_side_dp_clips_the_update_only():
    clip = 1e-3
    sent = _net().state_dict()
    reply = train_client(
        _msg({wire.DP_CLIPPING_NORM: clip, "lr": 0.5}), _ctx(), _net(), (X, Y)
    )
    update = np.concatenate(
        [(reply.content["arrays"][k].numpy() - sent[k].numpy()).ravel() for k in sent]
    )
    assert np.linalg.norm(update) == pytest.approx(clip, rel=1e-4)
