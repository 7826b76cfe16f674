"""Aggregation scaling of every registered strategy vs FedAvg (issue #6, item 3).

For m replies and d parameters (random float32 arrays in 8 layers plus a 0-d
integer buffer), each strategy is built from its registry defaults, sent one
round (``configure_train`` on an in-process grid of m nodes, not timed), and
its whole ``aggregate_train`` is timed: reply validation plus the rule. Peak
memory is what ``tracemalloc`` sees allocated during the call (numpy reports
its buffers), on top of the replies. Medians of repeats; ratios against FedAvg
measured in the same process, same replies. A ratio above 3 is flagged.

    python -m bouquet.simulations.bench_aggregation --clients 10 100 \
        --params 1e5 1e6 1.1e7 --repeats 3 \
        --out simulations/results/benchmarks/aggregation

Replies are ``x + a_i p_1 + b_i p_2 + c_i p_3`` for three shared random
directions ``p``: the rules do the same work whatever the rank, and building
m x d independent normals would dominate the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from bouquet.serverapps.run import build_strategy
from bouquet.simulations.inprocess import InProcessGrid, app_defaults, give_id
from bouquet.strategies.aggregation import to_numpy, to_record
from bouquet.strategies.registry import list_algorithms
from bouquet.tasks import compression, wire

FLAG_RATIO = 3.0


def model_arrays(d: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """D float32 parameters in 8 layers, plus a 0-d int64 buffer.

    The last layer is a 2-D classifier (10 classes), as algorithms that read
    the head (FedLoGe's classifier, HideNseek's prunable weights) expect.
    """
    sizes = [d // 8] * 7 + [d - 7 * (d // 8)]
    sizes[0] += sizes[-1] % 10
    sizes[-1] -= sizes[-1] % 10
    arrays = {
        f"layer{i}.weight": rng.standard_normal(n).astype(np.float32)
        for i, n in enumerate(sizes)
    }
    head = arrays.pop(f"layer{len(sizes) - 1}.weight")
    arrays["bn.num_batches_tracked"] = np.array(3, dtype=np.int64)
    # Last, as in a real state dict: the personal "head" is the last module's.
    arrays["head.weight"] = head.reshape(10, -1)
    return arrays


class Round:
    """One round's messages and synthetic replies for ``name`` at (m, d)."""

    def __init__(self, name: str, m: int, reference: dict[str, np.ndarray]) -> None:
        self.name = name
        self.run_config = {**app_defaults(), "algorithm": name, "fraction-train": 1.0}
        self.run_config["min-train-nodes"] = 1
        self.grid = InProcessGrid(lambda msg, ctx: msg, m, self.run_config)
        self.reference = reference
        self.m = m

    def strategy_and_replies(
        self, rng: np.random.Generator, directions: list[dict[str, np.ndarray]]
    ) -> tuple[Any, list[Message]]:
        """A strategy past one aggregated round, its round-2 replies (one per node).

        Round 1 is sent and aggregated untimed, so that stateful rules (FedLD's
        principal-gradient rounds, momenta, tables) run their steady-state path
        in round 2.
        """
        strategy = build_strategy(self.run_config)
        arrays = to_record(self.reference)
        replies: list[Message] = []
        for rnd in (1, 2):
            del replies  # one round's replies in memory at a time (4.4 GB at the top)
            config = ConfigRecord({"server-round": rnd, wire.NUM_ROUNDS: 2})
            messages = list(strategy.configure_train(rnd, arrays, config, self.grid))
            for msg in messages:
                give_id(msg)
            replies = self._replies(strategy, messages, rng, directions)
            del messages
            if rnd == 1:
                arrays = strategy.aggregate_train(1, replies)[0] or arrays
        return strategy, replies

    def _replies(
        self,
        strategy: Any,
        messages: list[Message],
        rng: np.random.Generator,
        directions: list[dict[str, np.ndarray]],
    ) -> list[Message]:
        replies = []
        ordered = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        ctx = strategy.train_round
        codec = strategy.reply_codec(ctx)
        for i, msg in enumerate(ordered):
            # A node that holds its model (gossip) is sent none: start from
            # the reference, as it would from its own.
            sent = {**self.reference, **to_numpy(msg.content[wire.ARRAYS])}
            coefficients = rng.standard_normal(len(directions)).astype(np.float32)
            local = {}
            for key, value in sent.items():
                if value.dtype.kind == "f":
                    update = sum(
                        c * p[key]
                        for c, p in zip(coefficients, directions, strict=True)
                    )
                    local[key] = (value + 0.01 * update).astype(value.dtype)
                else:
                    local[key] = value + 1
            shared = {k: v for k, v in local.items() if k in ctx.shared}
            if codec is not None:  # the reply is C(y - x) (strategies/base.py)
                keys = compression.compressed_keys(shared)
                update = compression.flatten(shared, keys) - compression.flatten(
                    sent, keys
                )
                reply_arrays = to_record(codec.encode(update, rng))
            else:
                reply_arrays = to_record(shared)
            content = RecordDict(
                {
                    wire.ARRAYS: reply_arrays,
                    wire.CLIENT_INFO: ConfigRecord({wire.ROUTINE: strategy.routine}),
                }
            )
            for extra, spec in strategy.contract(ctx).records.items():
                # Each declared entry: the local value's scale where the
                # model has that entry, zeros of its shape otherwise.
                content[extra] = to_record(
                    {
                        k: (
                            (
                                0.01 * local[k]
                                if local[k].dtype.kind == "f"
                                else local[k]
                            )
                            if k in local and local[k].shape == tuple(shape)
                            else np.zeros(shape, dtype)
                        ).astype(dtype)
                        for k, (shape, dtype) in spec.items()
                    }
                )
            content[wire.METRICS] = MetricRecord(
                {
                    wire.NUM_EXAMPLES: int(rng.integers(50, 150)),
                    wire.PARTITION_ID: i,
                    wire.TRAIN_LOSS: 1.0,
                    **dict.fromkeys(strategy.reply_metrics, 1.0),
                }
            )
            replies.append(Message(content, reply_to=msg))
        return replies


