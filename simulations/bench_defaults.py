"""Defaults that learn: every algorithm on the quickstart's settings, nothing else.

    python -m bouquet.simulations.bench_defaults [--seeds 42 43 44] \
        [--out simulations/results/defaults] [--only fedld scaffold]

Each registered algorithm runs with the app's run-config defaults (the
README's quickstart: digits, 10 nodes, Dirichlet alpha 0.3, the MLP, 10
rounds; asynchronous algorithms: 10 versions) and only ``algorithm``
changed, on the in-process runner (the same numbers as Ray for the same
seed). Writes ``defaults.csv`` (one row per run) and ``defaults.md`` (final
and best central accuracy per algorithm, mean and range over the seeds; chance
is 0.1) under ``--out``, and the table into ``docs/defaults.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies.registry import get_algorithm, list_algorithms

CHANCE = 0.1
"""Accuracy of a constant guess on digits' 10 balanced classes."""

CLEARLY = 0.3
"""The bar for "learns": a mean final accuracy of three times chance, and no
seed below twice chance."""


LONGER = {
    "fedasync": {"num-server-rounds": 100},
    "fedamd": {"num-server-rounds": 30},
}
"""Second rows with more rounds, where 10 is short for the algorithm: a FedAsync
version is one client's update (100 versions are the client work of 10 FedAvg
rounds); FedAMD's first round only fills its anchor table and its anchors
never train."""


def run_one(
    algorithm: str, seed: int, out: Path, more: dict[str, Any] | None = None
) -> dict[str, object]:
    """One run with only ``algorithm`` and ``seed`` (and ``more``) set; its row."""
    start = time.perf_counter()
    result, path, _ = run_inprocess(
        {
            "algorithm": algorithm,
            "seed": seed,
            "output-dir": str(out),
            "plot": False,
            **(more or {}),
        }
    )
    final = json.loads((path / "summary.json").read_text())
    label = algorithm
    if more:
        unit = "versions" if get_algorithm(algorithm).schedule == "events" else "rounds"
        label += f" ({more['num-server-rounds']} {unit})"
    return {
        "algorithm": label,
        "seed": seed,
        "rounds": max(result.evaluate_metrics_serverapp, default=0),
        "final-central-accuracy": final["final-central-accuracy"],
        "best-central-accuracy": final["best-central-accuracy"],
        "wall-seconds": round(time.perf_counter() - start, 1),
        "run": path.name,
    }


def table(rows: list[dict[str, object]]) -> str:
    """Markdown: one line per algorithm, mean (min-max) over its seeds."""
    lines = [
        "| algorithm | seeds | final central accuracy, mean (min-max) | best "
        "| learns | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted({str(r["algorithm"]) for r in rows}):
        mine = [r for r in rows if r["algorithm"] == name]
        final = [float(r["final-central-accuracy"]) for r in mine]
        best = [float(r["best-central-accuracy"]) for r in mine]
        wall = statistics.mean(float(r["wall-seconds"]) for r in mine)
        clearly = statistics.mean(final) > CLEARLY and min(final) > 2 * CHANCE
        learns = "yes" if clearly else "**no**"
        lines.append(
            f"| `{name}` | {len(mine)} | {statistics.mean(final):.3f} "
            f"({min(final):.3f}-{max(final):.3f}) | {statistics.mean(best):.3f} "
            f"| {learns} | {wall:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the grid and write the CSV and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument(
        "--out", type=Path, default=Path("simulations/results/defaults")
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=Path("docs/defaults.md"),
        help="rewrite the table between its markers (full runs only)",
    )
    args = parser.parse_args()
    names = args.only or list_algorithms()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        runs_to_do = [(n, None) for n in names]
        runs_to_do += [(n, LONGER[n]) for n in names if n in LONGER]
        for name, more in runs_to_do:
            for seed in args.seeds:
                row = run_one(name, seed, Path(runs), more)
                rows.append(row)
                print(
                    f"{row['algorithm']:24s} seed {seed}: "
                    f"final {row['final-central-accuracy']:.3f} "
                    f"best {row['best-central-accuracy']:.3f} "
                    f"({row['wall-seconds']} s)",
                    flush=True,
                )
    with (args.out / "defaults.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "defaults.md").write_text(table(rows))
    if args.docs is not None and not args.only:
        text = args.docs.read_text()
        start, end = "<!-- defaults-table:start -->\n", "<!-- defaults-table:end -->"
        head, rest = text.split(start)
        args.docs.write_text(head + start + table(rows) + end + rest.split(end)[1])
    print(table(rows))


if __name__ == "__main__":
    main()
