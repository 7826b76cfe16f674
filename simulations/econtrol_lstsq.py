"""EControl vs EF14, EF21 and SGD on heterogeneous least squares (econtrol.md (1)).

Gao, Islamov, Stich, "EControl: Fast Distributed Optimization with Compression
and Error Control", ICLR 2024, https://arxiv.org/abs/2311.05645. The spec's
synthetic target, small: ``n`` clients, ``f_i(x) = ||A_i x - b_i||^2 / (2 m)``
with ``A_i`` Gaussian and ``b_i = A_i x_star + zeta s_i + noise`` (``s_i`` a
client-specific shift: heterogeneity ``zeta``), one mini-batch SGD step per
round (stochastic gradients), Top-k at ``k / d`` = 1%. Methods, all at the
same ``lr``:

- ``sgd``: uncompressed, ``x <- x + mean_i v_i`` (``v_i = -lr g_i``);
- ``ef14``: classic error feedback, the generic uplink's client
  (:func:`clientapps.uplink.compress_reply` with ``uplink.error-feedback``),
  ``x <- x + mean_i C(v_i + e_i)``;
- ``ef21`` and ``econtrol eta``: the real EControl recipe
  (:func:`clientapps.recipes.econtrol.make_hooks`, ``eta = 0`` is EF21's
  client exactly) and the real server rule
  (:class:`strategies.ef21.ErrorFeedbackMean`).

Only Flower's messaging is skipped (the in-process tests cover it). The metric
is ``f(x) - f(x_opt)`` with ``f = (1/n) sum_i f_i`` and ``x_opt`` its exact
least-squares minimiser. Usage::

    python -m bouquet.simulations.econtrol_lstsq --rounds 2000 --zeta 1 10

``--batched`` runs :func:`run_batched` (every client in one NumPy array:
thousands of rounds in seconds); several ``--lr-scale`` and ``--seed`` values
keep each method at its best step. Measured at k/d = 1% (3 seeds, tuned
steps): ``simulations/results/econtrol-lstsq/README.md``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch

import bouquet.strategies  # noqa: F401  (the registry first: no import cycle)
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.econtrol import make_hooks
from bouquet.clientapps.state import array_record
from bouquet.clientapps.uplink import compress_reply
from bouquet.strategies.context import RoundContext
from bouquet.strategies.ef21 import ErrorFeedbackMean
from bouquet.strategies.pieces import Aggregator, ServerSGD, Uniform
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import compression, wire


@dataclass(frozen=True)
class Problem:
    """The clients' ``(A_i, b_i)`` and the optimum of their mean loss."""

    data: list[tuple[torch.Tensor, torch.Tensor]]
    dim: int
    f_opt: float
    x_opt: np.ndarray
    smoothness: float


def make_problem(clients: int, rows: int, dim: int, zeta: float, seed: int) -> Problem:
    """Gaussian ``A_i``, ``b_i = A_i x_star + zeta s_i + 0.1 noise``."""
    rng = np.random.default_rng(seed)
    x_star = rng.standard_normal(dim)
    data, a_all, b_all = [], [], []
    for _ in range(clients):
        a = rng.standard_normal((rows, dim))
        b = a @ x_star + zeta * rng.standard_normal() + 0.1 * rng.standard_normal(rows)
        data.append((torch.tensor(a, dtype=torch.float32), torch.tensor(b)))
        a_all.append(a)
        b_all.append(b)
    a, b = np.vstack(a_all), np.concatenate(b_all)
    x_opt = np.linalg.lstsq(a, b, rcond=None)[0]
    f_opt = float(np.sum((a @ x_opt - b) ** 2) / (2 * len(b)))
    smoothness = max(np.linalg.eigvalsh(ai.T @ ai / rows)[-1] for ai in a_all)
    return Problem(data, dim, f_opt, x_opt, float(smoothness))


def gap(problem: Problem, x: np.ndarray) -> float:
    """``f(x) - f(x_opt)``."""
    total = sum(
        float(np.sum((a.double().numpy() @ x - b.numpy()) ** 2))
        for a, b in problem.data
    )
    rows = sum(len(b) for _, b in problem.data)
    return total / (2 * rows) - problem.f_opt


