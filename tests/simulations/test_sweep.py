"""Sweeps: one table and the comparison plots, against rounds and against bytes."""

from bouquet.simulations.plotting import BYTES_SO_FAR, with_bytes_so_far
from bouquet.simulations.sweep import client_seconds, run_sweep


def test_bytes_so_far_is_the_running_sum_of_both_directions():
    rows = [
        {"round": 0},
        {"round": 1, "bytes-sent": 10, "bytes-received": 5},
        {"round": 2, "bytes-sent": 10, "bytes-received": 7},
    ]
    assert [r[BYTES_SO_FAR] for r in with_bytes_so_far(rows)] == [0, 15, 32]


def test_client_time_is_the_mean_summed_handler_time_of_trained_rounds():
    rows = [
        {"round": 0, "client-time-total": 9.0},
        {"round": 1, "client-time-total": 1.0},
        {"round": 2, "client-time-total": 3.0},
        {"round": 3},
    ]
    assert client_seconds(rows) == 2.0
    assert client_seconds([{"round": 1}]) is None


def test_a_sweep_writes_its_table_and_both_plots(tmp_path):
    config = tmp_path / "fedavg.toml"
    config.write_text(
        'algorithm = "fedavg"\nnum-server-rounds = 2\nlocal-steps = 2\n'
        "fraction-evaluate = 0.0\n\n[sweep]\nseeds = [0]\nnum-nodes = 2\n"
    )
    records = run_sweep([config], tmp_path / "out")
    assert len(records) == 1 and records[0]["bytes-received"] > 0
    assert records[0]["client-time-per-round"] > 0
    for name in ("results.csv", "results.md", "comparison.png", "comparison-bytes.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
