"""Per-process memory of partitions and models (tasks/memo.py)."""

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

from bouquet.clientapps.app import app as client_app
from bouquet.simulations.inprocess import ensure_task_identity, give_id
from bouquet.tasks import DataSpec, build_model, dataset_info
from bouquet.tasks.memo import MODELS, PARTITIONS, ModelPool, TensorMemo


def test_tensor_memo_is_bounded_and_least_recently_used_first_out(monkeypatch):
    monkeypatch.setenv("BOUQUET_MEMO_MB", str(3 * 4 * 1000 / 2**20))  # 3 tensors
    memo, loads = TensorMemo(), []

    def load(i):
        def inner():
            loads.append(i)
            return {"x": torch.zeros(1000)}

        return inner

    for i in (1, 2, 3, 1, 4):  # 4 pushes out the least recently used: 2
        memo.get(i, load(i))
    assert loads == [1, 2, 3, 4]
    memo.get(1, load(1))
    memo.get(2, load(2))
    assert loads == [1, 2, 3, 4, 2]
    assert memo.nbytes <= 3 * 4 * 1000
    monkeypatch.setenv("BOUQUET_MEMO_MB", "0")  # off: every get loads
    memo.clear()
    memo.get(9, load(9))
    memo.get(9, load(9))
    assert loads[-2:] == [9, 9]


def test_model_pool_lends_one_model_per_call_and_resets_it():
    pool, built = ModelPool(), []

    def build():
        built.append(1)
        return torch.nn.Linear(2, 2)

    with pool.borrow("k", build) as first:
        with pool.borrow("k", build) as second:  # lent out: a second one
            assert first is not second
        first.weight.requires_grad_(False)
        first.weight.grad = torch.ones(2, 2)
        first.eval()
    with pool.borrow("k", build) as again:
        assert again in (first, second)
        assert all(p.requires_grad and p.grad is None for p in again.parameters())
        assert again.training
    with pool.borrow("other", build):  # another key never shares
        pass
    assert len(built) == 3


def _train_message(arrays: ArrayRecord) -> Message:
    ensure_task_identity()
    msg = Message(
        RecordDict(
            {
                "arrays": arrays,
                "config": ConfigRecord(
                    {"server-round": 1, "seed": 3, "lr": 0.1, "local-epochs": 1}
                ),
            }
        ),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    give_id(msg)
    return msg


def test_a_remembered_model_and_partition_give_the_cold_reply():
    run_config = {"dataset": "digits", "partitioner": "iid", "model": "cnn"}
    spec = DataSpec.from_run_config(run_config, num_partitions=4)
    arrays = ArrayRecord(build_model("cnn", dataset_info(spec), seed=1).state_dict())

    def reply(node):
        context = Context(
            run_id=7,
            node_id=node,
            node_config={"partition-id": node, "num-partitions": 4},
            state=RecordDict(),
            run_config=run_config,
        )
        out = client_app(_train_message(arrays), context)
        assert not out.has_error(), out.error
        return {k: a.numpy() for k, a in out.content["arrays"].items()}

    MODELS.clear()
    PARTITIONS.clear()
    cold = [reply(0), reply(1)]
    warm = [reply(0), reply(1)]  # the same model object served node 0, then 1
    for a, b in zip(cold, warm, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert PARTITIONS.nbytes > 0
