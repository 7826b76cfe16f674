"""The benchmark document and the deployment split, on hand-made results."""

import pytest

from bouquet.simulations import bench_suite
from bouquet.simulations.bench_deployment import split


def test_deployment_round_is_split_into_flower_and_ours():
    row = {"wall-time": 10.0, "wait-time": 9.5, "client-time": 6.0}
    assert split(row) == pytest.approx(
        {"round": 10.0, "ours-server": 0.5, "ours-client": 6.0, "flower": 3.5}
    )


RESULTS = {
    "machine": "2 CPUs (test), no GPU",
    "overhead": {
        "workload": {"model": "resnet18", "device": "cpu"},
        "median-s": {"plain": 10.0, "flower": 10.2, "bouquet": 10.4},
        "times-s": {"plain": [9.0, 10.0, 11.0], "flower": [10.2], "bouquet": [10.4]},
        "final-accuracy": {"plain": 0.9, "flower": 0.9, "bouquet": 0.9},
        "bouquet-vs-plain": 1.04,
        "bouquet-vs-flower": 1.0196,
        "ray": [
            {"wall-s": 30.0, "before-round-1-s": 14.0, "final-central-accuracy": 0.9}
        ],
        "ray-rounds-s": [16.0],
        "ray-rounds-vs-plain": 1.6,
    },
    "aggregation": [
        {
            "algorithm": "fedavg",
            "clients": 10,
            "parameters": 100,
            "median-s": 1.0,
            "peak-mb": 1.0,
            "time-ratio": 1.0,
            "memory-ratio": 1.0,
            "flag": False,
        },
        {
            "algorithm": "krum",
            "clients": 10,
            "parameters": 100,
            "median-s": 3.5,
            "peak-mb": 2.0,
            "time-ratio": 3.5,
            "memory-ratio": 2.0,
            "flag": True,
        },
    ],
    "scale": [
        {
            "nodes": 1000,
            "rounds": 20,
            "wall-s": 100.0,
            "before-round-1-s": 20.0,
            "round-median-s": 2.0,
            "round-max-s": 3.0,
            "peak-rss-mb": 9000,
            "peak-pss-mb": 3500,
            "error-replies": 0,
            "round-times-s": [2.0, 3.0],
        },
    ],
    "scale-stretch": [{"nodes": 10000, "rounds": 3, "error": "killed at 19000 MB"}],
    "deployment": {
        "workload": {"model": "cnn"},
        "rounds": 3,
        "round-1": {
            "round": 9.0,
            "flower": 4.0,
            "ours-client": 4.5,
            "ours-server": 0.5,
        },
        "rounds-2+": {
            k: {"median-s": v, "min-s": v, "max-s": v}
            for k, v in {
                "round": 8.0,
                "flower": 3.0,
                "ours-client": 4.5,
                "ours-server": 0.5,
            }.items()
        },
    },
}


def test_document_marks_targets_and_flags(tmp_path, monkeypatch):
    doc = bench_suite.render(RESULTS, "## Findings\n\nsomething we changed")
    assert "2 CPUs (test), no GPU" in doc
    assert "| in-process Bouquet / plain <= 1.15 | 1.040 | met |" in doc
    assert "| Ray rounds / plain <= 1.5 | 1.600 | **missed** |" in doc
    assert "krum (m=10, d=1.0e+02: 3.5x)" in doc
    assert "| 10000 | 3 | failed: killed at 19000 MB" in doc
    assert "peak PSS 3500 MB, met" in doc
    assert "| 9.00 | 8.00 [8.00, 8.00] |" in doc
    assert doc.rstrip().endswith("something we changed")

    monkeypatch.setattr(bench_suite, "RESULTS", tmp_path)
    bench_suite.plot_all(RESULTS)
    for name in ("overhead", "aggregation", "scale", "deployment"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000, name


def test_memory_breakdown_lists_each_role_by_its_own_peak():
    run = {
        **RESULTS["scale"][0],
        "peak-at-s": 42.5,
        "peak-by-role-mb": {
            "ray actors": {"processes": 2, "pss-mb": 900},
            "flwr-simulation (engine + ServerApp)": {"processes": 1, "pss-mb": 700},
        },
        "role-peaks-mb": {
            "data build (child of the ServerApp)": 2500,
            "ray actors": 950,
            "flwr-simulation (engine + ServerApp)": 700,
        },
    }
    lines = bench_suite.render_memory_roles([RESULTS["scale"][0], run])
    rows = [line for line in lines if line.startswith("| 1000 |")]
    assert rows == [
        "| 1000 | 42.5 | data build (child of the ServerApp) | 0 | 0 | 2500 |",
        "| 1000 | 42.5 | ray actors | 2 | 900 | 950 |",
        "| 1000 | 42.5 | flwr-simulation (engine + ServerApp) | 1 | 700 | 700 |",
    ]
    assert bench_suite.render_memory_roles([RESULTS["scale"][0]]) == []


def test_aggregation_bench_measures_real_updates():
    """Every strategy in the aggregation bench accepts its replies and updates.

    Otherwise the bench times the drop path (e.g. replies that answer no
    message sent) and its table means nothing.
    """
    from bouquet.simulations.bench_aggregation import run

    rows = run(clients=[3], params=[1000], repeats=1)
    bad = [(r["algorithm"], r.get("error")) for r in rows if not r.get("update")]
    assert not bad


SMALL = {
    "table": {
        "nodes": 50,
        "rounds": 10,
        "repeats": 3,
        "data": {"smallest": 6, "largest": 58},
        "fluke": "",
        "summary": {
            "fluke": {
                "framework": "fluke 0.8.1",
                "round-median-s": 0.2,
                "round-medians-s": [0.19, 0.2, 0.25],
                "peak-rss-mb": 900,
                "final-accuracy": 0.43,
            },
            "bouquet-inprocess": {
                "framework": "bouquet-inprocess",
                "round-median-s": 0.18,
                "round-medians-s": [0.17, 0.18, 0.2],
                "peak-rss-mb": 700,
                "final-accuracy": 0.47,
            },
            "bouquet-ray": {
                "framework": "bouquet-ray",
                "round-median-s": 0.5,
                "round-medians-s": [0.5],
                "peak-rss-mb": 2500,
                "final-accuracy": 0.45,
            },
            "time-ratio": 0.9,
            "rss-ratio": 0.78,
        },
    },
    "ray-small": {
        "nodes": 200,
        "rounds": 10,
        "cores": 2,
        "replies-per-round": 100,
        "round-median-s": 0.5,
        "client-time-total-median-s": 0.25,
        "multiple-median": 4.0,
        "peak-rss-mb": 2400,
        "peak-pss-mb": 1800,
    },
}


def test_small_clients_section_states_both_targets():
    doc = bench_suite.render({**RESULTS, "small-clients": SMALL})
    assert "## 6. Many small clients" in doc
    assert "| fluke 0.8.1 | Bouquet in-process | Bouquet on Ray |" in doc
    assert "| later rounds, median (s) | 0.200 (0.190-0.250) | 0.180" in doc
    assert "0.9x per round (target <= 1.0x: met)" in doc
    assert "= 4.0x (target <= 3x: missed)" in doc
