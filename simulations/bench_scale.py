"""Many virtual nodes on one machine (issue #6, item 4).

A real ``flwr run`` on a private simulation SuperLink (Ray engine) with N
virtual SuperNodes, a fraction of them trained per round, a small model on
per-node generated data (``synthetic``: every node has data however many
there are). While it runs, the resident memory of the whole process tree (the
SuperLink, the simulation process, Ray's GCS, raylet, object store and actors:
everything carrying the run's process tag) is sampled every 0.5 s. Reported:
wall time per round (from the run's ``metrics.json``), the time before round
1 (engine start, app load, central test), and the peak summed RSS (an upper
bound: shared pages count once per process) and PSS (shared pages split).

    python -m bouquet.simulations.bench_scale --nodes 1000 --rounds 20 --fraction 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bouquet.simulations.processes import FlowerProcesses
from bouquet.simulations.proctools import (
    APP_DIR,
    Poll,
    read_run_metrics,
    signal_pid,
    tagged_pids,
)

MEMORY_LIMIT_MB = 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
"""Kill a run's process tree past this PSS: 80% of the machine's memory."""


class MemoryLimitError(RuntimeError):
    """A run was killed for using more than :data:`MEMORY_LIMIT_MB`."""


def process_memory_kb(pid: int) -> tuple[int, int]:
    """RSS and PSS of one process in KiB (``(0, 0)`` if it has vanished).

    RSS counts a shared page (Ray's object store, torch's libraries) once per
    process that maps it; PSS splits it between them, so summed PSS is a
    process tree's real footprint.
    """
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        return 0, 0
    return rss, pss


ROLES = (
    ("bouquet.tasks.data", "data build (child of the ServerApp)"),
    ("flower-superlink", "superlink"),
    ("flwr-simulation", "flwr-simulation (engine + ServerApp)"),
    ("ClientAppActor", "ray actors"),
    ("raylet", "ray raylet"),
    ("gcs_server", "ray gcs"),
)
"""``(cmdline fragment, role)``: the first fragment found names the role."""


def process_role(pid: int) -> str:
    """What a process of the run's tree is, from its command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return "gone"
    text = cmdline.decode(errors="replace")
    for fragment, role in ROLES:
        if fragment in text:
            return role
    return "ray other" if "ray" in text else "other"


class MemoryWatch(Poll):
    """Peak summed RSS and PSS of a tag's process tree, sampled every 0.5 s.

    Past ``limit_mb`` of PSS the tree is killed (SIGKILL) before it takes the
    machine down; ``exceeded`` says so.
    """

    def __init__(self, tag: str, limit_mb: float = float("inf")) -> None:
        super().__init__(self._sample, interval=0.5)
        self.tag, self.limit_mb = tag, limit_mb
        self.peak_rss_mb = self.peak_pss_mb = 0.0
        self.samples = 0
        self.exceeded = False
        self.started = time.monotonic()
        self.peak_at_s = 0.0
        self.peak_roles: dict[str, dict[str, float]] = {}
        """At the PSS peak: per role, the processes and their summed PSS (MiB)."""
        self.role_peaks_mb: dict[str, float] = {}
        """Each role's own peak of summed PSS (MiB), whenever it occurred."""

    def _sample(self) -> None:
        pids = tagged_pids(self.tag)
        roles: dict[str, dict[str, float]] = {}
        rss = pss = 0
        for pid in pids:
            # Looked up every time: a forked process may not have exec'd yet.
            name = process_role(pid)
            one_rss, one_pss = process_memory_kb(pid)
            rss, pss = rss + one_rss, pss + one_pss
            role = roles.setdefault(name, {"processes": 0, "pss-mb": 0.0})
            role["processes"] += 1
            role["pss-mb"] += one_pss / 1024
        rss, pss = rss / 1024, pss / 1024
        for name, role in roles.items():
            self.role_peaks_mb[name] = max(
                self.role_peaks_mb.get(name, 0.0), role["pss-mb"]
            )
        if pss > self.peak_pss_mb:
            self.peak_pss_mb = pss
            self.peak_at_s = time.monotonic() - self.started
            self.peak_roles = roles
        self.peak_rss_mb = max(self.peak_rss_mb, rss)
        self.samples += 1
        if pss > self.limit_mb and not self.exceeded:
            self.exceeded = True
            for pid in pids:
                signal_pid(pid, signal.SIGKILL)


