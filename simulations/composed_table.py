"""The composed run's table (issue #23): each arm's accuracy, bytes and epsilon.

Reads a ``simulations.sweep`` ``results.csv`` of the configs in
``simulations/configs/composed`` (labels ``"<algorithm> / <arm>"``) and each
run's ``metrics.json`` for the epsilon the clients spent (the last round's
``dp-sgd.epsilon``, the largest over the nodes) and the bytes the nodes sent
per round. Prints a Markdown table, mean ± std over seeds. Usage::

    python -m bouquet.simulations.composed_table OUT/results.csv [...] > table.md
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

ARMS = {
    "alone": "alone",
    "dp": "DP-SGD (epsilon 8)",
    "sign-flip": "20% sign flip",
    "topk-ef": "top-k 10% + error feedback",
    "composed": "all three",
}
NAMES = {"fedld": "FedLD", "fedavg": "FedAvg"}


def _spread(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def rows(*results: Path) -> list[str]:
    """Table lines for the runs listed in ``results`` (sweeps' results.csv)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for path in results:
        _read(path, runs)
    return _table(runs)


def _read(results: Path, runs: dict[tuple[str, str], list[dict]]) -> None:
    with open(results, newline="") as fh:
        for record in csv.DictReader(fh):
            algorithm, _, arm = record["label"].partition(" / ")
            metrics = json.loads(
                (results.parent / record["run-dir"] / "metrics.json").read_text()
            )["rounds"]
            last = metrics[-1]
            runs.setdefault((algorithm, arm), []).append(
                {
                    "accuracy": float(record["final-central-accuracy"]),
                    "uplink": sum(r["bytes-received"] for r in metrics[1:])
                    / max(1, len(metrics) - 1),
                    "epsilon": last.get("train-dp-sgd.epsilon"),
                }
            )


def _table(runs: dict[tuple[str, str], list[dict]]) -> list[str]:
    lines = [
        "| algorithm | arm | final accuracy | uplink kB per round | epsilon spent |",
        "|---|---|---|---|---|",
    ]
    for algorithm in NAMES:
        for arm, label in ARMS.items():
            if not (found := runs.get((algorithm, arm))):
                continue
            spent = [r["epsilon"] for r in found if r["epsilon"] is not None]
            lines.append(
                f"| {NAMES[algorithm]} | {label} | "
                f"{_spread([r['accuracy'] for r in found])} | "
                f"{statistics.mean(r['uplink'] for r in found) / 1000:.0f} | "
                f"{_spread(spent, 2) if spent else '-'} |"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table of a sweep's ``results.csv``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args(argv)
    print("\n".join(rows(*args.results)))


if __name__ == "__main__":
    main()