def _squared(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out.squeeze(-1) - y.to(out.dtype)) ** 2).mean()


def run(
    problem: Problem,
    method: str,
    eta: float,
    k: int,
    lr: float,
    batch: int,
    rounds: int,
    seed: int,
    report: tuple[int, ...],
) -> dict[int, float]:
    """``f(x) - f*`` after each round in ``report`` (and the last)."""
    arrays = {"weight": np.zeros((1, problem.dim), np.float32)}
    keys = ["weight"]
    config = {
        "econtrol.compressor": "topk",
        "econtrol.k": k,
        "econtrol.eta": eta,
        wire.UPLINK_COMPRESSOR: "topk",
        wire.UPLINK_K: k,
        wire.UPLINK_ERROR_FEEDBACK: True,
    }
    codec = compression.TopK(k)
    chain = Aggregator(Uniform(), ErrorFeedbackMean(1.0), ServerSGD())
    state = chain.init()
    n = len(problem.data)
    states: list[dict] = [{} for _ in range(n)]
    settings = TrainSettings(batch_size=batch, lr=lr, momentum=0.0, max_steps=1)
    curve = {0: gap(problem, arrays["weight"][0].astype(np.float64))}
    for rnd in range(1, rounds + 1):
        replies, updates = [], []
        for i, (a, b) in enumerate(problem.data):
            model = torch.nn.Linear(problem.dim, 1, bias=False)
            model.load_state_dict({"weight": torch.as_tensor(arrays["weight"])})
            result = train_local(
                model,
                (a, b),
                settings,
                make_hooks(config) if method == "econtrol" else [],
                generator=torch.Generator().manual_seed(wire.derive_seed(seed, rnd, i)),
                config=config,
                state=states[i],
                loss=_squared,
            )
            if method == "econtrol":
                record = result.run.reply_records["arrays"]
                payload = {key: v.numpy() for key, v in record.items()}
                c = compression.unflatten(
                    codec.decode(payload, problem.dim), arrays, keys
                )
                replies.append(ClientReply(i + 1, i, float(len(b)), {}, c))
                continue
            y = {"weight": model.weight.detach().numpy()}
            if method == "sgd":
                updates.append(y["weight"].astype(np.float64) - arrays["weight"])
            else:  # ef14
                payload = compress_reply(
                    y, array_record(arrays), config, states[i], rnd
                )
                flat = codec.decode(
                    {key: v.numpy() for key, v in payload.items()}, problem.dim
                )
                updates.append(flat.reshape(1, -1))
        if method == "econtrol":
            nodes = tuple(range(1, n + 1))
            ctx = RoundContext(rnd, rounds, "train", nodes, nodes, arrays, {})
            arrays, state = chain.update(replies, state, ctx)
            arrays = {"weight": np.asarray(arrays["weight"], np.float32)}
        else:
            step = np.mean(updates, axis=0)
            arrays = {"weight": (arrays["weight"] + step).astype(np.float32)}
        if rnd in report or rnd == rounds:
            curve[rnd] = gap(problem, arrays["weight"][0].astype(np.float64))
    return curve


