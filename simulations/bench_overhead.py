"""Framework overhead and Flower parity (issue #6, items 1 and 2).

Three ways to run the same FedAvg federation (same model, partitions, seeds,
local epochs and batches, central evaluation after every round), timed side
by side in one process:

- ``plain``: a sequential PyTorch loop, the physical limit: for each round and
  client, load the global weights, train, collect; average; evaluate. Data is
  in memory from the start.
- ``bouquet``: Bouquet's ``fedavg`` through the real ServerApp logic and the
  real ClientApp on the in-process runner (``run_inprocess``).
- ``flower``: Flower's own ``FedAvg`` strategy and ``start()`` with a minimal
  hand-written ClientApp doing the plain loop's training, on the same grid.

The local training is the same code path in spirit and the same numbers in
fact: every client's example order comes from the generator Bouquet derives
from ``(seed, round, partition-id)``, so the three runs reach the same
accuracy up to float summation order. The Ray path (``flwr run``) is measured
by :mod:`simulations.bench_suite`, which reports engine start separately.

    python -m bouquet.simulations.bench_overhead --repeats 3 --rounds 5 --nodes 10 \
        [--device auto]

``--device`` (run-config ``device``) puts all three on the same device: the
GPU when there is one with ``auto``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from torch import nn

from bouquet.serverapps.settings import setting
from bouquet.simulations.inprocess import InProcessGrid, app_defaults, run_inprocess
from bouquet.tasks import (
    DataSpec,
    build_model,
    dataset_info,
    load_central_test,
    load_client_data,
    resolve_device,
    wire,
)
from bouquet.tasks.evaluation import evaluate_model
from bouquet.tasks.wire import derive_seed

WORKLOAD = {
    "dataset": "digits",
    "model": "resnet18",
    "local-epochs": 1,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "min-available-nodes": 2,
    "model-norm": "group",
    "lr": 0.01,
    "plot": False,
}
"""ResNet-18 on digits: one client's local epoch takes about 0.5 s on 2 cores.

GroupNorm and ``lr`` 0.01 make the federation numerically stable, so that the
three runners can be compared on accuracy. With BatchNorm, averaged running
statistics sent the central loss to 1e8 after round 1 and the final accuracy
depended on the order in which replies were summed: Flower's ``FedAvg``
samples nodes in random order, and its runs ended between 0.14 and 0.43 while
Bouquet (replies sorted) ended at 0.72 every time. ``plot`` off: the
end-of-run ``metrics.png`` (about 1.1 s, mostly importing matplotlib) is
reporting that the other two runners do not do; it is on by default, and its
cost is stated in the benchmark doc.
"""


def local_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: Mapping[str, Any],
    seed: int,
) -> None:
    """Plain mini-batch SGD with the example order of Bouquet's loop for ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params,
        lr=float(config[wire.LR]),
        momentum=float(config[wire.MOMENTUM]),
        weight_decay=float(config[wire.WEIGHT_DECAY]),
    )
    criterion = nn.CrossEntropyLoss()
    batch = int(config[wire.BATCH_SIZE])
    device = next(model.parameters()).device
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(int(config[wire.LOCAL_EPOCHS])):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(order), batch):
                idx = order[start : start + batch]
                optimizer.zero_grad(set_to_none=True)
                xb, yb = x[idx].to(device), y[idx].to(device)
                criterion(model(xb), yb).backward()
                optimizer.step()


def _setup(run_config: Mapping[str, Any], nodes: int) -> tuple:
    spec = DataSpec.from_run_config(run_config, num_partitions=nodes)
    info = dataset_info(spec)
    data = [load_client_data(spec, i) for i in range(nodes)]
    test = load_central_test(spec)

    device = resolve_device(setting(run_config, "device"))

    def fresh() -> nn.Module:
        return build_model(
            setting(run_config, "model"),
            info,
            norm=setting(run_config, "model-norm"),
            seed=setting(run_config, "seed"),
        ).to(device)

    return data, test, fresh


