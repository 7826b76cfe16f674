"""ClientApp cold start: what a fresh ``flwr-clientapp`` process pays per message.

In a deployment Flower starts a new ClientApp process for every message, so
imports and data loading are paid once per node per round. Each repetition
runs in a new Python process (like Flower's) and times, in order: ``import
torch``, ``import flwr``, ``import clientapps.app`` (Bouquet's import), then
building the model and loading the node's partition from the prepared disk
cache (Bouquet's data-ready time; the cache is filled once before timing),
the first ``torch.optim`` optimizer (which imports ``torch._dynamo``: any
PyTorch client pays it) and the client routine the train handler loads (one
recipe module; the client never imports the server's strategies).

    python -m bouquet.simulations.bench_cold_start --repeats 5 \
        [--dataset digits --model cnn]

Prints one JSON object: median, min and max of each phase in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import flwr.app  # noqa: F401
from flwr.app import Context, RecordDict
t2 = time.perf_counter()
import bouquet.clientapps.app as bouquet
t3 = time.perf_counter()
run_config = json.loads(sys.argv[1])
context = Context(run_id=1, node_id=1, node_config={"partition-id": 0,
    "num-partitions": 10}, state=RecordDict(), run_config=run_config)
with bouquet._model_and_data(context.run_config, context) as (model, _, _):
    t4 = time.perf_counter()
    torch.optim.SGD(model.parameters(), lr=0.1)  # first use imports torch._dynamo
    t5 = time.perf_counter()
from bouquet.clientapps.recipes import get_recipe
get_recipe("fedprox")  # the one recipe module a train message names
t6 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "import flwr": t2 - t1,
    "import clientapps.app": t3 - t2, "model + data ready": t4 - t3,
    "first torch.optim (imports torch._dynamo)": t5 - t4,
    "client routine (one recipe)": t6 - t5}))
"""


def measure(run_config: dict, repeats: int, cache_dir: str) -> dict[str, dict]:
    """Run the child ``repeats`` times (after one warm-up that fills the cache)."""
    env = {**os.environ, "BOUQUET_CACHE_DIR": cache_dir, "HF_DATASETS_OFFLINE": "1"}
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-c", _CHILD, json.dumps(run_config)]
    samples: list[dict[str, float]] = []
    for i in range(repeats + 1):
        out = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, check=True
        )
        if i:  # the first run fills the partition cache
            samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        phase: {
            "median-ms": round(1e3 * statistics.median(s[phase] for s in samples), 2),
            "min-ms": round(1e3 * min(s[phase] for s in samples), 2),
            "max-ms": round(1e3 * max(s[phase] for s in samples), 2),
        }
        for phase in samples[0]
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="mlp")
    args = parser.parse_args()
    from bouquet.simulations.inprocess import app_defaults

    run_config = {**app_defaults(), "dataset": args.dataset, "model": args.model}
    with tempfile.TemporaryDirectory() as cache:
        result = measure(run_config, args.repeats, cache)
    print(json.dumps({"machine": f"{os.cpu_count()} CPUs", **result}, indent=1))


if __name__ == "__main__":
    main()
