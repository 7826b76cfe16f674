"""Many small clients: Bouquet against fluke, and what Ray adds (issue #18).

Three measurements, each in fresh processes on this machine:

1. ``table``: FedAvg, 50 clients, the MLP on digits (Dirichlet 0.3, every
   client every round, 1 local epoch, batch 16, plain SGD lr 0.1: the FedAvg
   paper's client; fluke keeps each client's optimizer between rounds, so
   with momentum the two would run different algorithms),
   10 rounds, run by Bouquet's in-process runner and by fluke
   (``fluke-fl``, https://github.com/makgyver/fluke) on the *same* partitions
   (Bouquet's cached train splits) from the *same* initial weights, then by
   Bouquet on Ray (``flwr run``). Reported: the median of rounds 3-10 and the
   peak RSS of each process tree. fluke runs in its own interpreter
   (``--fluke-python``: its dependencies are heavy, so keep it in its own
   virtual environment); without one the row says so.
2. ``ray-small``: 200 Ray nodes of about 6 examples each (IID), half of them
   per round: round time x cores against the summed ``client-time`` of the
   round's replies (each ClientApp handler timed inside: data, model,
   training, packing).
3. ``scale`` (1,000 and 10,000 nodes): :mod:`simulations.bench_scale`.

Fairness: Bouquet's round includes its central evaluation (360 examples,
every round); fluke's evaluates only in rounds 1 and 10 (its torchmetrics
evaluation would otherwise add to its rounds), so the comparison leans
against Bouquet. fluke skips a last batch of one example, Bouquet trains on
it; both report the central test accuracy after 10 rounds.

    python -m bouquet.simulations.bench_small_clients --fluke-python PATH
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

TABLE_CONFIG: dict[str, Any] = {
    "algorithm": "fedavg",
    "dataset": "digits",
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.3,
    "model": "mlp",
    "num-server-rounds": 10,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "local-epochs": 1,
    "batch-size": 16,
    "lr": 0.1,
    "momentum": 0.0,
    "weight-decay": 0.0,
    "seed": 42,
    "plot": False,
}
"""The table's workload, as Bouquet run-config overrides."""

SKIP_ROUNDS = 2
"""Rounds left out of the median (imports, first allocations)."""


def _later_median(times: list[float]) -> float:
    return round(statistics.median(times[SKIP_ROUNDS:]), 4)


def _peak_rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


# --------------------------------------------------------------- the workload
def write_workload(nodes: int, path: Path) -> dict[str, Any]:
    """Bouquet's partitions, central test split and initial model, for fluke."""
    import torch

    from bouquet.simulations.inprocess import app_defaults
    from bouquet.tasks import (
        DataSpec,
        build_model,
        dataset_info,
        load_central_test,
        load_client_data,
    )
    from bouquet.tasks.data import prepare_caches

    config = {**app_defaults(), **TABLE_CONFIG}
    spec = DataSpec.from_run_config(config, num_partitions=nodes)
    prepare_caches(spec)
    parts = [load_client_data(spec, i) for i in range(nodes)]
    info = dataset_info(spec)
    model = build_model(
        config["model"], info, norm=config["model-norm"], seed=config["seed"]
    )
    test_x, test_y = load_central_test(spec)
    torch.save(
        {
            "train": [(p.train_x, p.train_y) for p in parts],
            "test": (test_x, test_y),
            "model": model,
            "num_classes": info.num_classes,
            "config": {k: config[k] for k in TABLE_CONFIG},
        },
        path,
    )
    sizes = [len(p.train_y) for p in parts]
    return {"train-examples": sum(sizes), "smallest": min(sizes), "largest": max(sizes)}


# ------------------------------------------------------------ Bouquet in-process
def bouquet_inprocess(nodes: int, rounds: int) -> dict[str, Any]:
    """One in-process FedAvg run (this process); its round times and RSS."""
    from bouquet.simulations.inprocess import run_inprocess

    with tempfile.TemporaryDirectory() as out:
        config = {**TABLE_CONFIG, "num-server-rounds": rounds, "output-dir": out}
        start = time.perf_counter()
        _, path, _ = run_inprocess(config, num_nodes=nodes)
        wall = time.perf_counter() - start
        rows = json.loads((path / "metrics.json").read_text())["rounds"]
    walls = [r["wall-time"] for r in rows if r["round"] > 0]
    return {
        "framework": "bouquet-inprocess",
        "round-times-s": [round(t, 4) for t in walls],
        "round-median-s": _later_median(walls),
        "wall-s": round(wall, 2),
        "final-accuracy": rows[-1]["central-accuracy"],
        "client-time-total-median-s": _later_median(
            [r["client-time-total"] for r in rows if r["round"] > 0]
        ),
        "peak-rss-mb": _peak_rss_mb(),
    }


