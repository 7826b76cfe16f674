"""Deployment round latency with 2 SuperNodes, split into Flower's share and ours.

A real ``flower-superlink`` and two ``flower-supernode`` processes on loopback
(:class:`~simulations.processes.FlowerProcesses`) run Bouquet's FedAvg for a
few rounds of training (central evaluation after each; no federated
evaluation, so a round is one Grid round trip). Every round's row in the run's
``metrics.json`` already carries the three numbers the split needs:

- ``wall-time``: the round as the ServerApp saw it;
- ``wait-time``: the part spent waiting for replies (push, SuperNode pickup,
  the ClientApp, the way back);
- ``client-time``: the longest train handler of the round, measured inside
  Bouquet's ClientApp (imports it triggers, data, model, training, reply).

So per round: **ours on the server** = wall - wait (configure, validate,
aggregate, central evaluation, checkpoint, results); **ours on the client** =
client-time; **Flower's** = wait - client-time (SuperLink and SuperNode
polling, starting a fresh ``flwr-clientapp`` process per message, its Python
and ``flwr`` imports, serialisation and transport). The split is exact for the
node on the critical path; with two nodes of equal partitions (``iid``) the
other finishes about as late.

    python -m bouquet.simulations.bench_deployment --rounds 6 --model cnn
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bouquet.simulations.processes import FlowerProcesses
from bouquet.simulations.proctools import APP_DIR, STATUS_COMPLETED, read_run_metrics

NODES = 2


def split(row: dict[str, Any]) -> dict[str, float]:
    """One round's latency and its shares (seconds)."""
    wall, wait = float(row["wall-time"]), float(row["wait-time"])
    client = float(row.get("client-time") or 0.0)
    return {
        "round": wall,
        "ours-server": wall - wait,
        "ours-client": client,
        "flower": wait - client,
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "median-s": round(statistics.median(values), 3),
        "min-s": round(min(values), 3),
        "max-s": round(max(values), 3),
    }


def measure(
    run_config: dict[str, Any], rounds: int, threads: int = 0
) -> dict[str, Any]:
    """One deployment run; medians over rounds 2 and later, round 1 apart.

    ``threads`` > 0 caps every Flower process's OpenMP/torch threads
    (``OMP_NUM_THREADS``): two ClientApps on 2 cores each start torch's
    default of one thread per core, 4 busy threads on 2 cores.
    """
    config = {
        **run_config,
        "algorithm": "fedavg",
        "num-server-rounds": rounds,
        "fraction-train": 1.0,
        "fraction-evaluate": 0.0,
        "partitioner": "iid",
        "min-available-nodes": NODES,
    }
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "out"
        env = {"OMP_NUM_THREADS": str(threads)} if threads > 0 else None
        with FlowerProcesses(Path(work) / "procs", env=env) as procs:
            deployment = procs.start_deployment(NODES)
            connection = deployment.superlink.connection
            run = procs.submit_run(
                connection,
                APP_DIR,
                run_config={**config, "output-dir": str(out)},
                timeout=60 + 60 * rounds,
            )
            status = procs.wait_for_run(run.run_id, connection, timeout=120)
            if status != STATUS_COMPLETED:
                raise RuntimeError(f"Run ended {status}:\n{run.output[-4000:]}")
        rows, _ = read_run_metrics(out)
    splits = [split(r) for r in rows if r["round"] > 0]
    steady = splits[1:] or splits
    return {
        "machine": f"{os.cpu_count()} CPUs, no GPU",
        "nodes": NODES,
        "rounds": rounds,
        "workload": {k: config[k] for k in ("dataset", "model", "local-epochs")},
        "threads-per-process": threads or "torch default",
        "submit-to-end-s": round(run.submit_seconds, 1),
        "round-1": {k: round(v, 3) for k, v in splits[0].items()},
        "rounds-2+": {k: _stats([s[k] for s in steady]) for k in steady[0]},
        "final-central-accuracy": rows[-1].get("central-accuracy"),
    }


def main() -> None:
    """Command-line entry point: one JSON object."""
    from bouquet.simulations.inprocess import app_defaults

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=0, help="OMP_NUM_THREADS (0: torch default)"
    )
    args = parser.parse_args()
    config = {
        **app_defaults(),
        "dataset": args.dataset,
        "model": args.model,
        "local-epochs": args.local_epochs,
    }
    print(json.dumps(measure(config, args.rounds, args.threads), indent=1))


if __name__ == "__main__":
    main()
