"""Personal parameters never leave the node; personalised evaluation reports nodes."""

import json

import numpy as np
import pytest
from flwr.app import Message

from bouquet.simulations.inprocess import run_inprocess
from bouquet.tasks import wire
from bouquet.tasks.wire import resolve_personal


def test_resolve_personal_names_the_head_and_globs():
    names = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert resolve_personal(["head"], names) == ["4.weight", "4.bias"]
    assert resolve_personal(["2.*"], names) == ["2.weight", "2.bias"]
    assert resolve_personal(["*.bias", "head"], names) == [
        "0.bias",
        "2.bias",
        "4.weight",
        "4.bias",
    ]
    assert resolve_personal([], names) == []
    resnet = ["conv1.weight", "bn1.running_mean", "fc.weight", "fc.bias"]
    assert resolve_personal(["head"], resnet) == ["fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def personal_run(tmp_path_factory):
    from bouquet.clientapps.app import app

    seen: list[Message] = []

    def client(msg, context):
        reply = app(msg, context)
        if msg.metadata.message_type == "train":
            seen.append(reply)
        return reply

    config = {
        "algorithm": "fedavg",
        "personal-parameters": "head",
        "num-server-rounds": 2,
        "partitioner": "pathological",
        "classes-per-partition": 2,
        "local-epochs": 2,
        "lr": 0.05,
        "plot": False,
        "output-dir": str(tmp_path_factory.mktemp("personal")),
    }
    result, path, grid = run_inprocess(config, num_nodes=4, client_app=client)
    return result, path, grid, seen


def test_personal_entries_stay_on_the_nodes(personal_run):
    from bouquet.tasks import DataSpec, build_model, dataset_info

    result, _, grid, seen = personal_run
    head = resolve_personal(["head"], list(result.arrays.keys()))
    assert head == ["5.weight", "5.bias"]  # mlp: Flatten, Linear, ReLU, ...
    for reply in seen:
        assert not set(head) & set(reply.content[wire.ARRAYS].keys())
    spec = DataSpec(dataset="digits", partitioner="dirichlet", num_partitions=4)
    initial = build_model("mlp", dataset_info(spec), seed=42).state_dict()
    for key in head:  # the server never aggregates them
        np.testing.assert_array_equal(result.arrays[key].numpy(), initial[key].numpy())
    kept = [ctx.state["bouquet.personal"] for ctx in grid.contexts.values()]
    assert all(set(k.keys()) == set(head) for k in kept)
    assert not np.array_equal(kept[0][head[0]].numpy(), kept[1][head[0]].numpy())


def test_personalised_evaluation_reports_mean_and_worst_nodes(personal_run):
    _, path, _, _ = personal_run
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    last = rows[-1]
    assert 0 < last["node-accuracy-worst10"] <= last["node-accuracy-mean"] <= 1
    # Own heads on two-class partitions: nodes do far better than the global
    # model, whose head never trained.
    assert last["node-accuracy-mean"] > last["central-accuracy"] + 0.2
    summary = json.loads((path / "summary.json").read_text())
    assert summary["final-node-accuracy-mean"] == last["node-accuracy-mean"]


def test_arrays_may_leave_out_personal_entries_but_nothing_else():
    import torch
    from flwr.app import Array, ArrayRecord

    from bouquet.clientapps.routine import PERSONAL_STATE, load_model
    from bouquet.clientapps.state import save_arrays

    model = torch.nn.Linear(2, 1)
    held = {"weight": np.full((1, 2), 3.0, np.float32)}
    state: dict = {}
    save_arrays(state, *PERSONAL_STATE, held)
    sent = ArrayRecord({"bias": Array(np.array([5.0], np.float32))})
    load_model(model, sent, ["weight"], state)  # the node holds "weight"
    np.testing.assert_array_equal(model.weight.detach().numpy(), held["weight"])
    np.testing.assert_array_equal(model.bias.detach().numpy(), [5.0])
    with pytest.raises(RuntimeError, match="bias"):  # not personal: must be sent
        load_model(model, ArrayRecord(), ["weight"], state)
