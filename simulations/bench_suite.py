"""All benchmarks in one command; writes ``docs/benchmarks.md`` and its plots.

    python -m simulations.bench_suite [--quick] [--skip scale ...]

Runs, in order (each a module of its own, usable alone):

1. overhead and parity (:mod:`simulations.bench_overhead`): plain PyTorch vs
   Bouquet in-process vs Flower's FedAvg with a minimal ClientApp, plus the
   same federation through Ray (``flwr run``), engine start reported apart;
2. aggregation scaling of every registered strategy
   (:mod:`simulations.bench_aggregation`);
3. many virtual nodes on Ray (:mod:`simulations.bench_scale`);
4. ClientApp cold start (:mod:`simulations.bench_cold_start`).

Raw results go to ``simulations/results/benchmarks/*.json``. ``--quick``
shrinks every size (a smoke run of the machinery, not numbers to publish).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from simulations import bench_aggregation, bench_cold_start, bench_overhead
from simulations.bench_scale import measure as scale_measure
from simulations.bench_scale import ray_run
from simulations.inprocess import app_defaults

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "simulations" / "results" / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"


def overhead(quick: bool) -> dict[str, Any]:
    """Item 1 and 2: in-process ratios, then the Ray run of the same workload."""
    rounds, nodes, repeats = (1, 2, 1) if quick else (5, 10, 3)
    result = bench_overhead.measure(rounds, nodes, repeats)
    config = {**app_defaults(), **bench_overhead.WORKLOAD, "num-server-rounds": rounds}
    ray = ray_run(config, nodes)
    rounds_s = ray["wall-s"] - ray["before-round-1-s"]
    result["ray"] = ray
    result["ray-rounds-vs-plain"] = rounds_s / result["median-s"]["plain"]
    return result


def aggregation(quick: bool) -> list[dict[str, Any]]:
    """Item 3."""
    if quick:
        return bench_aggregation.run([10], [100_000], 1)
    return bench_aggregation.run([10, 100], [100_000, 1_000_000, 11_000_000], 3)


def scale(quick: bool) -> list[dict[str, Any]]:
    """Item 4."""
    return [scale_measure(100 if quick else 1000, 3 if quick else 20, 0.1, 1)]


def cold_start(quick: bool) -> dict[str, Any]:
    """Item 5 (the ClientApp's share of a deployment round)."""
    config = {**app_defaults(), "dataset": "digits", "model": "cnn"}
    with tempfile.TemporaryDirectory() as cache:
        return bench_cold_start.measure(config, 2 if quick else 5, cache)


STEPS = {
    "overhead": overhead,
    "aggregation": aggregation,
    "scale": scale,
    "cold-start": cold_start,
}


def _plot_aggregation(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({(r["clients"], r["parameters"]) for r in rows})
    names = sorted({r["algorithm"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.6), 4))
    width = 0.8 / max(len(sizes), 1)
    for i, (m, d) in enumerate(sizes):
        ratios = [
            next(
                (
                    r.get("time-ratio", 0.0)
                    for r in rows
                    if r["algorithm"] == n and (r["clients"], r["parameters"]) == (m, d)
                ),
                0.0,
            )
            for n in names
        ]
        ax.bar(
            [j + i * width for j in range(len(names))],
            ratios,
            width,
            label=f"m={m}, d={d:.0e}",
        )
    ax.axhline(3.0, color="red", linestyle="--", linewidth=1, label="3x FedAvg")
    ax.set_xticks([j + 0.4 for j in range(len(names))], names, rotation=45, ha="right")
    ax.set_ylabel("aggregate_train time / FedAvg's")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: dict[str, Any]) -> str:
    """``docs/benchmarks.md`` from the raw results."""
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), no GPU. "
        "Regenerate with `python -m simulations.bench_suite`; raw numbers in "
        "`simulations/results/benchmarks/`.",
        "",
    ]
    if ov := results.get("overhead"):
        med = ov["median-s"]
        ray = ov["ray"]
        lines += [
            "## Overhead vs plain PyTorch, parity with Flower",
            "",
            f"Workload: {json.dumps(ov['workload'])}; medians of "
            f"{len(ov['times-s']['plain'])} interleaved repeats.",
            "",
            "| runner | median wall (s) | ratio to plain | final accuracy |",
            "|---|---|---|---|",
        ]
        for name in ("plain", "flower", "bouquet"):
            lines.append(
                f"| {name} | {med[name]:.2f} | {med[name] / med['plain']:.3f} | "
                f"{ov['final-accuracy'][name]:.4f} |"
            )
        lines += [
            f"| bouquet on Ray (`flwr run`), rounds only | "
            f"{ray['wall-s'] - ray['before-round-1-s']:.2f} | "
            f"{ov['ray-rounds-vs-plain']:.3f} | "
            f"{ray['final-central-accuracy']:.4f} |",
            "",
            f"Ray engine start (SuperLink up to round 1): "
            f"{ray['before-round-1-s']:.1f} s. Bouquet vs Flower's FedAvg: "
            f"{ov['bouquet-vs-flower']:.3f}x (target 1.05); vs plain: "
            f"{ov['bouquet-vs-plain']:.3f}x (target 1.15).",
            "",
        ]
    if rows := results.get("aggregation"):
        lines += [
            "## Aggregation scaling",
            "",
            "![aggregation](../simulations/results/benchmarks/aggregation.png)",
            "",
            bench_aggregation.markdown(rows),
        ]
    if sc := results.get("scale"):
        lines += ["## Many virtual nodes (Ray)", ""]
        lines += [f"- `{json.dumps(r)}`" for r in sc]
        lines.append("")
    if cs := results.get("cold-start"):
        lines += ["## ClientApp cold start (fresh process)", ""]
        lines += ["| phase | median ms | min | max |", "|---|---|---|---|"]
        lines += [
            f"| {k} | {v['median-ms']} | {v['min-ms']} | {v['max-ms']} |"
            for k, v in cs.items()
        ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Run the chosen steps, save raw results, rewrite the doc."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(STEPS))
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name, step in STEPS.items():
        path = RESULTS / f"{name}.json"
        if name in args.skip:
            if path.exists():
                results[name] = json.loads(path.read_text())
            continue
        results[name] = step(args.quick)
        path.write_text(json.dumps(results[name], indent=1))
    if results.get("aggregation"):
        _plot_aggregation(results["aggregation"], RESULTS / "aggregation.png")
    DOC.write_text(render(results))
    print(f"Wrote {DOC}")


if __name__ == "__main__":
    main()
