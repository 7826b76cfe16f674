"""Local-only: the gossip relay without edges; each node keeps only its own model."""

import numpy as np
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

from bouquet.clientapps.routine import PERSONAL_STATE, train_client
from bouquet.clientapps.state import load_arrays
from bouquet.simulations.inprocess import ensure_task_identity
from bouquet.strategies.context import RoundContext
from bouquet.strategies.gossip import STATE
from bouquet.strategies.local_only import LocalOnly
from bouquet.tasks import wire

NODES = (10, 11, 12)
INITIAL = {"weight": np.zeros((1, 3), np.float32)}


def _ctx(server_round: int) -> RoundContext:
    return RoundContext(
        server_round=server_round,
        num_rounds=None,
        phase="train",
        nodes=NODES,
        sampled=(),
        arrays=INITIAL,
        config={wire.SERVER_ROUND: server_round},
    )


def test_every_node_gets_the_initial_model_its_own_weight_and_no_neighbour():
    strategy = LocalOnly()
    strategy.recipients(_ctx(1))
    held = {str(v): {"weight": np.full((1, 3), v, np.float32)} for v in range(3)}
    strategy.state[STATE] = {**strategy.state[STATE], "models": held}
    plan = strategy.recipients(_ctx(2))
    assert sorted(plan) == list(NODES)
    for content in plan.values():
        assert content[wire.CONFIG][wire.GOSSIP_WEIGHTS] == [1.0]
        np.testing.assert_array_equal(content[wire.ARRAYS]["weight"].numpy(), 0.0)
        assert not [k for k in content if k.startswith("gossip.neighbor")]


def _train(context: Context, config: dict) -> Message:
    ensure_task_identity()
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(nn.Linear(3, 2).state_dict()),
            wire.CONFIG: ConfigRecord(config),
        }
    )
    msg = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    return train_client(msg, context, model, (x, (x[:, 0] > 0).long()))


def test_the_node_trains_on_from_its_own_model_whatever_arrays_say():
    config = {
        wire.ROUTINE: "dpsgd",
        wire.PERSONAL: ["*"],
        wire.GOSSIP_WEIGHTS: [1.0],
        wire.SEED: 1,
        wire.SERVER_ROUND: 1,
        wire.LOCAL_STEPS: 2,
        wire.LR: 0.1,
    }
    context = Context(1, 1, {wire.PARTITION_ID: 0}, RecordDict(), {})
    _train(context, config)
    first = load_arrays(context.state, *PERSONAL_STATE)
    reply = _train(context, {**config, wire.SERVER_ROUND: 2})
    second = load_arrays(context.state, *PERSONAL_STATE)
    assert len(reply.content[wire.ARRAYS]) == 0  # nothing aggregated
    # round 2 moved on from round 1's model, not from the arrays sent
    fresh = Context(1, 1, {wire.PARTITION_ID: 0}, RecordDict(), {})
    _train(fresh, {**config, wire.SERVER_ROUND: 2})
    restarted = load_arrays(fresh.state, *PERSONAL_STATE)
    assert not np.allclose(second["weight"], first["weight"])
    assert not np.allclose(second["weight"], restarted["weight"])