def time_strategy(
    rnd: Round, repeats: int, rng: np.random.Generator, directions: list
) -> dict[str, Any]:
    """Median seconds and peak MB of ``aggregate_train``; or the error it raised."""
    times, peaks, dropped = [], [], 0
    for _ in range(repeats):
        strategy, replies = rnd.strategy_and_replies(rng, directions)
        gc.collect()
        tracemalloc.start()
        start = time.perf_counter()
        try:
            arrays, _ = strategy.aggregate_train(2, replies)
        except Exception as err:  # reported, not hidden: a row says what failed
            tracemalloc.stop()
            return {"error": f"{type(err).__name__}: {err}"[:200]}
        times.append(time.perf_counter() - start)
        peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()
        dropped = 0 if arrays is not None else len(replies)
        del strategy, replies, arrays
    return {
        "median-s": statistics.median(times),
        "times-s": [round(t, 4) for t in times],
        "peak-mb": max(peaks),
        "update": dropped == 0,
    }


NOT_MODEL_REPLIES = {
    "fedd2s": "replies are representations and logits at a cut, not models",
    "hidenseek": "replies are sign bits over the server's pruned weights",
    "knfu": "replies are soft labels on the transfer set, not models",
    "onebyte": "replies are seeded projected-gradient bytes, not models",
}
"""Algorithms whose replies this bench cannot synthesise from a model update
(left out of its table, with the reason)."""


def run(
    clients: Sequence[int],
    params: Sequence[int],
    repeats: int,
    names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Every (m, d) x strategy; FedAvg first so that ratios can be taken."""
    names = list(names or list_algorithms())
    names = ["fedavg", *[n for n in names if n not in ("fedavg", *NOT_MODEL_REPLIES)]]
    rows = []
    for d in params:
        rng = np.random.default_rng(0)
        reference = model_arrays(d, rng)
        directions = [model_arrays(d, rng) for _ in range(3)]
        for m in clients:
            base = None
            for name in names:
                result = time_strategy(
                    Round(name, m, reference), repeats, rng, directions
                )
                row = {"algorithm": name, "clients": m, "parameters": d, **result}
                if name == "fedavg":
                    base = result
                if "median-s" in result and base and "median-s" in base:
                    row["time-ratio"] = result["median-s"] / base["median-s"]
                    row["memory-ratio"] = result["peak-mb"] / max(base["peak-mb"], 1e-9)
                    row["flag"] = row["time-ratio"] > FLAG_RATIO
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """One table: time and memory vs FedAvg for every strategy and size."""
    lines = [
        "| algorithm | m | d | aggregate_train (s) | x FedAvg | peak MB | x FedAvg |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['algorithm']} | {r['clients']} | {r['parameters']:.3g} | "
                f"error: {r['error']} | | | |"
            )
            continue
        flag = " **>3x**" if r.get("flag") else ""
        lines.append(
            f"| {r['algorithm']} | {r['clients']} | {r['parameters']:.3g} | "
            f"{r['median-s']:.4f} | {r.get('time-ratio', 1.0):.2f}{flag} | "
            f"{r['peak-mb']:.0f} | {r.get('memory-ratio', 1.0):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command-line entry point: JSON lines on stdout, table files in --out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--params", type=float, nargs="+", default=[1e5, 1e6])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--algorithms", nargs="*")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        help="cap the address space: a strategy that needs more fails with "
        "MemoryError (reported in its row) instead of the OOM killer ending the run",
    )
    args = parser.parse_args()
    if args.memory_limit_gb:
        import resource

        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rows = run(
        args.clients, [int(p) for p in args.params], args.repeats, args.algorithms
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "aggregation.json").write_text(json.dumps(rows, indent=1))
        header = f"Machine: {os.cpu_count()} CPUs, no GPU.\n\n"
        (args.out / "aggregation.md").write_text(header + markdown(rows))


if __name__ == "__main__":
    main()
