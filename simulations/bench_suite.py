"""All benchmarks in one command; writes ``docs/benchmarks.md`` and its plots.

    python -m bouquet.simulations.bench_suite [--quick] [--device auto] \
        [--skip scale ...]

Runs, in order (each a module of its own, usable alone):

1. ``overhead``: plain PyTorch vs Bouquet in-process vs Flower's FedAvg with a
   minimal ClientApp (:mod:`simulations.bench_overhead`), plus the same
   federation through Ray (``flwr run``), engine start reported apart;
2. ``aggregation``: every registered strategy's ``aggregate_train``
   (:mod:`simulations.bench_aggregation`);
3. ``scale``: 1,000 virtual nodes on Ray, twice (:mod:`simulations.bench_scale`);
4. ``scale-stretch``: 10,000 virtual nodes, a few rounds;
5. ``cold-start``: a fresh ClientApp process (:mod:`simulations.bench_cold_start`);
6. ``deployment``: round latency with 2 SuperNodes, Flower's share vs ours
   (:mod:`simulations.bench_deployment`);
7. ``small-clients``: 50 small clients in-process against fluke (whose
   interpreter ``BOUQUET_FLUKE_PYTHON`` names), and 200 small Ray nodes
   against their summed compute (:mod:`simulations.bench_small_clients`).

Raw results go to ``simulations/results/benchmarks/*.json`` (a skipped step's
last results are reused in the document). ``--quick`` shrinks every size (a
smoke run of the machinery, not numbers to publish). ``--device auto`` (the
default) trains the overhead workload on the GPU when torch sees one, ``cpu``
forces the CPU; the other steps are CPU-bound by design.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bouquet.simulations import (
    bench_aggregation,
    bench_cold_start,
    bench_deployment,
    bench_overhead,
    bench_small_clients,
)
from bouquet.simulations.bench_scale import measure as scale_measure
from bouquet.simulations.bench_scale import ray_run
from bouquet.simulations.inprocess import app_defaults

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "simulations" / "results" / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"
PLOTS = "../simulations/results/benchmarks"
TARGETS = {"in-process": 1.15, "ray": 1.5, "flower": 1.05, "memory-mb": 4096}


def overhead(quick: bool, device: str) -> dict[str, Any]:
    """Items 1 and 2: in-process ratios, then the Ray run of the same workload."""
    rounds, nodes, repeats = (1, 2, 1) if quick else (5, 10, 4)
    result = bench_overhead.measure(rounds, nodes, repeats, device)
    config = {
        **app_defaults(),
        **bench_overhead.WORKLOAD,
        "num-server-rounds": rounds,
        "device": result["workload"]["device"],
    }
    gpus = 0.0 if config["device"] == "cpu" else 0.5
    runs = [ray_run(config, nodes, gpus=gpus) for _ in range(1 if quick else 2)]
    rounds_s = [r["wall-s"] - r["before-round-1-s"] for r in runs]
    result["ray"] = runs
    result["ray-rounds-s"] = rounds_s
    result["ray-rounds-vs-plain"] = (
        statistics.median(rounds_s) / result["median-s"]["plain"]
    )
    return result


def aggregation(quick: bool, device: str) -> list[dict[str, Any]]:
    """Item 3: 3 repeats; 2 at d = 1.1e7 and m = 10; 1 at m = 100.

    At m = 100, d = 1.1e7 building the 100 replies of 44 MB for each repeat
    (two rounds: the timed one is a steady-state round) takes about a minute
    per strategy, so the 24 strategies get one repeat there (about 40 min).
    """
    if quick:
        return bench_aggregation.run([10], [100_000], 1)
    rows = bench_aggregation.run([10, 100], [100_000, 1_000_000], 3)
    rows += bench_aggregation.run([10], [11_000_000], 2)
    return rows + bench_aggregation.run([100], [11_000_000], 1)


def scale(quick: bool, device: str) -> list[dict[str, Any]]:
    """Item 4: 1,000 nodes, 10% per round, 20 rounds, twice."""
    if quick:
        return [scale_measure(100, 3, 0.1, 1)]
    return [scale_measure(1000, 20, 0.1, 1) for _ in range(2)]


def scale_stretch(quick: bool, device: str) -> list[dict[str, Any]]:
    """Item 4's stretch: 10,000 nodes, 10% per round, 3 rounds (or what failed).

    Synthetic clients' own data (``natural-id``): a Dirichlet re-split of the
    pool into 10,000 partitions had not finished after 9 minutes.
    """
    nodes, rounds = (300, 2) if quick else (10_000, 3)
    try:
        return [scale_measure(nodes, rounds, 0.1, 1, 1200, "natural-id")]
    except Exception as err:  # the limit is the finding: record it
        return [{"nodes": nodes, "rounds": rounds, "error": f"{err}"[-2000:]}]


def cold_start(quick: bool, device: str) -> dict[str, Any]:
    """Item 5, first half: what a fresh ClientApp process pays."""
    config = {**app_defaults(), "dataset": "digits", "model": "cnn"}
    with tempfile.TemporaryDirectory() as cache:
        return bench_cold_start.measure(config, 2 if quick else 5, cache)


def deployment(quick: bool, device: str) -> dict[str, Any]:
    """Item 5, second half: round latency with 2 SuperNodes, split."""
    config = {**app_defaults(), "dataset": "digits", "model": "cnn", "local-epochs": 1}
    return bench_deployment.measure(config, 2 if quick else 8)


def small_clients(quick: bool, device: str) -> dict[str, Any]:
    """Item 7 (issue 18): many small clients, against fluke and on Ray."""
    return bench_small_clients.measure(quick)


STEPS = {
    "overhead": overhead,
    "aggregation": aggregation,
    "scale": scale,
    "scale-stretch": scale_stretch,
    "cold-start": cold_start,
    "deployment": deployment,
    "small-clients": small_clients,
}


def machine() -> str:
    """CPU model, cores, memory and GPU, in one line."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        memory = f", {mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        memory = ""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPUs ({model}){memory}, {gpu}"


# -- plots -------------------------------------------------------------------


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def plot_aggregation(rows: list[dict[str, Any]], path: Path) -> None:
    """Time ratio to FedAvg per strategy, one bar per (m, d)."""
    plt = _pyplot()
    sizes = sorted({(r["clients"], r["parameters"]) for r in rows})
    names = sorted({r["algorithm"] for r in rows})
    ratio = {
        (r["algorithm"], r["clients"], r["parameters"]): r.get("time-ratio", 0.0)
        for r in rows
    }
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.6), 4))
    width = 0.8 / max(len(sizes), 1)
    for i, (m, d) in enumerate(sizes):
        ax.bar(
            [j + i * width for j in range(len(names))],
            [ratio.get((n, m, d), 0.0) for n in names],
            width,
            label=f"m={m}, d={d:.1e}",
        )
    ax.axhline(3.0, color="red", linestyle="--", linewidth=1, label="3x FedAvg")
    ax.set_xticks([j + 0.4 for j in range(len(names))], names, rotation=45, ha="right")
    ax.set_ylabel("aggregate_train time / FedAvg's")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_overhead(result: dict[str, Any], path: Path) -> None:
    """Median wall time per runner, with min-max whiskers."""
    plt = _pyplot()
    names = ["plain", "flower", "bouquet"]
    times = [result["times-s"][n] for n in names]
    ray = result.get("ray-rounds-s") or []
    if ray:
        names.append("bouquet on Ray\n(rounds only)")
        times.append(ray)
    med = [statistics.median(t) for t in times]
    err = [
        [m - min(t) for m, t in zip(med, times, strict=True)],
        [max(t) - m for m, t in zip(med, times, strict=True)],
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(
        names, med, yerr=err, capsize=4, color=["grey", "C0", "C1", "C2"][: len(med)]
    )
    ax.set_ylabel("wall time (s)")
    ax.set_title("Same FedAvg federation, four runners")
    _save(fig, path)


def plot_scale(runs: list[dict[str, Any]], path: Path) -> None:
    """Wall time of every round, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, run in enumerate(runs):
        if times := run.get("round-times-s"):
            ax.plot(
                range(1, len(times) + 1),
                times,
                marker=".",
                label=f"{run['nodes']} nodes, run {i + 1}",
            )
    ax.set(xlabel="round", ylabel="round wall time (s)", ylim=(0, None))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_deployment(result: dict[str, Any], path: Path) -> None:
    """Stacked shares of a deployment round: round 1 and the median later round."""
    plt = _pyplot()
    later = {k: v["median-s"] for k, v in result["rounds-2+"].items()}
    bars = {"round 1": result["round-1"], "rounds 2+ (median)": later}
    parts = [
        ("flower", "Flower (polling, process start, transport)"),
        ("ours-client", "Bouquet ClientApp"),
        ("ours-server", "Bouquet server"),
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(bars)
    for key, label in parts:
        values = [b[key] for b in bars.values()]
        ax.bar(list(bars), values, bottom=bottom, label=label)
        bottom = [a + b for a, b in zip(bottom, values, strict=True)]
    ax.set_ylabel("seconds")
    ax.set_title("Deployment round, 2 SuperNodes")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_all(results: dict[str, Any]) -> None:
    """Every plot whose results are there."""
    if ov := results.get("overhead"):
        plot_overhead(ov, RESULTS / "overhead.png")
    if rows := results.get("aggregation"):
        plot_aggregation(rows, RESULTS / "aggregation.png")
    if sc := results.get("scale"):
        plot_scale(sc + results.get("scale-stretch", []), RESULTS / "scale.png")
    if dep := results.get("deployment"):
        plot_deployment(dep, RESULTS / "deployment.png")


# -- the document ------------------------------------------------------------


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def _mark(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render_overhead(ov: dict[str, Any]) -> list[str]:
    """Section 1-2: the four runners and the three targets."""
    med, times = ov["median-s"], ov["times-s"]
    runs = ov["ray"] if isinstance(ov["ray"], list) else [ov["ray"]]
    ray_rounds = ov.get("ray-rounds-s") or [
        r["wall-s"] - r["before-round-1-s"] for r in runs
    ]
    lines = [
        "## 1-2. Overhead vs plain PyTorch, parity with Flower",
        "",
        f"Workload: {json.dumps(ov['workload'])}. Wall times: median [min, max] "
        f"of {len(times['plain'])} interleaved repeats (one process, one torch "
        "thread each, as a Ray actor with one CPU has).",
        "",
        "![overhead](" + PLOTS + "/overhead.png)",
        "",
        "| runner | wall (s) | ratio to plain | final accuracy |",
        "|---|---|---|---|",
    ]
    for name in ("plain", "flower", "bouquet"):
        lines.append(
            f"| {name} | {_spread(times[name])} | {med[name] / med['plain']:.3f} | "
            f"{ov['final-accuracy'][name]:.4f} |"
        )
    lines += [
        f"| bouquet on Ray (`flwr run`), rounds only | {_spread(ray_rounds)} | "
        f"{ov['ray-rounds-vs-plain']:.3f} | "
        f"{runs[-1]['final-central-accuracy']:.4f} |",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| in-process Bouquet / plain <= {TARGETS['in-process']} | "
        f"{ov['bouquet-vs-plain']:.3f} | "
        f"{_mark(ov['bouquet-vs-plain'] <= TARGETS['in-process'])} |",
        f"| Ray rounds / plain <= {TARGETS['ray']} | {ov['ray-rounds-vs-plain']:.3f} "
        f"| {_mark(ov['ray-rounds-vs-plain'] <= TARGETS['ray'])} |",
        f"| Bouquet / Flower's FedAvg <= {TARGETS['flower']} | "
        f"{ov['bouquet-vs-flower']:.3f} | "
        f"{_mark(ov['bouquet-vs-flower'] <= TARGETS['flower'])} |",
        "",
        "Ray engine start (submission to round 1: SuperLink's simulation "
        "process, Ray, actors, app load, round-0 evaluation): "
        + ", ".join(f"{r['before-round-1-s']:.1f} s" for r in runs)
        + ".",
        "",
    ]
    return lines


def render_scale(
    runs: list[dict[str, Any]], stretch: list[dict[str, Any]]
) -> list[str]:
    """Section 4: the 1,000-node runs and the stretch."""
    lines = [
        "## 4. Many virtual nodes (Ray, synthetic data, MLP, 10% per round)",
        "",
        "Peak memory is the whole process tree (SuperLink, simulation process, "
        "Ray's GCS, raylet, object store, actors), sampled every 0.5 s. RSS "
        "counts shared pages once per process (an upper bound); PSS splits them.",
        "",
        "![scale](" + PLOTS + "/scale.png)",
        "",
        "| nodes | rounds | wall (s) | before round 1 (s) | round median (s) | "
        "round max (s) | peak RSS (MB) | peak PSS (MB) | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs + stretch:
        if "error" in r:
            lines.append(
                f"| {r['nodes']} | {r['rounds']} | failed: "
                f"{r['error'][:500].replace(chr(10), ' ')} | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['nodes']} | {r['rounds']} | {r['wall-s']} | "
            f"{r['before-round-1-s']} | {r['round-median-s']} | {r['round-max-s']} | "
            f"{r['peak-rss-mb']} | {r['peak-pss-mb']} | {r['error-replies']} |"
        )
    ok = [r for r in runs if "peak-pss-mb" in r]
    if ok:
        worst = max(r["peak-pss-mb"] for r in ok)
        lines += [
            "",
            f"Target < {TARGETS['memory-mb']} MB at 1,000 nodes: peak PSS "
            f"{worst} MB, {_mark(worst < TARGETS['memory-mb'])}.",
        ]
    lines += render_memory_roles(runs + stretch)
    lines.append("")
    return lines


def render_memory_roles(runs: list[dict[str, Any]]) -> list[str]:
    """Who holds the memory: PSS by process role at the peak, and each role's own.

    Runs measured before the breakdown existed are left out.
    """
    broken_down = [r for r in runs if r.get("peak-by-role-mb")]
    if not broken_down:
        return []
    lines = [
        "",
        "PSS by process (MB): at the tree's peak (processes), and each role's "
        "own peak whenever it came:",
        "",
        "| nodes | peak at (s) | role | processes | PSS at the peak "
        "| role's own peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in broken_down:
        roles = r["peak-by-role-mb"]
        for name in sorted(
            set(roles) | set(r["role-peaks-mb"]),
            key=lambda n: -r["role-peaks-mb"].get(n, 0),
        ):
            at_peak = roles.get(name, {"processes": 0, "pss-mb": 0})
            lines.append(
                f"| {r['nodes']} | {r['peak-at-s']} | {name} | "
                f"{at_peak['processes']} | {at_peak['pss-mb']} | "
                f"{r['role-peaks-mb'].get(name, 0)} |"
            )
    return lines


def render_deployment(dep: dict[str, Any]) -> list[str]:
    """Section 5b: the shares of a deployment round."""
    later = dep["rounds-2+"]
    names = {
        "round": "whole round (ServerApp's view)",
        "flower": "Flower: polling, a fresh `flwr-clientapp` per message, transport",
        "ours-client": "Bouquet ClientApp handler (imports, data, model, training)",
        "ours-server": "Bouquet server (aggregation, central evaluation, results)",
    }
    lines = [
        "## 5b. Deployment round latency (2 SuperNodes, loopback)",
        "",
        f"FedAvg, {json.dumps(dep['workload'])}, iid, train only, "
        f"{dep['rounds']} rounds. From every round's `wall-time`, `wait-time` and "
        "`client-time` (see `simulations/bench_deployment.py`).",
        "",
        "![deployment](" + PLOTS + "/deployment.png)",
        "",
        "| share | round 1 (s) | rounds 2+ median [min, max] (s) |",
        "|---|---|---|",
    ]
    for key, label in names.items():
        s = later[key]
        lines.append(
            f"| {label} | {dep['round-1'][key]:.2f} | {s['median-s']:.2f} "
            f"[{s['min-s']:.2f}, {s['max-s']:.2f}] |"
        )
    lines.append("")
    return lines


def render(results: dict[str, Any], notes: str = "") -> str:
    """``docs/benchmarks.md`` from the raw results."""
    lines = [
        "# Benchmarks",
        "",
        f"Machine: {results.get('machine', machine())}. Regenerate with "
        "`python -m bouquet.simulations.bench_suite` (add `--device auto` on a GPU "
        "machine); raw numbers in `simulations/results/benchmarks/`.",
        "",
    ]
    if ov := results.get("overhead"):
        lines += render_overhead(ov)
    if rows := results.get("aggregation"):
        flagged = [r for r in rows if r.get("flag")]
        lines += [
            "## 3. Aggregation scaling",
            "",
            "Every registered strategy's whole `aggregate_train` (validation plus "
            "rule) on random replies, against FedAvg in the same process. Medians "
            "of 3 repeats (2 at d = 1.1e7 and m = 10, one at m = 100 and d = "
            "1.1e7); peak MB is what the call allocates.",
            "",
            "![aggregation](" + PLOTS + "/aggregation.png)",
            "",
            "Above 3x FedAvg: "
            + (
                ", ".join(
                    f"{r['algorithm']} (m={r['clients']}, d={r['parameters']:.1e}: "
                    f"{r['time-ratio']:.1f}x)"
                    for r in flagged
                )
                or "none"
            )
            + ".",
            "",
            bench_aggregation.markdown(rows),
        ]
    if sc := results.get("scale"):
        lines += render_scale(sc, results.get("scale-stretch", []))
    if cs := results.get("cold-start"):
        lines += ["## 5a. ClientApp cold start (a fresh process per message)", ""]
        lines += ["| phase | median ms | min | max |", "|---|---|---|---|"]
        lines += [
            f"| {k} | {v['median-ms']} | {v['min-ms']} | {v['max-ms']} |"
            for k, v in cs.items()
        ]
        lines.append("")
    if dep := results.get("deployment"):
        lines += render_deployment(dep)
    if small := results.get("small-clients"):
        lines += bench_small_clients.render(small)
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


NOTES = RESULTS / "notes.md"
"""Hand-written findings (what was profiled and changed), appended to the doc."""


def main() -> None:
    """Run the chosen steps, save raw results, redraw the plots, rewrite the doc."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    parser.add_argument("--skip", nargs="*", default=[], choices=list(STEPS))
    parser.add_argument("--only", nargs="*", default=[], choices=list(STEPS))
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name, step in STEPS.items():
        path = RESULTS / f"{name}.json"
        if name in args.skip or (args.only and name not in args.only):
            if path.exists():
                results[name] = json.loads(path.read_text())
            continue
        print(f"== {name}", flush=True)
        results[name] = step(args.quick, args.device)
        path.write_text(json.dumps(results[name], indent=1))
    machine_path = RESULTS / "machine.json"
    if (not args.skip and not args.only) or not machine_path.exists():
        machine_path.write_text(json.dumps(machine()))
    results["machine"] = json.loads(machine_path.read_text())
    plot_all(results)
    DOC.parent.mkdir(parents=True, exist_ok=True)
    notes = NOTES.read_text() if NOTES.exists() else ""
    DOC.write_text(render(results, notes))
    print(f"Wrote {DOC}")


if __name__ == "__main__":
    main()