# ------------------------------------------------------------------ fluke side
def fluke_worker(workload: Path) -> dict[str, Any]:
    """FedAvg in fluke on the workload file (run in fluke's interpreter).

    Imports only torch and fluke: this file is run by path there.
    """
    import torch
    from fluke import DDict, FlukeENV
    from fluke.algorithms.fedavg import FedAVG
    from fluke.data import FastDataLoader
    from fluke.evaluation import ClassificationEval

    data = torch.load(workload, weights_only=False)
    config = data["config"]
    rounds = int(config["num-server-rounds"])
    classes = int(data["num_classes"])
    env = FlukeENV()
    env.set_seed(int(config["seed"]))
    env.set_evaluator(ClassificationEval(eval_every=rounds, n_classes=classes))
    env.set_eval_cfg(pre_fit=False, post_fit=False, locals=False, server=True)

    class Splitter:
        """fluke's DataSplitter interface, returning Bouquet's partitions."""

        def assign(self, n_clients: int, batch_size: int):  # noqa: ANN202
            train = [
                FastDataLoader(
                    x, y, num_labels=classes, batch_size=batch_size, shuffle=True
                )
                for x, y in data["train"]
            ]
            test_x, test_y = data["test"]
            server = FastDataLoader(test_x, test_y, num_labels=classes, batch_size=512)
            return (train, [None] * n_clients), server

    hyper = DDict(
        client=DDict(
            batch_size=int(config["batch-size"]),
            local_epochs=int(config["local-epochs"]),
            loss="CrossEntropyLoss",
            optimizer=DDict(
                name="SGD",
                lr=float(config["lr"]),
                momentum=float(config["momentum"]),
                weight_decay=float(config["weight-decay"]),
            ),
            scheduler=DDict(name="StepLR", step_size=1, gamma=1.0),
        ),
        server=DDict(weighted=True),
        model=data["model"],
    )

    class Clock:
        """Observer: wall time of each round, and the last evaluation."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.accuracy: float | None = None
            self._start = 0.0

        def start_round(self, round: int, global_model: Any) -> None:
            self._start = time.perf_counter()

        def end_round(self, round: int) -> None:
            self.times.append(time.perf_counter() - self._start)

        def server_evaluation(
            self, round: int, eval_type: str, evals: dict, **_: Any
        ) -> None:
            if eval_type == "global" and "accuracy" in evals:
                self.accuracy = float(evals["accuracy"])

    nodes = len(data["train"])
    algorithm = FedAVG(nodes, Splitter(), hyper)
    clock = Clock()
    algorithm.attach(clock)
    start = time.perf_counter()
    algorithm.run(rounds, 1.0)
    wall = time.perf_counter() - start
    import fluke as fluke_package

    return {
        "framework": f"fluke {getattr(fluke_package, '__version__', '?')}",
        "round-times-s": [round(t, 4) for t in clock.times],
        "round-median-s": _later_median(clock.times),
        "wall-s": round(wall, 2),
        "final-accuracy": clock.accuracy,
        "peak-rss-mb": _peak_rss_mb(),
    }


# ----------------------------------------------------------------- subprocesses
def _child(
    command: list[str], env: dict[str, str] | None = None, timeout: float = 1800
) -> dict[str, Any]:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command[:4])} failed ({done.returncode}): {done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""Both in-process frameworks run their clients one after another: one torch
thread each (two threads on two busy cores spin at every barrier; the
server's evaluation of this MLP took 17 ms instead of 0.6 ms)."""


