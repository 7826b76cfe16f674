"""VCMA's variance claim, measured: per-layer parameter variance over rounds.

Tian, Al-Ars, Kitsak, Hofstee, "Vanishing Variance Problem in Fully
Decentralized Neural-Network Systems", 2024, https://arxiv.org/abs/2404.04616
(``shared/algorithms/vcma.md``): averaging independently initialised models
shrinks each layer's variance (by about ``1/n``), and the variance correction
keeps it. Three arms on the decentralized reproduction setting
(``simulations/configs/vcma/vcma-ring.toml`` and
``simulations/configs/dpsgd/dpsgd-ring.toml``: digits, MLP, 16 nodes, ring,
K = 10 local steps, 30 rounds):

- ``dpsgd``: D-PSGD, every node from the run's initial model;
- ``plain``: VCMA's gossip without the correction (``variance-correction =
  false``): independent initialisations, ``c = 0.5`` conservative average;
- ``vcma``: the same with the correction (follow-others).

Per round and per layer (a parameter tensor), from the models the nodes reply
(mixed at the start of the round, then trained; round 1 mixes nothing):

- ``node``: the mean over nodes of ``Var(theta_i,l)``;
- ``average``: ``Var`` of the node-average model's layer (the ``central``
  model every gossip run evaluates);

both divided by the layer's variance in the run's initial model (the
initialiser's scale). ``Var`` is over all entries of the tensor (unbiased, as
VCMA's own). The numbers come from the real runs (the in-process runner);
the script only records the replies the relay receives (a wrapper around
:meth:`GossipStrategy.aggregate`, restored afterwards).

    python -m bouquet.simulations.vcma_variance --out /tmp/vcma-variance

Measured numbers: ``simulations/results/decentral/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bouquet.simulations.sweep import load_override_file
from bouquet.strategies.gossip import GossipStrategy
from bouquet.tasks import wire

CONFIGS = Path(__file__).parent / "configs"
ARMS = {
    "dpsgd": (CONFIGS / "dpsgd" / "dpsgd-ring.toml", {}),
    "plain": (CONFIGS / "vcma" / "vcma-ring.toml", {"vcma.variance-correction": False}),
    "vcma": (CONFIGS / "vcma" / "vcma-ring.toml", {}),
}


def layer_variances(
    models: list[dict[str, np.ndarray]], initial: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """Per layer: mean node variance and the average model's, over the initial's."""
    out = {}
    for key, start in initial.items():
        if start.dtype.kind != "f" or start.size < 2:
            continue
        scale = float(np.var(np.asarray(start, np.float64), ddof=1))
        stack = np.stack([np.asarray(m[key], np.float64) for m in models])
        node = float(np.mean([np.var(s, ddof=1) for s in stack]))
        average = float(np.var(stack.mean(axis=0), ddof=1))
        out[key] = {"node": node / scale, "average": average / scale}
    return out


@contextlib.contextmanager
def recording(rows: list[dict[str, Any]]) -> Iterator[None]:
    """Record each gossip round's layer variances into ``rows``."""
    original = GossipStrategy.aggregate
    initial: dict[str, np.ndarray] = {}

    def aggregate(self, replies, ctx):  # noqa: ANN001, ANN202
        if not initial:  # the run's initial model (round 1's arrays)
            initial.update({k: np.array(a) for k, a in ctx.arrays.items()})
        models = [r.records[wire.GOSSIP_MODEL] for r in replies]
        rows.append({"round": ctx.server_round, **layer_variances(models, initial)})
        return original(self, replies, ctx)

    GossipStrategy.aggregate = aggregate
    try:
        yield
    finally:
        GossipStrategy.aggregate = original


def run_arm(name: str, seed: int, out: Path) -> list[dict[str, Any]]:
    """One run of arm ``name``; its rows (one per round)."""
    from bouquet.simulations.inprocess import run_inprocess

    file, extra = ARMS[name]
    overrides, options = load_override_file(file)
    config = {**overrides, **extra, "seed": seed, "output-dir": str(out / "runs")}
    rows: list[dict[str, Any]] = []
    with recording(rows):
        run_inprocess(config, num_nodes=int(options.get("num-nodes", 16)))
    return rows


def summarize(
    runs: dict[str, list[list[dict[str, Any]]]], rounds: list[int]
) -> list[str]:
    """Markdown lines: mean ± std over seeds, weight layers, at ``rounds``."""
    lines = []
    for name, seeds in runs.items():
        layers = [k for k in seeds[0][0] if k != "round" and k.endswith("weight")]
        for kind in ("node", "average"):
            cells = []
            for r in rounds:
                parts = []
                for layer in layers:
                    values = [
                        row[layer][kind] for rows in seeds for row in rows
                        if row["round"] == r
                    ]  # fmt: skip
                    std = statistics.stdev(values) if len(values) > 1 else 0.0
                    parts.append(f"{statistics.mean(values):.3f}±{std:.3f}")
                cells.append(" / ".join(parts))
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    """Run the arms x seeds; write variance.json and the markdown rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 2, 5, 10, 30])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for name in args.arms:
        for seed in args.seeds:
            print(f"[vcma-variance] {name} seed={seed}", flush=True)
            runs.setdefault(name, []).append(run_arm(name, seed, args.out.resolve()))
    (args.out / "variance.json").write_text(json.dumps(runs, indent=1))
    table = summarize(runs, args.rounds)
    (args.out / "variance.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
