"""Detection precision and recall of MUD-HoG runs, from their run directories.

The attackers are the simulation's (``clientapps.attacks.attacker_partitions``
of the run's seed and ``attack-fraction``); the labels are MUD-HoG's decision
in the last round (its checkpointed state). Usage::

    python -m bouquet.simulations.detection RUN_DIR [RUN_DIR ...]

prints a table: mean ± std over the runs of each attack.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bouquet.clientapps.attacks import attacker_partitions
from bouquet.strategies.mudhog import detection_scores
from bouquet.strategies.state import load_state


def run_scores(run_dir: Path, num_nodes: int) -> dict[str, float]:
    """Precision and recall of the last round's labels of one MUD-HoG run."""
    config = json.loads((run_dir / "config.json").read_text())
    partitions = int(config.get("num-partitions") or num_nodes)
    attackers = attacker_partitions(
        partitions, float(config.get("attack-fraction", 0.0)), int(config["seed"])
    )
    if config.get("attack", "none") == "none":
        attackers = set()
    state = load_state(run_dir / "checkpoint").strategy
    labels = state["aggregator"]["combine"]["labels"]
    return detection_scores(labels, {str(p) for p in attackers})


def main() -> None:
    """Print the scores of the given run directories, grouped by attack."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--num-nodes", type=int, default=10)
    args = parser.parse_args()
    groups: dict[str, list[dict[str, float]]] = {}
    for run in args.runs:
        attack = json.loads((run / "config.json").read_text()).get("attack", "none")
        groups.setdefault(attack, []).append(run_scores(run, args.num_nodes))
    print("| attack | runs | precision | recall |\n|---|---|---|---|")
    for attack, scores in sorted(groups.items()):
        cells = [
            f"{np.mean([s[k] for s in scores]):.2f} ± "
            f"{np.std([s[k] for s in scores]):.2f}"
            for k in ("precision", "recall")
        ]
        print(f"| {attack} | {len(scores)} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
