"""MoDeST with half the nodes killed mid-run (the spec's failure experiment).

``shared/algorithms/modest.md``: "kill a random 50% of nodes mid-run; expected:
MoDeST recovers after failures". The reproduction config
(``simulations/configs/modest/modest.toml``) runs twice per seed on the
in-process runner: as is, and with a seeded random half of the nodes raising
on every call from server round ``--kill-round`` on (a crashed node: its
replies are errors, MoDeST drops it from the view and samples the others).

    python -m bouquet.simulations.modest_failures --out /tmp/modest-failures
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any

from bouquet.simulations.sweep import load_override_file

CONFIG = Path(__file__).parent / "configs" / "modest" / "modest.toml"


def run_arm(seed: int, kill_round: int | None, out: Path) -> dict[str, Any]:
    """One run; its accuracy before the kill, lowest after it, and final."""
    from bouquet.clientapps.app import app
    from bouquet.simulations.inprocess import run_inprocess
    from bouquet.tasks import wire

    overrides, options = load_override_file(CONFIG)
    nodes = int(options["num-nodes"])
    # The in-process runner's node ids are 1000 + partition-id.
    killed = random.Random(seed).sample(range(1000, 1000 + nodes), nodes // 2)

    def client(msg, context):  # noqa: ANN001, ANN202 (a ClientApp callable)
        rnd = int(wire.config_of(msg.content).get(wire.SERVER_ROUND, 0))
        if kill_round is not None and rnd >= kill_round and context.node_id in killed:
            raise RuntimeError("node killed")
        return app(msg, context)

    config = {**overrides, "seed": seed, "plot": False, "output-dir": str(out)}
    _, path, _ = run_inprocess(config, num_nodes=nodes, client_app=client)
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    accuracy = [r["central-accuracy"] for r in rows]
    row: dict[str, Any] = {
        "seed": seed,
        "killed": len(killed) if kill_round is not None else 0,
        "final-accuracy": accuracy[-1],
        "final-view": rows[-1].get("train-modest-view"),
        "error-replies": sum(r.get("error-replies", 0) for r in rows),
    }
    if kill_round is not None:
        row["accuracy-before-kill"] = accuracy[kill_round - 1]
        row["lowest-after-kill"] = min(accuracy[kill_round:])
    return row


def main(argv: list[str] | None = None) -> None:
    """Run both arms for every seed; print and write ``results.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-round", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"kill-round": args.kill_round, "intact": [], "half-killed": []}
    for seed in args.seeds:
        results["intact"].append(run_arm(seed, None, out / "runs"))
        results["half-killed"].append(run_arm(seed, args.kill_round, out / "runs"))
    for arm in ("intact", "half-killed"):
        finals = [r["final-accuracy"] for r in results[arm]]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        results[f"{arm}-final"] = f"{statistics.mean(finals):.3f} ± {std:.3f}"
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
