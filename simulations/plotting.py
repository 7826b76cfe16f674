"""Plots of per-round results: one line per run, accuracy and loss side by side."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BYTES_SO_FAR = "bytes-so-far"
"""Row key: bytes sent plus received by the end of the row's round."""


def with_bytes_so_far(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with :data:`BYTES_SO_FAR`: the running sum of both directions."""
    total, out = 0, []
    for row in rows:
        total += row.get("bytes-sent", 0) + row.get("bytes-received", 0)
        out.append({**row, BYTES_SO_FAR: total})
    return out


def plot_rounds(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    target: str | Path,
    x: str = "round",
) -> Path:
    """Plot central accuracy and train loss for every run in ``runs``.

    ``x`` is the row key on the horizontal axis: ``round``, ``sim-time``
    for asynchronous runs (simulated time), or :data:`BYTES_SO_FAR`
    (communication, both directions; :func:`with_bytes_so_far`). Where rows
    carry the worst-10% node accuracy (federated evaluation), it is drawn
    dashed beside the central accuracy, and the mean node accuracy
    (personalised) dotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    series = (
        (ax_acc, "central-accuracy", "-", ""),
        (ax_acc, "node-accuracy-worst10", "--", " (worst-10% nodes)"),
        (ax_acc, "node-accuracy-mean", ":", " (mean node)"),
        (ax_loss, "train-loss", "-", ""),
    )
    for label, rows in runs.items():
        color = None
        for ax, key, style, suffix in series:
            points = [
                (r[x], r[key])
                for r in rows
                if r.get(key) is not None and r.get(x) is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                marker = "." if len(xs) <= 200 else None
                (line,) = ax.plot(
                    xs, ys, style, marker=marker, color=color, label=label + suffix
                )
                color = line.get_color()
    xlabel = {"sim-time": "simulated time", BYTES_SO_FAR: "bytes sent + received"}.get(
        x, x
    )
    ax_acc.set(xlabel=xlabel, ylabel="central accuracy", title="Accuracy")
    ax_loss.set(xlabel=xlabel, ylabel="train loss", title="Training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    if len(runs) <= 12:
        ax_acc.legend(fontsize="small")
    fig.tight_layout()
    target = Path(target)
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