def run_plain(run_config: Mapping[str, Any], nodes: int) -> float:
    """The sequential loop; returns the final central accuracy."""
    data, (tx, ty), fresh = _setup(run_config, nodes)
    model = fresh()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate_model(model, tx, ty)  # round 0, as the other two runners do
    seed = setting(run_config, "seed")
    for rnd in range(1, setting(run_config, "num-server-rounds") + 1):
        states, weights = [], []
        for pid, client in enumerate(data):
            model.load_state_dict(global_state)
            local_sgd(
                model,
                client.train_x,
                client.train_y,
                run_config,
                derive_seed(seed, rnd, pid),
            )
            states.append(
                {k: v.detach().clone() for k, v in model.state_dict().items()}
            )
            weights.append(len(client.train_x))
        total = float(sum(weights))
        for key, value in global_state.items():
            mean = sum(
                w / total * s[key].double()
                for s, w in zip(states, weights, strict=True)
            )
            global_state[key] = mean.to(value.dtype)
        model.load_state_dict(global_state)
        _, accuracy = evaluate_model(model, tx, ty)
    return accuracy


def run_flower(run_config: Mapping[str, Any], nodes: int) -> float:
    """Flower's FedAvg + a minimal ClientApp on the in-process grid."""
    data, (tx, ty), fresh = _setup(run_config, nodes)
    seed = setting(run_config, "seed")

    def client(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        config = msg.content["config"]
        model = fresh()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = data[pid].train_x, data[pid].train_y
        local_sgd(
            model, x, y, config, derive_seed(seed, int(config["server-round"]), pid)
        )
        return Message(
            RecordDict(
                {
                    "arrays": ArrayRecord(model.state_dict()),
                    "metrics": MetricRecord({"num-examples": len(x)}),
                }
            ),
            reply_to=msg,
        )

    grid = InProcessGrid(client, nodes, run_config)
    model = fresh()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate_model(model, tx, ty)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
    config = {k: setting(run_config, k) for k in (wire.LR, wire.MOMENTUM)}
    config.update(
        {k: setting(run_config, k) for k in (wire.WEIGHT_DECAY, wire.BATCH_SIZE)}
    )
    config[wire.LOCAL_EPOCHS] = setting(run_config, wire.LOCAL_EPOCHS)
    result = strategy.start(
        grid,
        ArrayRecord(fresh().state_dict()),
        num_rounds=setting(run_config, "num-server-rounds"),
        train_config=ConfigRecord(config),
        evaluate_fn=evaluate,
    )
    last = max(result.evaluate_metrics_serverapp)
    return float(result.evaluate_metrics_serverapp[last]["accuracy"])


def run_bouquet(run_config: Mapping[str, Any], nodes: int) -> float:
    """Bouquet's fedavg through the ServerApp logic and the real ClientApp."""
    with tempfile.TemporaryDirectory() as out:
        _, path, _ = run_inprocess({**run_config, "output-dir": out}, nodes)
        summary = json.loads((path / "summary.json").read_text())
    return float(summary["final-central-accuracy"])


RUNNERS = {"plain": run_plain, "bouquet": run_bouquet, "flower": run_flower}


def measure(
    rounds: int, nodes: int, repeats: int, device: str = "cpu"
) -> dict[str, Any]:
    """Interleaved repeats of the three runners; medians, spreads, ratios."""
    run_config = {
        **app_defaults(),
        **WORKLOAD,
        "num-server-rounds": rounds,
        "device": str(resolve_device(device)),
    }
    run_plain({**run_config, "num-server-rounds": 1}, nodes)  # warm caches, imports
    torch.set_num_threads(1)  # like one Ray actor per CPU; same for all three
    times: dict[str, list[float]] = {name: [] for name in RUNNERS}
    accuracy: dict[str, float] = {}
    for _ in range(repeats):
        for name, runner in RUNNERS.items():
            start = time.perf_counter()
            accuracy[name] = runner(run_config, nodes)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "workload": {
            **WORKLOAD,
            "rounds": rounds,
            "nodes": nodes,
            "device": run_config["device"],
        },
        "median-s": median,
        "times-s": {n: [round(t, 3) for t in ts] for n, ts in times.items()},
        "final-accuracy": accuracy,
        "bouquet-vs-plain": median["bouquet"] / median["plain"],
        "bouquet-vs-flower": median["bouquet"] / median["flower"],
    }


def main() -> None:
    """Command-line entry point: one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    args = parser.parse_args()
    result = measure(args.rounds, args.nodes, args.repeats, args.device)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
