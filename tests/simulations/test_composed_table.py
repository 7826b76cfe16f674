"""The composed run's table reads a sweep's results and each run's metrics."""

import csv
import json

from bouquet.simulations.composed_table import rows


def _run(tmp_path, name, accuracy, epsilon=None):
    rounds = [{"round": 0, "bytes-received": 0}]
    for r in (1, 2):
        row = {"round": r, "bytes-received": 1000 * r}
        if epsilon is not None:
            row["train-dp-sgd.epsilon"] = epsilon * r / 2
        rounds.append(row)
    (tmp_path / "runs" / name).mkdir(parents=True)
    (tmp_path / "runs" / name / "metrics.json").write_text(
        json.dumps({"rounds": rounds})
    )
    return {"run-dir": f"runs/{name}", "final-central-accuracy": accuracy}


def test_arms_are_rows_with_mean_std_bytes_and_epsilon(tmp_path):
    records = [
        {"label": "fedld / alone", **_run(tmp_path, "a0", 0.9)},
        {"label": "fedld / alone", **_run(tmp_path, "a1", 0.8)},
        {"label": "fedld / composed", **_run(tmp_path, "c0", 0.5, epsilon=8.0)},
    ]
    with open(tmp_path / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=["label", "run-dir", "final-central-accuracy"]
        )
        writer.writeheader()
        writer.writerows(records)
    lines = rows(tmp_path / "results.csv")
    assert lines[2] == "| FedLD | alone | 0.8500 ± 0.0707 | 2 | - |"
    assert lines[3] == "| FedLD | all three | 0.5000 ± 0.0000 | 2 | 8.00 ± 0.00 |"
    assert len(lines) == 4
