"""The Byzantine table of the README: attackers x attack rows, one column per rule.

Reads ``simulations.sweep`` ``results.csv`` files whose labels are
``"<algorithm> / <attack> <pct>%"`` or ``"<algorithm> / none"`` (the configs
in ``simulations/configs/robustness`` and ``simulations/configs/frl/small-*``)
and prints final central accuracy, mean ± std over seeds, per row and
column; a cell nothing measured is ``-``. A file given as ``PCT=path`` was
run with ``--set attack-fraction=PCT/100``: its labels' own percentage is
replaced by ``PCT``. Usage::

    python -m bouquet.simulations.byzantine_table OUT/results.csv \
        10=OUT10/results.csv 30=OUT30/results.csv > table.md
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
from collections.abc import Sequence

COLUMNS = {
    "fedavg": "FedAvg",
    "krum": "Krum (f = 2)",
    "fedmedian": "FedMedian",
    "flag": "FLAG",
    "mudhog": "MUD-HoG",
    "frl": "FRL",
}
ATTACKS = {
    "sign-flip": "sign-flip",
    "gaussian": "gaussian",
    "label-flip": "label-flip",
    "random": "random",
    "unreliable": "unreliable",
    "alie": "ALIE, per node (z_max)",
    "alie-omniscient": "ALIE, omniscient (z_max)",
    "min-max": "min-max, omniscient",
    "rank-reversal": "rank-reversal (FRL's own)",
}
LABEL = re.compile(r"^(?P<algo>\S+) / (?P<attack>\S+)(?: (?P<pct>\d+)%)?$")


def cells(paths: Sequence[str]) -> dict[tuple[str, str], dict[str, list[float]]]:
    """``{(pct, attack): {algorithm: [final accuracy per run]}}``."""
    out: dict[tuple[str, str], dict[str, list[float]]] = {}
    for given in paths:
        pct, _, path = given.rpartition("=")
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                match = LABEL.match(row["label"])
                if match is None:
                    continue
                attack = match["attack"]
                share = "0" if attack == "none" else (pct or match["pct"] or "?")
                key = (share, "none" if attack == "none" else attack)
                runs = out.setdefault(key, {}).setdefault(match["algo"], [])
                runs.append(float(row["final-central-accuracy"]))
    return out


def _cell(values: list[float] | None) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def table(paths: Sequence[str]) -> str:
    """The markdown table of the runs in ``paths``."""
    measured = cells(paths)
    lines = [
        "| attackers | " + " | ".join(COLUMNS.values()) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    order = list(ATTACKS)
    for share, attack in sorted(
        measured,
        key=lambda k: (
            int(k[0]) if k[0].isdigit() else 999,
            order.index(k[1]) if k[1] in order else -1,
        ),
    ):
        row = measured[(share, attack)]
        name = "0%" if attack == "none" else f"{share}% {ATTACKS.get(attack, attack)}"
        lines.append(
            f"| {name} | " + " | ".join(_cell(row.get(a)) for a in COLUMNS) + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.csv or PCT=results.csv")
    print(table(parser.parse_args(argv).results))


if __name__ == "__main__":
    main()
