"""``finetune-steps``: local fine-tuning of a copy before personalised evaluation."""

import copy

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from torch import nn

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.routine import evaluate_client
from bouquet.simulations.inprocess import ensure_task_identity
from bouquet.tasks import wire

torch.manual_seed(0)
X = torch.randn(12, 3)
Y = (X[:, 0] > 0).long()
TEST_X, TEST_Y = torch.randn(8, 3), torch.arange(8) % 2


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 2))


def _message(config: dict) -> Message:
    ensure_task_identity()
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(_model().state_dict()),
            wire.CONFIG: ConfigRecord({wire.SEED: 3, wire.SERVER_ROUND: 1, **config}),
        }
    )
    return Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)


def _evaluate(config: dict, model: nn.Module | None = None, train=(X, Y)) -> dict:
    context = Context(1, 1, {wire.PARTITION_ID: 0}, RecordDict(), {})
    reply = evaluate_client(
        _message(config),
        context,
        model or _model(),
        (TEST_X, TEST_Y),
        train_data=train,
    )
    assert not context.state  # nothing of the fine-tuning is kept
    return dict(reply.content[wire.METRICS])


def test_finetuned_copy_is_the_step_by_step_reference():
    # Prepare: full-batch plain gradient descent, 3 steps (batch order is
    # irrelevant to a mean loss over the whole batch).
    config = {
        wire.FINETUNE_STEPS: 3,
        wire.BATCH_SIZE: 12,
        wire.LR: 0.5,
        wire.MOMENTUM: 0.0,
    }
    reference = _model()
    for _ in range(3):
        reference.zero_grad()
        nn.functional.cross_entropy(reference(X), Y).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= 0.5 * p.grad
    with torch.no_grad():
        expected = nn.functional.cross_entropy(reference(TEST_X), TEST_Y).item()

    # Execute
    lent = _model()
    before = copy.deepcopy(lent.state_dict())
    metrics = _evaluate(config, lent)

    # Assert: the copy was evaluated; the model the app lent is unchanged
    assert metrics[wire.EVAL_LOSS] == pytest.approx(expected, rel=1e-5)
    plain = _evaluate({})
    assert metrics[wire.EVAL_LOSS] != pytest.approx(plain[wire.EVAL_LOSS])
    for key, value in lent.state_dict().items():
        assert torch.equal(value, before[key])


def test_zero_steps_needs_no_train_data_and_more_does():
    plain = _evaluate({wire.FINETUNE_STEPS: 0}, train=None)
    assert plain == _evaluate({}, train=None)
    with pytest.raises(ValueError, match="train_data"):
        _evaluate({wire.FINETUNE_STEPS: 2}, train=None)
    with pytest.raises(ConfigError, match=wire.FINETUNE_STEPS):
        _evaluate({wire.FINETUNE_STEPS: -1})


def test_minibatch_finetuning_is_seeded():
    config = {wire.FINETUNE_STEPS: 4, wire.BATCH_SIZE: 4, wire.LR: 0.3}
    first, again = _evaluate(config), _evaluate(config)
    assert first == again
    assert np.isfinite(first[wire.EVAL_LOSS])


def test_the_serverapp_sends_it_with_the_training_settings():
    from bouquet.serverapps.settings import evaluate_settings

    assert evaluate_settings({}) == {}
    sent = evaluate_settings({wire.FINETUNE_STEPS: 5, wire.LR: 0.01})
    assert sent[wire.FINETUNE_STEPS] == 5 and sent[wire.LR] == 0.01
    assert set(wire.TRAIN_SETTINGS) <= set(sent)
