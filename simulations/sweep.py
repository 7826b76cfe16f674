"""Sweeps: run a list of run-config override files x seeds, collect one table.

Each override file is TOML: top-level keys are run-config overrides (exactly as
``--run-config`` takes them, nested tables flattened to ``"<algo>.<key>"``); an
optional ``[sweep]`` table sets ``label``, ``seeds``, ``num-nodes`` and
``target`` (accuracy for rounds-to-target). Runs use the in-process runner
(same numbers as Ray for the same seed, without the engine's start-up cost).

Outputs in ``--out``: ``results.csv`` (one row per run), ``results.md``
(mean +- std per label), ``comparison.png`` (mean central accuracy per round),
and every run's own directory under ``runs/``.

    python -m bouquet.simulations.sweep simulations/configs/fedld/*.toml \
        --out /tmp/sweep
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bouquet.simulations.inprocess import flatten_config
from bouquet.simulations.plotting import BYTES_SO_FAR, with_bytes_so_far


def load_override_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read ``(run-config overrides, sweep options)`` from a TOML file."""
    data = tomllib.loads(Path(path).read_text())
    options = data.pop("sweep", {})
    options.setdefault("label", Path(path).stem)
    return flatten_config(data), options


def rounds_to_target(rows: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """First round whose central accuracy reaches ``target`` (None if never)."""
    for row in rows:
        if row["round"] > 0 and (row.get("central-accuracy") or 0.0) >= target:
            return int(row["round"])
    return None


def time_to_target(rows: Sequence[Mapping[str, Any]], target: float) -> float | None:
    """First simulated time at which central accuracy reaches ``target``."""
    for row in rows:
        if (
            row["round"] > 0
            and row.get("sim-time") is not None
            and (row.get("central-accuracy") or 0.0) >= target
        ):
            return float(row["sim-time"])
    return None


def client_seconds(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Mean over trained rounds of the clients' summed train time per round.

    Read from each round's ``client-time-total`` (the ``client-time`` the
    ClientApps measure around their train handler and report, summed by the
    driver); None when no round has it (another ClientApp).
    """
    times = [
        float(r["client-time-total"])
        for r in rows
        if r["round"] > 0 and r.get("client-time-total") is not None
    ]
    return statistics.mean(times) if times else None


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def run_sweep(
    files: Sequence[str | Path],
    out: str | Path,
    seeds: Sequence[int] | None = None,
    num_nodes: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run every file x seed; write the table, the markdown and the plot."""
    from bouquet.serverapps.results import summary
    from bouquet.simulations.inprocess import run_inprocess
    from bouquet.simulations.plotting import plot_rounds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for file in files:
        overrides, options = load_override_file(file)
        for seed in seeds or options.get("seeds", [0]):
            config = {
                **overrides,
                **(extra or {}),
                "seed": int(seed),
                "output-dir": str((out / "runs").resolve()),
            }
            nodes = int(num_nodes or options.get("num-nodes", 10))
            print(f"[sweep] {options['label']} seed={seed} nodes={nodes}", flush=True)
            _, path, _ = run_inprocess(config, num_nodes=nodes)
            rows = json.loads((path / "metrics.json").read_text())["rounds"]
            target = float(options.get("target", 0.0))
            records.append(
                {
                    "label": options["label"],
                    "seed": int(seed),
                    "run-dir": str(path),
                    **summary(rows),
                    "client-time-per-round": client_seconds(rows),
                    "target": target,
                    "rounds-to-target": rounds_to_target(rows, target),
                    "sim-time-to-target": time_to_target(rows, target),
                }
            )
            curves.setdefault(options["label"], []).append(with_bytes_so_far(rows))
    _write_table(records, out)
    means = {label: _mean_curve(runs) for label, runs in curves.items()}
    plot_rounds(means, out / "comparison.png")
    # Accuracy against communication (compression, PEFT, gossip trade bytes).
    plot_rounds(means, out / "comparison-bytes.png", x=BYTES_SO_FAR)
    timed = {
        label: runs
        for label, runs in curves.items()
        if all(r.get("sim-time") is not None for rows in runs for r in rows)
    }
    if timed:
        plot_rounds(
            {label: _mean_time_curve(runs) for label, runs in timed.items()},
            out / "comparison-time.png",
            x="sim-time",
        )
    return records


def _mean_time_curve(
    runs: list[list[dict[str, Any]]], points: int = 200
) -> list[dict[str, Any]]:
    """Mean over runs of each run's latest value at simulated times ``t``."""
    end = min(rows[-1]["sim-time"] for rows in runs)
    curve = []
    for t in [end * i / (points - 1) for i in range(points)]:
        point: dict[str, Any] = {"sim-time": t}
        for key in ("central-accuracy", "train-loss"):
            values = []
            for rows in runs:
                seen = [
                    r[key]
                    for r in rows
                    if r["sim-time"] <= t + 1e-9 and r.get(key) is not None
                ]
                if seen:
                    values.append(seen[-1])
            point[key] = statistics.mean(values) if len(values) == len(runs) else None
        curve.append(point)
    return curve


CURVE_KEYS = (
    "central-accuracy",
    "node-accuracy-mean",
    "node-accuracy-worst10",
    "train-loss",
    BYTES_SO_FAR,
)


def _mean_curve(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    by_round: dict[int, list[dict[str, Any]]] = {}
    for rows in runs:
        for row in rows:
            by_round.setdefault(row["round"], []).append(row)
    curve = []
    for rnd, rows in sorted(by_round.items()):
        point: dict[str, Any] = {"round": rnd}
        for key in CURVE_KEYS:
            values = [r[key] for r in rows if r.get(key) is not None]
            point[key] = statistics.mean(values) if values else None
        curve.append(point)
    return curve


def _write_table(records: list[dict[str, Any]], out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    timed = any(r.get("sim-time") is not None for r in records)
    personal = any(r.get("final-node-accuracy-mean") is not None for r in records)
    lines = [
        "| label | seeds | final accuracy (mean ± std) | best accuracy | "
        + ("node accuracy mean | worst-10% nodes | " if personal else "")
        + "rounds to target | "
        + ("sim time to target | versions | " if timed else "")
        + "wall time per run (s) |",
        "|---|---|---|---|---|"
        + ("---|---|" if personal else "")
        + ("---|---|" if timed else "")
        + "---|",
    ]
    for label in dict.fromkeys(r["label"] for r in records):
        runs = [r for r in records if r["label"] == label]
        reached = [r["rounds-to-target"] for r in runs if r["rounds-to-target"]]
        to_target = (
            f"{statistics.mean(reached):.1f} ({len(reached)}/{len(runs)} reached "
            f"{runs[0]['target']:.2f})"
            if reached
            else f"never ({runs[0]['target']:.2f})"
        )
        timing = ""
        if timed:
            times = [r["sim-time-to-target"] for r in runs]
            got = [t for t in times if t is not None]
            timing = (
                f"{statistics.mean(got):.1f} ({len(got)}/{len(runs)}) | "
                if got
                else "never | "
            ) + f"{statistics.mean(r['rounds'] for r in runs):.0f} | "
        nodes = ""
        if personal:
            nodes = " | ".join(
                _mean_std([r[k] for r in runs if r.get(k) is not None])
                for k in ("final-node-accuracy-mean", "final-node-accuracy-worst10")
            )
            nodes += " | "
        lines.append(
            f"| {label} | {len(runs)} | "
            f"{_mean_std([r['final-central-accuracy'] for r in runs])} | "
            f"{_mean_std([r['best-central-accuracy'] for r in runs])} | {nodes}"
            f"{to_target} | "
            f"{timing}{statistics.mean(r['wall-time'] for r in runs):.1f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m bouquet.simulations.sweep FILES... --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="run-config override TOML files")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    parser.add_argument("--num-nodes", type=int, help="override the node count")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra run-config overrides (TOML values)",
    )
    args = parser.parse_args(argv)
    extra = flatten_config(tomllib.loads("\n".join(args.set))) if args.set else {}
    records = run_sweep(args.files, args.out, args.seeds, args.num_nodes, extra)
    print((Path(args.out) / "results.md").read_text())
    print(f"[sweep] {len(records)} runs; results in {args.out}")


if __name__ == "__main__":
    main()