def table(
    nodes: int = 50, rounds: int = 10, fluke_python: str = "", repeats: int = 3
) -> dict[str, Any]:
    """Section 1: Bouquet in-process and fluke, interleaved; then Bouquet on Ray."""
    from bouquet.simulations.bench_scale import ray_run
    from bouquet.tasks.fab import module_command

    env = {**os.environ, **THREADS_ENV}
    runs: dict[str, list[dict[str, Any]]] = {
        "bouquet-inprocess": [],
        "fluke": [],
        "fluke-default-threads": [],
    }
    with tempfile.TemporaryDirectory() as work:
        workload = Path(work) / "workload.pt"
        data = write_workload(nodes, workload)
        bouquet = module_command(
            "simulations.bench_small_clients",
            "inprocess",
            "--nodes",
            str(nodes),
            "--rounds",
            str(rounds),
        )
        for _ in range(repeats):
            runs["bouquet-inprocess"].append(_child(bouquet, env=env))
            if fluke_python:
                fluke = [fluke_python, __file__, "fluke-worker", str(workload)]
                runs["fluke"].append(_child(fluke, env=env))
                runs["fluke-default-threads"].append(_child(fluke))
    ray = ray_run({**TABLE_CONFIG, "num-server-rounds": rounds}, nodes, cpus=1)
    runs["bouquet-ray"] = [
        {
            "framework": "bouquet-ray",
            "round-times-s": ray["round-times-s"],
            "round-median-s": _later_median(ray["round-times-s"]),
            "wall-s": ray["wall-s"],
            "final-accuracy": ray["final-central-accuracy"],
            "peak-rss-mb": ray["peak-rss-mb"],
            "peak-pss-mb": ray["peak-pss-mb"],
        }
    ]
    summary = {
        name: {
            "round-median-s": statistics.median(r["round-median-s"] for r in rows),
            "round-medians-s": [r["round-median-s"] for r in rows],
            "peak-rss-mb": max(r["peak-rss-mb"] for r in rows),
            "final-accuracy": statistics.median(r["final-accuracy"] for r in rows),
            "framework": rows[0]["framework"],
        }
        for name, rows in runs.items()
        if rows
    }
    if "fluke" in summary:
        ours = summary["bouquet-inprocess"]
        theirs = min(
            (summary[n] for n in ("fluke", "fluke-default-threads")),
            key=lambda s: s["round-median-s"],
        )  # fluke's faster setting
        summary["time-ratio"] = round(
            ours["round-median-s"] / theirs["round-median-s"], 2
        )
        summary["rss-ratio"] = round(
            ours["peak-rss-mb"]
            / min(
                summary[n]["peak-rss-mb"] for n in ("fluke", "fluke-default-threads")
            ),
            2,
        )
    return {
        "nodes": nodes,
        "rounds": rounds,
        "repeats": repeats,
        "data": data,
        "summary": summary,
        "runs": runs,
        "fluke": "" if fluke_python else "not measured: no fluke interpreter given",
    }


def ray_small(
    nodes: int = 200, fraction: float = 0.5, rounds: int = 10
) -> dict[str, Any]:
    """Section 2: round time x cores against the clients' own summed time."""
    from bouquet.simulations.bench_scale import ray_run

    config = {
        **TABLE_CONFIG,
        "partitioner": "iid",
        "num-server-rounds": rounds,
        "fraction-train": fraction,
        "min-train-nodes": 1,
    }
    run = ray_run(config, nodes, cpus=1, keep_rows=True)
    rows = [r for r in run["rows"] if r["round"] > 0]
    cores = os.cpu_count() or 1
    walls = [r["wall-time"] for r in rows]
    compute = [r.get("client-time-total", 0.0) for r in rows]
    multiples = [w * cores / c for w, c in zip(walls, compute, strict=True) if c > 0]
    return {
        "nodes": nodes,
        "fraction-train": fraction,
        "rounds": rounds,
        "cores": cores,
        "round-median-s": _later_median(walls),
        "client-time-total-median-s": _later_median(compute),
        "replies-per-round": statistics.median(r["train-replies"] for r in rows),
        "multiple-median": round(statistics.median(multiples[SKIP_ROUNDS:]), 2),
        "round-times-s": [round(t, 3) for t in walls],
        "client-time-total-s": [round(t, 4) for t in compute],
        "peak-rss-mb": run["peak-rss-mb"],
        "peak-pss-mb": run["peak-pss-mb"],
        "final-accuracy": run["final-central-accuracy"],
    }


FLUKE_ENV = "BOUQUET_FLUKE_PYTHON"
"""The bench suite's way to name fluke's interpreter."""


def measure(quick: bool = False, fluke_python: str = "") -> dict[str, Any]:
    """Both sections (``quick``: a smoke run of the machinery)."""
    fluke_python = fluke_python or os.environ.get(FLUKE_ENV, "")
    if quick:
        return {
            "table": table(10, 3, fluke_python, repeats=1),
            "ray-small": ray_small(20, 0.5, 3),
        }
    return {"table": table(fluke_python=fluke_python), "ray-small": ray_small()}


