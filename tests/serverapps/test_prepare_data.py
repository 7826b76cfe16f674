"""In simulation the ServerApp fills the nodes' partition cache before round 1."""

from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from bouquet.serverapps.run import prepare_client_data
from bouquet.simulations.inprocess import InProcessGrid
from bouquet.tasks import DataSpec
from bouquet.tasks.data import partitions_dir


def test_simulation_grid_gets_every_partition_built(tmp_path, monkeypatch):
    monkeypatch.setenv("BOUQUET_CACHE_DIR", str(tmp_path))
    config = {"dataset": "digits", "partitioner": "iid"}
    folder = partitions_dir(DataSpec.from_run_config(config, num_partitions=4))
    simulation = object.__new__(InMemoryGrid)  # only its type matters here
    assert prepare_client_data(simulation, config, 4)
    assert sorted(p.name for p in folder.glob("partition-*.pt")) == [
        f"partition-{i}.pt" for i in range(4)
    ]


def test_other_grids_build_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("BOUQUET_CACHE_DIR", str(tmp_path))
    grid = InProcessGrid(lambda msg, ctx: msg, 2, {})
    assert not prepare_client_data(grid, {"dataset": "digits"}, 2)
    assert not list(tmp_path.rglob("partition-*.pt"))


def test_a_failed_build_stops_the_run_with_a_clear_error(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setenv("BOUQUET_CACHE_DIR", str(tmp_path))
    # natural-id over digits' labels gives 10 partitions, not 4
    config = {"dataset": "digits", "partitioner": "natural-id"}
    simulation = object.__new__(InMemoryGrid)
    with pytest.raises(
        RuntimeError, match=r"Preparing the nodes' data failed .*: \w*Error: .*4"
    ):
        prepare_client_data(simulation, config, 4)


def test_build_entry_point_names_its_usage():
    import pytest

    from bouquet.tasks.data import main

    with pytest.raises(SystemExit, match=r"usage: python -m bouquet\.tasks\.data"):
        main([])