def measure(
    nodes: int,
    rounds: int,
    fraction: float,
    cpus: int,
    timeout: float = 3600.0,
    partitioner: str = "dirichlet",
) -> dict[str, Any]:
    """One many-node run (synthetic data, MLP).

    ``partitioner="natural-id"`` gives node i the synthetic client i's own
    data; ``dirichlet`` (the default, as in Bouquet's run config) re-splits
    the pooled data by label.
    """
    run_config = {
        "dataset": "synthetic",
        "partitioner": partitioner,
        "model": "mlp",
        "num-server-rounds": rounds,
        "fraction-train": fraction,
        "fraction-evaluate": 0.0,
        "local-epochs": 1,
        "min-train-nodes": 1,
    }
    result = ray_run(run_config, nodes, cpus, timeout=timeout)
    return {**result, "partitioner": partitioner}


def ray_run(
    run_config: dict[str, Any],
    nodes: int,
    cpus: int = 1,
    gpus: float = 0.0,
    timeout: float = 3600.0,
    keep_rows: bool = False,
) -> dict[str, Any]:
    """``flwr run`` of ``run_config`` on ``nodes`` virtual nodes: times and memory.

    ``gpus`` is each virtual node's GPU share (``client-resources-num-gpus``);
    ``keep_rows`` adds the run's per-round metrics rows (``"rows"``).
    """
    run_config = {**run_config, "min-available-nodes": nodes}
    rounds = int(run_config["num-server-rounds"])
    fraction = float(run_config.get("fraction-train", 1.0))
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "out"
        with FlowerProcesses(Path(work) / "procs") as procs:
            link = procs.start_simulation_superlink()
            with MemoryWatch(procs.tag, MEMORY_LIMIT_MB) as watch:
                start = time.monotonic()
                run = procs.submit_run(
                    link.connection,
                    APP_DIR,
                    run_config={**run_config, "output-dir": str(out)},
                    federation_config={
                        "num-supernodes": nodes,
                        "client-resources-num-cpus": cpus,
                        "client-resources-num-gpus": gpus,
                    },
                    timeout=timeout,
                )
                wall = time.monotonic() - start
            if watch.exceeded:
                raise MemoryLimitError(
                    f"{nodes} nodes: killed after {wall:.0f} s at "
                    f"{watch.peak_pss_mb:.0f} MB PSS ({watch.peak_rss_mb:.0f} MB RSS),"
                    f" over the {MEMORY_LIMIT_MB:.0f} MB limit"
                )
            status = procs.wait_for_run(run.run_id, link.connection, timeout=120)
        rows, _ = read_run_metrics(out)
    round_times = [r["wall-time"] for r in rows if r["round"] > 0]
    waits = [r["wait-time"] for r in rows if r["round"] > 0]
    return {
        "nodes": nodes,
        "rounds": rounds,
        "fraction-train": fraction,
        "status": status,
        "machine": f"{os.cpu_count()} CPUs, no GPU",
        "wall-s": round(wall, 1),
        "before-round-1-s": round(wall - sum(round_times), 1),
        "round-median-s": round(statistics.median(round_times), 3),
        "round-max-s": round(max(round_times), 3),
        "round-times-s": [round(t, 3) for t in round_times],
        "round-wait-median-s": round(statistics.median(waits), 3),
        "server-share-median-s": round(
            statistics.median(t - w for t, w in zip(round_times, waits, strict=True)),
            3,
        ),
        "replies-per-round": statistics.median(r["train-replies"] for r in rows[1:]),
        "error-replies": sum(r.get("error-replies", 0) for r in rows),
        "peak-rss-mb": round(watch.peak_rss_mb),
        "peak-pss-mb": round(watch.peak_pss_mb),
        "rss-samples": watch.samples,
        "peak-at-s": round(watch.peak_at_s, 1),
        "peak-by-role-mb": {
            name: {"processes": role["processes"], "pss-mb": round(role["pss-mb"])}
            for name, role in sorted(
                watch.peak_roles.items(), key=lambda item: -item[1]["pss-mb"]
            )
        },
        "role-peaks-mb": {
            name: round(mb)
            for name, mb in sorted(watch.role_peaks_mb.items(), key=lambda i: -i[1])
        },
        "final-central-accuracy": rows[-1].get("central-accuracy"),
    } | ({"rows": rows} if keep_rows else {})


def main() -> None:
    """Command-line entry point: one JSON object per node count."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--cpus", type=int, default=1)
    args = parser.parse_args()
    for n in args.nodes:
        print(json.dumps(measure(n, args.rounds, args.fraction, args.cpus)), flush=True)


if __name__ == "__main__":
    main()