def _spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}" if len(values) > 1 else ""


def render(result: dict[str, Any]) -> list[str]:
    """The ``docs/benchmarks.md`` section."""
    tab, small = result["table"], result["ray-small"]
    summary = tab["summary"]
    names = [
        n
        for n in ("fluke", "fluke-default-threads", "bouquet-inprocess", "bouquet-ray")
        if n in summary
    ]
    label = {
        "fluke": summary.get("fluke", {}).get("framework", "fluke"),
        "fluke-default-threads": "same, torch's default threads",
        "bouquet-inprocess": "Bouquet in-process",
        "bouquet-ray": "Bouquet on Ray",
    }
    lines = [
        "## 6. Many small clients (fluke side by side; Ray's overhead)",
        "",
        f"FedAvg, {tab['nodes']} clients, MLP on digits (Dirichlet 0.3, "
        f"{tab['data']['smallest']}-{tab['data']['largest']} training examples "
        f"each), every client every round, {tab['rounds']} rounds, 1 epoch, batch "
        "16, plain SGD lr 0.1, one torch thread (fluke also with torch's "
        "default). fluke runs on Bouquet's partitions from Bouquet's initial "
        "weights (`simulations/"
        "bench_small_clients.py`); in-process runs interleaved, "
        f"{tab['repeats']} each. Median of rounds 3-{tab['rounds']}; RSS of the "
        "whole process (tree, on Ray).",
        "",
        "| | " + " | ".join(label[n] for n in names) + " |",
        "|---|" + "---|" * len(names),
        "| later rounds, median (s) | "
        + " | ".join(
            f"{summary[n]['round-median-s']:.3f}"
            + (
                f" ({_spread(summary[n]['round-medians-s'])})"
                if len(summary[n]["round-medians-s"]) > 1
                else ""
            )
            for n in names
        )
        + " |",
        "| peak RSS (MB) | "
        + " | ".join(f"{summary[n]['peak-rss-mb']}" for n in names)
        + " |",
        "| central accuracy after the last round | "
        + " | ".join(f"{summary[n]['final-accuracy']:.3f}" for n in names)
        + " |",
        "",
    ]
    if "time-ratio" in summary:
        lines += [
            "Bouquet in-process / fluke (its faster setting): "
            f"{summary['time-ratio']}x per round "
            f"(target <= 1.0x: {'met' if summary['time-ratio'] <= 1.0 else 'missed'}),"
            f" {summary['rss-ratio']}x peak RSS (target <= 1.0x: "
            f"{'met' if summary['rss-ratio'] <= 1.0 else 'missed'}).",
            "",
        ]
    else:
        lines += [f"fluke: {tab['fluke']}.", ""]
    target = small["multiple-median"] <= 3.0
    lines += [
        f"Ray, {small['nodes']} nodes (IID, about 6 examples each), "
        f"{small['replies-per-round']:.0f} per round: a round takes "
        f"{small['round-median-s']:.3f} s (median of rounds 3-{small['rounds']}) "
        f"where the clients' handlers sum to {small['client-time-total-median-s']:.3f}"
        f" s; round x {small['cores']} cores / summed client time = "
        f"{small['multiple-median']}x (target <= 3x: "
        f"{'met' if target else 'missed'}). Peak RSS {small['peak-rss-mb']} MB, "
        f"PSS {small['peak-pss-mb']} MB.",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    """Run the chosen part; print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "part",
        nargs="?",
        default="all",
        choices=["all", "table", "ray-small", "inprocess", "fluke-worker"],
    )
    parser.add_argument("workload", nargs="?", default="")
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fluke-python", default="")
    args = parser.parse_args(argv)
    if args.part == "inprocess":
        print(json.dumps(bouquet_inprocess(args.nodes, args.rounds)))
        return
    if args.part == "fluke-worker":
        print(json.dumps(fluke_worker(Path(args.workload))))
        return
    results: dict[str, Any] = {}
    if args.part == "all":
        results = measure(fluke_python=args.fluke_python)
        print("\n".join(render(results)))
    if args.part == "table":
        results["table"] = table(args.nodes, args.rounds, args.fluke_python)
    if args.part == "ray-small":
        results["ray-small"] = ray_small()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
