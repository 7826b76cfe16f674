"""The final model's loss on the training data: the objective ``f`` itself.

A run reports the central test loss and accuracy; optimisation papers (DIFF2,
for one) measure the training objective ``f(x) = (1/P) sum_p f_p(x)``
instead. This reads a finished run's directory (``config.json`` and the last
checkpoint), rebuilds its partitions and model, and prints the mean
cross-entropy and accuracy of the final model over every node's training
part (weighted by rows: with equal IID partitions, the same as the mean of the
nodes' ``f_p``).

    python -m bouquet.simulations.train_loss RUN_DIR [RUN_DIR ...] \
        --num-partitions 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bouquet.strategies.state import load_state
from bouquet.tasks import DataSpec, build_model, dataset_info, load_client_data


def train_objective(run_dir: str | Path, num_partitions: int) -> dict[str, float]:
    """``{"train-loss", "train-accuracy", "round"}`` of the run's last checkpoint."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    spec = DataSpec.from_run_config(config, num_partitions)
    info = dataset_info(spec)
    state = load_state(run_dir / "checkpoint")
    model = build_model(
        config["model"], info, norm=config.get("model-norm", "batch"), initialize=False
    )
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.arrays.items()})
    model.eval()
    loss_sum, correct, rows = 0.0, 0, 0
    with torch.no_grad():
        for partition in range(spec.num_partitions):
            data = load_client_data(spec, partition)
            logits = model(data.train_x)
            loss_sum += float(
                torch.nn.functional.cross_entropy(logits, data.train_y, reduction="sum")
            )
            correct += int((logits.argmax(1) == data.train_y).sum())
            rows += len(data.train_y)
    return {
        "round": float(state.round),
        "train-loss": loss_sum / rows,
        "train-accuracy": correct / rows,
    }


def main(argv: list[str] | None = None) -> None:
    """Print the training objective of each run directory given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--num-partitions", type=int, required=True)
    args = parser.parse_args(argv)
    for run in args.runs:
        print(json.dumps({"run": run, **train_objective(run, args.num_partitions)}))


if __name__ == "__main__":
    main()
