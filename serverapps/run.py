"""What the ServerApp does, independent of how it was started.

``run_server(grid, run_config)`` builds the strategy named by the run config,
the initial model and the central test set from ``tasks/``, then drives the
rounds with a checkpoint, a results row and a progress line after each. With
``resume`` set it continues a run directory from its last checkpoint, with the
run config saved there (``serverapps.resume``: overrides that would change the
run are refused).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from bouquet.serverapps.participation import participation_grid
from bouquet.serverapps.results import RunDirectory, progress_line, summary
from bouquet.serverapps.resume import RunConfigGrid, restored_values, resumed_config
from bouquet.serverapps.settings import (
    DEFAULTS,
    FINETUNE_KEYS,
    TRAIN_CONFIG_KEYS,
    RunConfigError,
    check_settings,
    evaluate_settings,
    setting,
    strategy_common,
)
from bouquet.strategies.attacks import SERVER_ATTACKS, attack_on_server
from bouquet.strategies.base import BouquetStrategy
from bouquet.strategies.clocks import DeviceSpeeds, VirtualClock, WallClock
from bouquet.strategies.downlink import compress_downlink
from bouquet.strategies.driver import Driver, RoundReport
from bouquet.strategies.privacy import private_training
from bouquet.strategies.registry import get_algorithm
from bouquet.strategies.sampling import wait_for_node_list
from bouquet.strategies.uplink import compress_uplink

DEFAULT_OUTPUT_DIR = "~/bouquet-runs"


UNCOMPRESSIBLE_ATTACKS = ("alie-omniscient", "min-max", "rank-reversal")
"""Attacks a compressed uplink refuses (every other one composes with it)."""


def run_directory(run_config: Mapping[str, Any]) -> Path:
    """The run directory: the one to resume, or a new one under ``output-dir``."""
    base = Path(setting(run_config, "output-dir") or DEFAULT_OUTPUT_DIR).expanduser()
    if not base.is_absolute():
        base = Path.home() / base
    resume = setting(run_config, "resume")
    if resume == "latest":
        candidates = sorted(p for p in base.glob("*/checkpoint.json"))
        if not candidates:
            raise FileNotFoundError(f"resume='latest' but no checkpoint under {base}.")
        return max(candidates, key=lambda p: p.stat().st_mtime).parent
    if resume:
        path = Path(resume).expanduser()
        path = path if path.is_absolute() else base / path
        if not (path / "checkpoint.json").exists():
            raise FileNotFoundError(f"Cannot resume: no checkpoint in {path}.")
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    name = "-".join(
        str(setting(run_config, k)) for k in ("algorithm", "dataset", "seed")
    )
    return base / f"{stamp}-{name}"


def wait_for_nodes(
    grid: Grid, minimum: int, settle: float = 1.0, timeout: float = 0.0
) -> int:
    """Wait until at least ``minimum`` nodes are connected and the count is stable.

    In simulation the node list can be empty when the ServerApp starts; sampling
    a fraction of a partial list would silently train fewer nodes in round 1.
    After ``timeout`` seconds (``<= 0``: never) with fewer than ``minimum``
    nodes, raise an error that says how many came, instead of waiting for ever
    (e.g. ``min-available-nodes`` above the simulation's ``num-supernodes``).
    """
    count = len(wait_for_node_list(grid, minimum, timeout, settle, poll_interval=0.1))
    if count < minimum:
        raise RuntimeError(
            f"{count} node(s) connected after waiting {timeout:.0f} s; "
            f"min-available-nodes is {minimum}. Start more SuperNodes "
            "(or raise num-supernodes in simulation), lower "
            "min-available-nodes, or raise node-wait-timeout "
            "(0 waits for ever)."
        )
    return count


def prepare_client_data(
    grid: Grid, run_config: Mapping[str, Any], num_nodes: int
) -> bool:
    """In Flower's simulation, fill the nodes' partition cache before round 1.

    The ServerApp shares the machine and the cache with the simulation's Ray
    actors; built here once, the partitions are a plain ``torch.load`` for the
    actors, which then never import ``datasets``, ``pyarrow``, ``pandas`` and
    the rest (about 420 MB per actor; ``simulations/bench_scale.py``). In a
    deployment the nodes have their own disks and data, so nothing is built.
    Returns whether it prepared anything.

    The build runs in a fresh Python process: in Flower's simulation process the
    ServerApp is a thread beside the engine's own threads, and the build's many
    small NumPy and torch calls then queue for the GIL. 10,000 synthetic
    clients were still being generated there after 6 minutes; the whole build
    takes under 2 minutes in a process of its own.
    """
    # Looked up, not imported: importing Flower's simulation grid costs about
    # 1.3 s, and a grid of that class exists only if its module is loaded.
    simulation = sys.modules.get("flwr.superlink.grid.inmemory_grid")
    if simulation is None or not isinstance(grid, simulation.InMemoryGrid):
        return False
    from bouquet.tasks import DataSpec
    from bouquet.tasks.data import missing_caches
    from bouquet.tasks.fab import module_command

    spec = DataSpec.from_run_config(run_config, num_partitions=num_nodes)
    if not any(missing_caches(spec)):
        return True  # built by an earlier run
    log(INFO, "Preparing %d partitions of %s before round 1", num_nodes, spec.dataset)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        module_command("tasks.data", json.dumps(dataclasses.asdict(spec))),
        env=env,
        check=False,
        stderr=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0:
        # The child's stderr is not the run's log: the last line is the error.
        lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
        raise RuntimeError(
            f"Preparing the nodes' data failed (exit code {done.returncode}): "
            + (lines[-1] if lines else "no error message")
        )
    log(INFO, "Partitions ready in %.1f s", time.perf_counter() - start)
    return True


def _central_evaluator(run_config: Mapping[str, Any], num_partitions: int):  # noqa: ANN202
    from bouquet.tasks import (
        DataSpec,
        dataset_info,
        load_central_test,
        resolve_device,
    )
    from bouquet.tasks.evaluation import evaluate_model
    from bouquet.tasks.finetune import build_task_model, frozen_names

    spec = DataSpec.from_run_config(run_config, num_partitions=num_partitions)
    info = dataset_info(spec)
    x, y = load_central_test(spec)
    typed = {**run_config, **{k: setting(run_config, k) for k in FINETUNE_KEYS}}
    wrapper = get_algorithm(setting(run_config, "algorithm")).model_wrapper
    model = build_task_model(typed, info, wrapper=wrapper).to(
        resolve_device(setting(run_config, "device"))
    )
    frozen = set(frozen_names(model))

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        # A fine-tuned model's frozen entries are the backbone's (never sent).
        state = arrays.to_torch_state_dict()
        loaded = model.load_state_dict(state, strict=not frozen)
        if frozen and (set(loaded.missing_keys) - frozen or loaded.unexpected_keys):
            raise ValueError(f"arrays do not fit the model: {loaded}")
        loss, accuracy = evaluate_model(model, x, y)
        metrics = {"loss": loss, "accuracy": accuracy, "num-examples": len(x)}
        if y.dim() > 1:  # per-token targets: a language model's perplexity
            metrics["perplexity"] = math.exp(min(loss, 700.0))
        return MetricRecord(metrics)

    return model, evaluate


def _input_shape(run_config: Mapping[str, Any]) -> tuple[int, ...]:
    from bouquet.tasks import DataSpec, dataset_info

    spec = DataSpec.from_run_config(run_config, num_partitions=1)
    return tuple(dataset_info(spec).input_shape)


def clock(run_config: Mapping[str, Any]) -> VirtualClock | WallClock:
    """The clock of an asynchronous run (ignored by synchronous ones)."""
    if setting(run_config, "async-clock") == "wall":
        return WallClock()
    return VirtualClock(
        DeviceSpeeds(
            kind=setting(run_config, "device-speeds"),
            ratio=setting(run_config, "device-speed-ratio"),
            noise=setting(run_config, "device-speed-noise"),
        )
    )


def build_strategy(run_config: Mapping[str, Any]) -> BouquetStrategy:
    """The strategy the run config names, with its hyperparameters."""
    cls = get_algorithm(setting(run_config, "algorithm"))
    strategy = cls.from_run_config(strategy_common(run_config), run_config)
    compress_uplink(
        strategy,
        setting(run_config, "compressor"),
        k=setting(run_config, "compressor-k"),
        levels=setting(run_config, "compressor-levels"),
        error_feedback=setting(run_config, "error-feedback"),
    )
    private_training(
        strategy,
        setting(run_config, "dp-sgd-noise-multiplier"),
        epsilon=setting(run_config, "dp-sgd-epsilon"),
        delta=setting(run_config, "dp-sgd-delta"),
        clip=setting(run_config, "dp-sgd-clip"),
    )
    return compress_downlink(
        strategy,
        setting(run_config, "downlink-compressor"),
        k=setting(run_config, "downlink-k"),
        levels=setting(run_config, "downlink-levels"),
    )


def _attack_on_server(
    strategy: BouquetStrategy, run_config: Mapping[str, Any], num_nodes: int
) -> None:
    """Install an omniscient attack (``strategies/attacks.py``) the config names.

    The attackers are the partitions the clients pick
    (``clientapps.attacks.attacker_partitions``); ALIE's ``z`` is the paper's
    ``z_max`` unless ``attack-scale`` sets it.
    """
    kind = setting(run_config, "attack")
    fraction = setting(run_config, "attack-fraction")
    if kind not in SERVER_ATTACKS or fraction == 0.0:
        return
    from bouquet.clientapps.attacks import alie_z, attacker_partitions

    partitions = setting(run_config, "num-partitions") or num_nodes
    seed = setting(run_config, "seed")
    z = setting(run_config, "attack-scale") or alie_z(partitions, fraction)
    attackers = attacker_partitions(partitions, fraction, seed)
    attack_on_server(strategy, kind, attackers, z)


def private_clients(run_config: Mapping[str, Any]) -> bool:
    """Whether the run's clients train with DP-SGD (``dp-sgd-*`` keys)."""
    return (
        setting(run_config, "dp-sgd-noise-multiplier") > 0
        or setting(run_config, "dp-sgd-epsilon") > 0
    )


def checked_strategy(run_config: Mapping[str, Any]) -> BouquetStrategy:
    """Check every setting of ``run_config``; the strategy it names.

    Raises
    ------
    RunConfigError
        The first unknown name, wrong type or out-of-range value, with the
        key and what it accepts.

    """
    from bouquet.clientapps.attacks import check_attack
    from bouquet.clientapps.losses import check_loss
    from bouquet.clientapps.privacy import check_routine
    from bouquet.tasks import DataSpec

    try:
        check_settings(run_config)
        strategy = build_strategy(run_config)
        DataSpec.from_run_config(run_config, num_partitions=1)
        check_attack(
            setting(run_config, "attack"), setting(run_config, "attack-fraction")
        )
        if (
            setting(run_config, "compressor") != "none"
            and setting(run_config, "attack") in UNCOMPRESSIBLE_ATTACKS
        ):
            # Client-side attacks rewrite the model before the uplink encodes
            # it (train_client's poison); these act elsewhere.
            raise ValueError(
                "compressor: a compressed uplink cannot carry the attack "
                f"'{setting(run_config, 'attack')}' (the server crafts "
                "alie-omniscient and min-max from decoded models; rank-reversal "
                "rewrites FRL's rankings): use compressor 'none'."
            )
        if setting(run_config, "attack") in SERVER_ATTACKS:
            # Refused here for algorithms whose replies are not models; the
            # attackers are known once the nodes are (run_server).
            attack_on_server(strategy, setting(run_config, "attack"), ())
            strategy.reply_attack = None
        check_loss(setting(run_config, "loss"))
        if private_clients(run_config):
            check_routine(strategy.routine)
            if importlib.util.find_spec("dp_accounting") is None:
                raise ValueError(
                    "dp-sgd: the clients' accountant needs dp-accounting: "
                    'pip install "flwr-bouquet[dp]"'
                )
    except (ValueError, TypeError, KeyError) as err:
        message = err.args[0] if err.args else str(err)
        raise RunConfigError(str(message)) from None
    return strategy


def effective_run_config(
    strategy: BouquetStrategy,
    run_config: Mapping[str, Any],
    given: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run config a run really uses, with what the algorithm fixes.

    The algorithm fixes shared values through
    :meth:`BouquetStrategy.run_settings`. ``given`` holds the keys the user
    set (None: all of ``run_config``). A value the user set to something else
    is refused: the run would not be the one asked for. Test harnesses that
    build messages without :func:`run_server` call this too.
    """
    fixed = strategy.run_settings()
    if not fixed:
        return dict(run_config)
    given = run_config if given is None else given
    # A value equal to the shared default is no choice (a full run config
    # passed as overrides, e.g. by the in-process runner): it yields.
    clash = {
        k: given[k]
        for k in fixed
        if k in given and given[k] != fixed[k] and given[k] != DEFAULTS[k]
    }
    if clash:
        raise RunConfigError(
            f"{strategy.name} sets {', '.join(f'{k}={fixed[k]!r}' for k in clash)} "
            f"from its own hyperparameters; the run config sets "
            f"{', '.join(f'{k}={v!r}' for k, v in clash.items())}: drop them"
        )
    return {**run_config, **fixed}


def run_server(
    grid: Grid,
    run_config: Mapping[str, Any],
    *,
    settle: float = 1.0,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Result, Path]:
    """Run a whole federation from the server side; return its result and directory.

    ``overrides`` are the keys the user set explicitly (Flower's
    ``override_config``); None: every key of ``run_config``. On resume they are
    checked against the saved run config (``serverapps.resume``).
    """
    given = dict(run_config if overrides is None else overrides)
    run_config = {**DEFAULTS, **run_config}
    path = run_directory(run_config)
    restored: dict[str, Any] = {}
    if setting(run_config, "resume"):
        fused = run_config
        run_config = resumed_config(path, fused, given)
        restored = restored_values(fused, run_config)
        log(
            INFO,
            "Resuming %s with its saved run config%s",
            path,
            "".join(f"\n\t{k} = {v!r}" for k, v in restored.items())
            or " (as submitted)",
        )
    # Fail first, before waiting for nodes: unknown names, values of the wrong
    # type or out of range.
    strategy = checked_strategy(run_config)
    run_config = effective_run_config(strategy, run_config, given)
    # The ClientApps build the same model.
    restored = {**restored, **strategy.run_settings()}
    num_nodes = wait_for_nodes(
        grid,
        setting(run_config, "min-available-nodes"),
        settle,
        timeout=setting(run_config, "node-wait-timeout"),
    )
    prepare_client_data(grid, run_config, num_nodes)
    _attack_on_server(strategy, run_config, num_nodes)
    if restored:  # Flower gives the ClientApps the submitted config
        grid = RunConfigGrid(grid, restored)  # type: ignore[assignment]
    # Availability is the environment's: unavailable nodes never get train messages.
    grid = participation_grid(grid, run_config)
    num_rounds = setting(run_config, "num-server-rounds")
    # The central test of per-client generated data (synthetic) depends on the
    # population: one partition per node unless num-partitions says otherwise.
    model, evaluate = _central_evaluator(
        run_config, setting(run_config, "num-partitions") or num_nodes
    )
    if private_clients(run_config):
        from bouquet.clientapps.privacy import check_model

        try:
            check_model(model)
        except ValueError as err:
            raise RunConfigError(str(err)) from None
    strategy.use_server_model(model, _input_shape(run_config))
    directory = RunDirectory(path)
    directory.write_config(dict(run_config))

    def on_round_end(report: RoundReport, current: ArrayRecord) -> None:
        log(INFO, "%s", progress_line(directory.add(report), num_rounds))

    log(INFO, "Bouquet run directory: %s (%d nodes)", directory.path, num_nodes)
    driver = Driver(
        checkpoint=directory.checkpoint_stem,
        resume=True,
        on_round_end=on_round_end,
        clock=clock(run_config),
        time_budget=setting(run_config, "time-budget"),
    )
    # Fine-tuning (tasks/finetune.py): only the trainable entries travel, and
    # every message names the backbone they belong to.
    from bouquet.tasks.finetune import FROZEN_DIGEST, frozen_digest, frozen_names

    frozen = frozen_names(model)
    shared = {k: v for k, v in model.state_dict().items() if k not in set(frozen)}
    backbone = {FROZEN_DIGEST: frozen_digest(model, frozen)} if frozen else {}
    result = driver.run(
        strategy,
        grid,
        ArrayRecord(shared),
        num_rounds=num_rounds,
        timeout=setting(run_config, "round-timeout"),
        train_config=ConfigRecord(
            {**{k: setting(run_config, k) for k in TRAIN_CONFIG_KEYS}, **backbone}
        ),
        evaluate_config=ConfigRecord({**evaluate_settings(run_config), **backbone}),
        evaluate_fn=evaluate,
    )
    final = summary(directory.rows)
    (directory.path / "summary.json").write_text(json.dumps(final, indent=1))
    if setting(run_config, "plot"):
        directory.plot(
            f"{setting(run_config, 'algorithm')} on {setting(run_config, 'dataset')}"
        )
    if final["error-replies"] or final["missing-replies"]:
        log(
            WARNING,
            "This run had %d error replies and %d missing replies (rounds went on "
            "without them): see 'drop-reasons' in %s/metrics.json.",
            final["error-replies"],
            final["missing-replies"],
            directory.path,
        )
    log(INFO, "Done: %s | results in %s", json.dumps(final), directory.path)
    return result, directory.path
