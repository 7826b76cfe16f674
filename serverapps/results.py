"""A run directory: per-round metrics as JSON and CSV, a plot, a progress line.

Layout of ``<run-dir>/``::

    config.json        the run config the run started with
    metrics.json       one row per round (round 0 = the initial model)
    metrics.csv        the same rows, flat
    metrics.png        accuracy and loss per round
    checkpoint.npz/.json  server state after the last completed round
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from bouquet.strategies.driver import RoundReport
from bouquet.strategies.validation import NODE_ACCURACY_MEAN, NODE_ACCURACY_WORST
from bouquet.tasks import wire

ROW_FIELDS = (
    "round",
    "train-loss",
    "client-accuracy",
    "client-loss",
    NODE_ACCURACY_MEAN,
    NODE_ACCURACY_WORST,
    "central-accuracy",
    "central-loss",
    "train-replies",
    "train-dropped",
    "evaluate-replies",
    "evaluate-dropped",
    "train-missing",
    "evaluate-missing",
    "error-replies",
    "update-skipped",
    "wall-time",
    "wait-time",
    "bytes-sent",
    "bytes-received",
)


def report_to_row(report: RoundReport) -> dict[str, Any]:
    """Flatten a round report into one results row (missing values are None)."""
    row: dict[str, Any] = {
        "round": report.round,
        "train-loss": report.train_metrics.get(wire.TRAIN_LOSS),
        "client-accuracy": report.evaluate_metrics.get(wire.EVAL_ACCURACY),
        "client-loss": report.evaluate_metrics.get(wire.EVAL_LOSS),
        NODE_ACCURACY_MEAN: report.evaluate_metrics.get(NODE_ACCURACY_MEAN),
        NODE_ACCURACY_WORST: report.evaluate_metrics.get(NODE_ACCURACY_WORST),
        "central-accuracy": report.central_metrics.get("accuracy"),
        "central-loss": report.central_metrics.get("loss"),
        "train-replies": report.train_replies,
        "train-dropped": report.train_dropped,
        "evaluate-replies": report.evaluate_replies,
        "evaluate-dropped": report.evaluate_dropped,
        "train-missing": report.train_missing,
        "evaluate-missing": report.evaluate_missing,
        "error-replies": report.error_replies,
        "update-skipped": report.update_skipped,
        "wall-time": round(report.wall_time, 4),
        "wait-time": round(report.wait_time, 4),
        "bytes-sent": report.bytes_sent,
        "bytes-received": report.bytes_received,
    }
    if "perplexity" in report.central_metrics:  # a language model's
        row["central-perplexity"] = report.central_metrics["perplexity"]
    if report.client_time is not None:
        row["client-time"] = round(report.client_time, 4)
    if report.client_time_total is not None:
        row["client-time-total"] = round(report.client_time_total, 4)
    if report.sim_time is not None:
        row["sim-time"] = round(report.sim_time, 6)
    if report.staleness:
        row["staleness-mean"] = sum(report.staleness) / len(report.staleness)
        row["staleness-max"] = max(report.staleness)
    extra = {
        f"train-{k}": v
        for k, v in report.train_metrics.items()
        if k not in (wire.TRAIN_LOSS, wire.NUM_EXAMPLES)
    }
    row.update(extra)
    if report.drop_reasons:
        row["drop-reasons"] = list(report.drop_reasons)
    return row


def progress_line(row: dict[str, Any], num_rounds: int) -> str:
    """One line a person can follow, e.g. ``round 3/10 | central acc 0.874 | ...``."""

    def fmt(key: str, label: str, spec: str = ".4f") -> str | None:
        value = row.get(key)
        return None if value is None else f"{label} {value:{spec}}"

    parts = [
        f"round {row['round']}/{num_rounds}",
        fmt("train-loss", "train loss"),
        fmt("client-accuracy", "client acc"),
        fmt(NODE_ACCURACY_WORST, "worst-10% node acc"),
        fmt("central-accuracy", "central acc"),
        fmt("central-loss", "central loss"),
    ]
    if row["round"] > 0:
        parts += [
            f"replies {row['train-replies']}"
            + (f" (+{row['train-dropped']} dropped)" if row["train-dropped"] else "")
            + (f" ({row['train-missing']} missing)" if row["train-missing"] else ""),
            f"{row['wall-time']:.2f}s",
            fmt("sim-time", "sim time", ".2f"),
            fmt("staleness-max", "max staleness", "d"),
            f"sent {row['bytes-sent'] / 1e6:.2f}MB "
            f"recv {row['bytes-received'] / 1e6:.2f}MB",
        ]
        if row["update-skipped"]:
            parts.append("UPDATE SKIPPED")
    return " | ".join(p for p in parts if p)


class RunDirectory:
    """Writes a run's results; reopening an existing directory continues it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        if (metrics := self.path / "metrics.json").exists():
            self.rows = json.loads(metrics.read_text())["rounds"]

    @property
    def checkpoint_stem(self) -> Path:
        """Stem of the checkpoint files (see :mod:`strategies.state`)."""
        return self.path / "checkpoint"

    def write_config(self, run_config: dict[str, Any]) -> None:
        """Save the run config (first start only)."""
        target = self.path / "config.json"
        if not target.exists():
            target.write_text(json.dumps(run_config, indent=1, sort_keys=True))

    def add(self, report: RoundReport) -> dict[str, Any]:
        """Record a round (replacing a row of the same round after a resume)."""
        row = report_to_row(report)
        self.rows = [r for r in self.rows if r["round"] < row["round"]] + [row]
        self._write()
        return row

    def _write(self) -> None:
        tmp = self.path / "metrics.json.tmp"
        tmp.write_text(json.dumps({"rounds": self.rows}, indent=1))
        os.replace(tmp, self.path / "metrics.json")
        columns = list(ROW_FIELDS) + sorted(
            {k for r in self.rows for k in r} - set(ROW_FIELDS) - {"drop-reasons"}
        )
        with open(self.path / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)

    def plot(self, title: str = "") -> Path:
        """Draw accuracy and loss per round to ``metrics.png``."""
        from bouquet.simulations.plotting import plot_rounds

        target = self.path / "metrics.png"
        plot_rounds({title or self.path.name: self.rows}, target)
        return target


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Final numbers of a run: last central accuracy, best, total time and bytes."""
    trained = [r for r in rows if r["round"] > 0]
    accs = [
        r["central-accuracy"] for r in rows if r.get("central-accuracy") is not None
    ]
    personal = [r for r in trained if r.get(NODE_ACCURACY_MEAN) is not None]
    perplexity = [r["central-perplexity"] for r in rows if "central-perplexity" in r]
    language_model = {"final-central-perplexity": perplexity[-1]} if perplexity else {}
    return {
        "rounds": len(trained),
        "final-central-accuracy": accs[-1] if accs else None,
        "best-central-accuracy": max(accs) if accs else None,
        "final-node-accuracy-mean": personal[-1][NODE_ACCURACY_MEAN]
        if personal
        else None,
        "final-node-accuracy-worst10": (
            personal[-1][NODE_ACCURACY_WORST] if personal else None
        ),
        "wall-time": sum(r["wall-time"] for r in trained),
        "sim-time": rows[-1].get("sim-time") if rows else None,
        "bytes-sent": sum(r["bytes-sent"] for r in trained),
        "bytes-received": sum(r["bytes-received"] for r in trained),
        "dropped-replies": sum(
            r["train-dropped"] + r["evaluate-dropped"] for r in trained
        ),
        "error-replies": sum(r.get("error-replies", 0) for r in trained),
        "missing-replies": sum(
            r.get("train-missing", 0) + r.get("evaluate-missing", 0) for r in trained
        ),
        **language_model,
    }


__all__ = ["RunDirectory", "progress_line", "report_to_row", "summary"]
