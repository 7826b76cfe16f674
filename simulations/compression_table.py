"""The compression table of docs/compression.md: one workload, every compressor.

For each sweep label of the given ``results.csv`` files (``simulations.sweep``
output): uplink bytes per round measured from the serialised replies
(``bytes-received / rounds``), their ratio to dense float32 FedAvg's, the
compressor's declared ratio, final accuracy (mean ± std over seeds), and the
compressor's encode and decode time on a vector of the workload's size
(fastest of repeats, this machine). Usage::

    python -m bouquet.simulations.compression_table results.csv [...] > table.md
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Callable

import numpy as np

from bouquet.tasks import compression

D = 17_226
"""Float entries of the digits MLP (the workload's model)."""

CODECS: dict[str, Callable[[], compression.Compressor]] = {
    "fedavg (dense)": compression.Identity,
    "fedavg + identity": compression.Identity,
    "fedavg + top-1%": lambda: compression.TopK(172),
    "fedavg + top-1% + error feedback": lambda: compression.TopK(172),
    "ef21 top-1%": lambda: compression.TopK(172),
    "econtrol top-1% eta 0.05": lambda: compression.TopK(172),
    "econtrol top-1% eta 0.1": lambda: compression.TopK(172),
    "fedavg + randk (compressor-k = 172)": lambda: compression.RandK(172),
    "fedavg + sign": compression.ScaledSign,
    "fedavg + qsgd (compressor-levels = 16)": lambda: compression.QSGD(16),
    "fedavg + quantize (compressor-levels = 16)": lambda: compression.Quantize(16),
    "fedavg + fedzip": compression.FedZip,
    "fedzip z=0.2 k=3": compression.FedZip,
    "fedavg + top-20% (top-z only)": lambda: compression.TopK(3446),
    "fedzip, official min-max start (superseded)": compression.FedZip,
    "fedavg + fedzip, min-max start (superseded)": compression.FedZip,
}


def timing(codec: compression.Compressor, repeats: int = 20) -> tuple[float, float]:
    """Fastest encode and decode time (ms) of a length-``D`` Gaussian vector.

    The minimum over repeats: on a shared machine it is the least disturbed.
    """
    x = np.random.default_rng(0).standard_normal(D)
    rng = np.random.default_rng(1)
    encode, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        payload = codec.encode(x, rng)
        middle = time.perf_counter()
        codec.decode(payload, D)
        encode.append(middle - start)
        decode.append(time.perf_counter() - middle)
    return 1e3 * min(encode), 1e3 * min(decode)


def main() -> None:
    """Print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="sweep results.csv files")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {}
    for path in args.results:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows.setdefault(row["label"], []).append(row)

    def per_round(label: str) -> float:
        runs = rows[label]
        return statistics.mean(
            float(r["bytes-received"]) / float(r["rounds"]) for r in runs
        )

    dense = per_round("fedavg (dense)")
    print(
        "| run | uplink bytes / round (measured) | ratio vs float32 FedAvg "
        "| declared ratio | final accuracy (3 seeds) | encode ms | decode ms |"
    )
    print("|---|---|---|---|---|---|---|")
    order = [label for label in CODECS if label in rows]
    for label in order + [label for label in rows if label not in CODECS]:
        runs = rows[label]
        accuracy = [float(r["final-central-accuracy"]) for r in runs]
        spread = statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0
        codec = CODECS[label]() if label in CODECS else None
        declared = f"{codec.ratio(D):.1f}" if codec else "-"
        enc, dec = timing(codec) if codec else (float("nan"), float("nan"))
        print(
            f"| {label} | {per_round(label):,.0f} | {dense / per_round(label):.1f} "
            f"| {declared} | {statistics.mean(accuracy):.3f} ± {spread:.3f} "
            f"| {enc:.2f} | {dec:.2f} |"
        )


if __name__ == "__main__":
    main()
