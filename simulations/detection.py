"""Detection precision and recall of MUD-HoG runs, from their run directories.

The attackers are the simulation's (``clientapps.attacks.attacker_partitions``
of the run's seed and ``attack-fraction``); the labels are MUD-HoG's decision
in the last round (its checkpointed state). Usage::

    python -m bouquet.simulations.detection RUN_DIR [RUN_DIR ...]

prints one line per run and the mean over them.
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
    """Print the scores of the given run directories."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--num-nodes", type=int, default=10)
    args = parser.parse_args()
    scores = [run_scores(run, args.num_nodes) for run in args.runs]
    for run, score in zip(args.runs, scores, strict=True):
        print(
            f"{run.name}: precision {score['precision']:.2f} "
            f"recall {score['recall']:.2f}"
        )
    for key in ("precision", "recall"):
        values = [s[key] for s in scores]
        print(f"{key}: {np.mean(values):.2f} ± {np.std(values):.2f}")


if __name__ == "__main__":
    main()