def run_batched(
    problem: Problem,
    method: str,
    eta: float,
    k: int,
    lr: float,
    batch: int,
    rounds: int,
    seed: int,
    report: tuple[int, ...],
) -> dict[int, float]:
    """:func:`run`'s methods for all clients at once, in float64 NumPy (Top-k).

    Client ``i``'s step ``v_i = -lr g_i`` (``g_i`` the gradient of a mini-batch
    of ``batch`` rows drawn without replacement from the round's seeded
    stream), then ``sgd``: ``x <- x + mean v_i``; ``ef14``: ``p_i = v_i + e_i``,
    ``x <- x + mean C(p_i)``, ``e_i <- p_i - C(p_i)``; ``econtrol``:
    ``Delta_i = C(eta e_i + v_i - h_i)``, ``e_i <- e_i + v_i - h_i - Delta_i``,
    ``h_i <- h_i + Delta_i``, server ``h <- h + mean Delta_i``, ``x <- x + h``
    (the recipe's and :class:`strategies.ef21.ErrorFeedbackMean`'s rules).
    Thousands of rounds in seconds; with ``batch`` = all rows it follows
    :func:`run` (``tests/simulations/test_econtrol_lstsq.py``); mini-batches
    are drawn from another stream than the loop's.
    """
    a = np.stack([ai.double().numpy() for ai, _ in problem.data])  # n x m x d
    b = np.stack([bi.double().numpy() for _, bi in problem.data])  # n x m
    n, m, d = a.shape
    x, h = np.zeros(d), np.zeros(d)
    e, h_i = np.zeros((n, d)), np.zeros((n, d))
    rows = np.arange(n)[:, None]
    curve = {0: gap(problem, x)}
    for rnd in range(1, rounds + 1):
        rng = np.random.default_rng(wire.derive_seed(seed, rnd, "batched"))
        picked = rng.permuted(np.tile(np.arange(m), (n, 1)), axis=1)[:, :batch]
        a_b, b_b = a[rows, picked], b[rows, picked]  # n x batch (x d)
        residual = np.einsum("nbd,d->nb", a_b, x) - b_b
        v = -lr * np.einsum("nbd,nb->nd", a_b, residual) / batch
        if method == "sgd":
            x = x + v.mean(axis=0)
        elif method == "ef14":
            p = v + e
            c = compression.topk_rows(p, k)
            e = p - c
            x = x + c.mean(axis=0)
        else:  # econtrol (eta 0: EF21's client)
            delta = compression.topk_rows(eta * e + v - h_i, k)
            e = e + v - h_i - delta
            h_i = h_i + delta
            h = h + delta.mean(axis=0)
            x = x + h
        if rnd in report or rnd == rounds:
            curve[rnd] = gap(problem, x)
    return curve


def main(argv: list[str] | None = None) -> None:
    """Print ``f - f*`` curves of every method for each heterogeneity.

    With several ``--lr-scale`` values every method runs at each (all
    ``--seed`` values) and the table keeps each method at its best scale:
    the lowest mean final ``f - f*`` over the seeds.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument(
        "--lr-scale", type=float, nargs="+", default=[0.1], help="lr = scale / L"
    )
    parser.add_argument("--eta", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--zeta", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--batched", action="store_true", help="run_batched (NumPy, all clients)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = (10, 30, 100, 300, 1000, 3000, 10000, 30000)
    methods = [
        ("sgd (uncompressed)", "sgd", 0.0),
        ("ef14 (classic EF)", "ef14", 0.0),
        ("ef21 (econtrol eta 0)", "econtrol", 0.0),
        *[(f"econtrol eta {eta:g}", "econtrol", eta) for eta in args.eta],
    ]
    runner = run_batched if args.batched else run
    for zeta in args.zeta:
        problems = {
            seed: make_problem(args.clients, args.rows, args.dim, zeta, seed)
            for seed in args.seed
        }
        print(
            f"n={args.clients} m={args.rows} d={args.dim} top-{args.k} "
            f"batch={args.batch} zeta={zeta:g} seeds={args.seed} "
            f"lr-scales={args.lr_scale} (lr = scale / L_max of each seed's problem)"
        )
        best = {}
        for label, method, eta in methods:
            for scale in args.lr_scale:
                start = time.perf_counter()
                curves = [
                    runner(
                        problem,
                        method,
                        eta,
                        args.k,
                        scale / problem.smoothness,
                        args.batch,
                        args.rounds,
                        seed,
                        report,
                    )
                    for seed, problem in problems.items()
                ]
                final = float(np.mean([c[args.rounds] for c in curves]))
                final = final if np.isfinite(final) else np.inf  # diverged
                seconds = time.perf_counter() - start
                print(
                    f"  {label} lr-scale {scale:g}: final {final:.3e} ({seconds:.0f} s)"
                )
                if label not in best or final < best[label][0]:
                    best[label] = (final, scale, curves)
        print(
            f"  each method at its best lr-scale (mean +- std, {len(problems)} seeds):"
        )
        for label, (_, scale, curves) in best.items():
            points = ", ".join(
                f"t={t}: {np.mean([c[t] for c in curves]):.3e}"
                f" +- {np.std([c[t] for c in curves]):.1e}"
                for t in curves[0]
            )
            print(f"    {label} (lr-scale {scale:g}): {points}")


if __name__ == "__main__":
    main()
