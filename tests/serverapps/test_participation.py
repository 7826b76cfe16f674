"""The participation environment on the in-process runner."""

import numpy as np
import pytest

from bouquet.clientapps.app import app as client_app
from bouquet.serverapps.participation import (
    ParticipationGrid,
    participation_grid,
    participation_spec,
)
from bouquet.serverapps.settings import DEFAULTS
from bouquet.simulations.inprocess import InProcessGrid, app_defaults, run_inprocess
from bouquet.strategies.sampling import Availability, participation_probabilities

RUN = {
    "num-server-rounds": 4,
    "local-steps": 2,
    "fraction-evaluate": 0.0,
    "min-train-nodes": 1,
    "participation": "bernoulli",
    "participation-mean": 0.4,
    "participation-min": 0.1,
    "seed": 5,
}


def _train_calls(grid):
    return [node for node, kind in grid.calls if kind == "train"]


def test_defaults_leave_the_grid_untouched():
    assert DEFAULTS["participation"] == "uniform"
    grid = InProcessGrid(client_app, 3, app_defaults())
    assert participation_grid(grid, app_defaults()) is grid


def test_only_available_nodes_train_and_reply(tmp_path):
    config = {**app_defaults(), **RUN, "output-dir": str(tmp_path)}
    _, path, grid = run_inprocess(config, num_nodes=8)

    # Every node described its data exactly once, before any training.
    assert [k for _, k in grid.calls[:8]] == ["query"] * 8
    assert sum(k == "query" for _, k in grid.calls) == 8

    # The same availability, computed independently from the nodes' labels.
    from bouquet.tasks import DataSpec, load_client_data

    spec = DataSpec.from_run_config(config, num_partitions=8)
    counts = np.stack(
        [
            np.bincount(load_client_data(spec, i).train_y.numpy(), minlength=10)
            for i in range(8)
        ]
    )
    p = participation_probabilities(participation_spec(config), 5, counts)
    availability = Availability(participation_spec(config), p, 5)
    expected = [1000 + i for t in range(1, 5) for i in np.flatnonzero(availability(t))]
    assert sorted(_train_calls(grid)) == sorted(expected)
    assert 0 < len(expected) < 32  # some, not all

    import json

    rows = json.loads((path / "metrics.json").read_text())["rounds"][1:]
    replies = [int(availability(t).sum()) for t in range(1, 5)]
    assert [r["train-replies"] for r in rows] == replies


def test_same_availability_whatever_the_node_ids():
    # Index = partition-id, not node id: shuffled ids give the same pattern.
    config = {**app_defaults(), **RUN}
    spec = participation_spec(config)
    grids = []
    for ids in ([1000, 1001, 1002, 1003], [77, 12, 5, 940]):
        inner = InProcessGrid(client_app, 4, config)
        inner.contexts = dict(zip(ids, inner.contexts.values(), strict=True))
        for node, context in inner.contexts.items():
            context.node_id = node
        wrapped = ParticipationGrid(inner, spec, seed=5)
        by_partition = {
            inner.contexts[n].node_config["partition-id"]: n for n in inner.contexts
        }
        grids.append(
            [
                sorted(
                    inner.contexts[n].node_config["partition-id"]
                    for n in wrapped.available(t, by_partition.values())
                )
                for t in range(1, 30)
            ]
        )
    assert grids[0] == grids[1]


def test_a_client_app_without_a_query_handler_fails_clearly():
    from flwr.clientapp import ClientApp

    bare = ClientApp()
    grid = InProcessGrid(bare, 2, app_defaults())
    wrapped = participation_grid(grid, {**app_defaults(), **RUN})
    with pytest.raises(RuntimeError, match="No node described its data"):
        wrapped.available(1, [1000, 1001])
