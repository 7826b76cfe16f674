"""Aggregation cost of FedLD vs FedAvg on ResNet-18-sized random updates.

Times the server rule alone (``FedLD.aggregate_deltas`` in its principal-gradient
rounds vs the weighted mean FedAvg takes), on the shapes of torchvision's
ResNet-18 (11.2M parameters, 62 entries) for m clients. Medians of repeats.

    python -m bouquet.simulations.bench_fedld_aggregation --clients 10 100 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from bouquet.strategies.aggregation import weighted_mean
from bouquet.strategies.fedld import FedLD


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """State-dict shapes of a CIFAR-stem ResNet-18 (10 classes)."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _time(fn, repeats: int) -> list[float]:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    """Print one JSON line per client count with FedAvg and FedLD medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shapes = resnet18_shapes()
    rng = np.random.default_rng(0)
    reference = {
        k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()
    }
    size = sum(v.size for v in reference.values())
    print(f"# {platform.processor() or platform.machine()}, d = {size:,} parameters")
    for m in args.clients:
        print(json.dumps(measure(reference, m, args.repeats, rng)), flush=True)


def measure(
    reference: dict[str, np.ndarray], m: int, repeats: int, rng: np.random.Generator
) -> dict[str, object]:
    """Median times of both rules on m random client models near ``reference``."""
    clients = [
        {
            k: v + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
            for k, v in reference.items()
        }
        for _ in range(m)
    ]
    fedavg = _time(lambda: weighted_mean(clients, [1.0] * m), repeats)
    strategy = FedLD(k_proportion=0.8)
    strategy.history = {k: np.zeros(1) for k in reference}  # past the first round
    fedld = _time(lambda: strategy.aggregate_deltas(reference, clients), repeats)
    return {
        "clients": m,
        "parameters": sum(v.size for v in reference.values()),
        "fedavg-median-s": round(statistics.median(fedavg), 3),
        "fedld-median-s": round(statistics.median(fedld), 3),
        "ratio": round(statistics.median(fedld) / statistics.median(fedavg), 2),
        "fedavg-s": [round(t, 3) for t in fedavg],
        "fedld-s": [round(t, 3) for t in fedld],
    }


if __name__ == "__main__":
    main()
