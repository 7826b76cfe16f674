"""The run config's shared settings: declared once, typed and range-checked.

Every shared key is a :class:`~tasks.params.Param` here; an algorithm's
own keys are declared on its strategy class. ``pyproject.toml`` must declare
the same keys with the same defaults (Flower rejects undeclared run-config
keys); a test checks that it does. Values arrive untyped from ``--run-config``
(``lr='oops'`` is a string): :func:`setting` coerces each to the type of its
default and checks its range, with an error that names the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bouquet.strategies.clocks import SPEED_MODELS
from bouquet.strategies.sampling import LINKS, MODELS
from bouquet.strategies.uplink import CHOICES as UPLINK_CHOICES
from bouquet.tasks import capture, finetune, wire
from bouquet.tasks.params import Param, defaults

SETTINGS: tuple[Param, ...] = (
    Param("algorithm", "fedavg", help="a registered algorithm name"),
    Param("num-server-rounds", 10, ">= 1", "rounds (model versions when asynchronous)"),
    Param("fraction-train", 1.0, "[0, 1]"),
    Param("fraction-evaluate", 1.0, "[0, 1]"),
    Param("min-train-nodes", 2, ">= 0"),
    Param("min-evaluate-nodes", 2, ">= 0"),
    Param("min-available-nodes", 2, ">= 0"),
    Param(wire.LOCAL_EPOCHS, 2, ">= 0"),
    Param(wire.LOCAL_STEPS, 0, ">= 0", "> 0 caps local optimizer steps per round"),
    Param(wire.BATCH_SIZE, 16, ">= 1"),
    Param(wire.LR, 0.1, ">= 0"),
    Param(wire.MOMENTUM, 0.9, "[0, 1)", "SGD momentum (the clients refuse 1 or more)"),
    Param(wire.WEIGHT_DECAY, 0.0, ">= 0"),
    Param(wire.OPTIMIZER, "sgd", choices=("sgd", "adam", "adamw")),
    Param(wire.LOSS, "cross-entropy", help="the clients' loss (clientapps/losses.py)"),
    Param("personal-parameters", "", help="comma-separated globs or 'head'"),
    Param(
        wire.FINETUNE_STEPS,
        0,
        ">= 0",
        "local steps on a copy before each node's evaluation (any algorithm)",
    ),
    Param("seed", 42),
    Param("dataset", "digits"),
    Param("partitioner", "dirichlet"),
    Param("num-partitions", 0, ">= 0", "0 = one partition per node"),
    Param("dirichlet-alpha", 0.3, "> 0"),
    Param("classes-per-partition", 2, ">= 1"),
    Param("num-shards-per-partition", 2, ">= 1"),
    Param("num-groups", 4, ">= 1", "latent groups of the 'grouped' partitioner"),
    Param("imbalance-factor", 0.02, "(0, 1]", "min/max class count of 'long-tail'"),
    Param("partition-by", "label"),
    Param("data-path", ""),
    Param("test-fraction", 0.2, "(0, 1)"),
    Param("val-fraction", 0.2, "[0, 1)"),
    Param("synthetic-alpha", 1.0, ">= 0"),
    Param("synthetic-beta", 1.0, ">= 0"),
    Param("model", "mlp"),
    Param("model-norm", "batch", choices=("batch", "group", "none")),
    # Fine-tuning a pretrained backbone (tasks/finetune.py).
    *finetune.PARAMS,
    Param("device", "cpu"),
    Param("output-dir", ""),
    Param("plot", True),
    Param("resume", ""),
    Param("round-timeout", 3600.0, "> 0"),
    Param("node-wait-timeout", 300.0, ">= 0", "0 waits for ever"),
    Param(
        "max-num-examples",
        1_000_000_000,
        ">= 1",
        "largest num-examples a reply may claim (larger: the reply is dropped)",
    ),
    Param("compressor", "none", choices=UPLINK_CHOICES, help="strategies/uplink.py"),
    Param("compressor-k", 100, ">= 1", "coordinates kept by topk / randk"),
    Param("compressor-levels", 16, "[1, 127]", "levels of qsgd / quantize"),
    Param("error-feedback", False, help="clients keep the compression error"),
    Param(
        "downlink-compressor",
        "none",
        choices=UPLINK_CHOICES,
        help="strategies/downlink.py: train messages carry C(x - x_hat)",
    ),
    Param("downlink-k", 100, ">= 1", "coordinates kept by topk / randk (downlink)"),
    Param("downlink-levels", 16, "[1, 127]", "levels of qsgd / quantize (downlink)"),
    Param(
        "dp-sgd-noise-multiplier",
        0.0,
        ">= 0",
        "> 0: clients train with DP-SGD (clientapps/privacy.py)",
    ),
    Param("dp-sgd-epsilon", 0.0, ">= 0", "> 0: each client's budget"),
    Param("dp-sgd-delta", 1e-5, "(0, 1)"),
    Param("dp-sgd-clip", 1.0, "> 0", "per-example gradient norm bound C"),
    Param("attack", "none", help="clientapps/attacks.py"),
    Param("attack-fraction", 0.0, "[0, 1]"),
    Param("attack-scale", 0.0, ">= 0", "0 = the attack's default"),
    # Saving one node's round for the gradient-inversion audit (tasks/capture.py).
    *capture.PARAMS,
    Param("participation", "uniform", choices=MODELS),
    Param("participation-mean", 0.1, "(0, 1]"),
    Param("participation-min", 0.02, "[0, 1]"),
    Param("participation-alpha", 0.1, "> 0"),
    Param("participation-link", "label", choices=LINKS),
    Param("participation-cycle", 100, ">= 2"),
    Param("participation-markov-active", 0.05, "(0, 1]"),
    Param("async-clock", "virtual", choices=("virtual", "wall")),
    Param("device-speeds", "equal", choices=SPEED_MODELS),
    Param("device-speed-ratio", 5.0, ">= 1"),
    Param("device-speed-noise", 0.0, ">= 0"),
    Param(
        "time-budget", 0.0, ">= 0", "simulated time (0 = num-server-rounds versions)"
    ),
)

_BY_KEY = {p.key: p for p in SETTINGS}
DEFAULTS: dict[str, Any] = defaults(SETTINGS)

FINETUNE_KEYS = tuple(finetune.DEFAULTS)
"""The fine-tuning keys (both halves read them from the run config)."""

TRAIN_CONFIG_KEYS = wire.TRAIN_SETTINGS
"""Shared keys sent to clients in every train message's config."""


def evaluate_settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Shared keys sent in every evaluate message's config.

    With ``finetune-steps`` > 0, it and the local-training settings the
    fine-tuning uses; else nothing (the messages of runs without it stay as
    they were).
    """
    if not (steps := setting(run_config, wire.FINETUNE_STEPS)):
        return {}
    return {
        wire.FINETUNE_STEPS: steps,
        **{k: setting(run_config, k) for k in TRAIN_CONFIG_KEYS},
    }


def setting(run_config: Mapping[str, Any], key: str) -> Any:
    """A shared setting, typed and checked, falling back to its default."""
    param = _BY_KEY[key]
    return param.parse(run_config.get(key, param.default), key)


class RunConfigError(ValueError):
    """A run-config value is unknown, of the wrong type or out of range.

    The ServerApp logs it as one line (``Invalid run config: ...``) before the
    run fails, so it is not lost at the end of a traceback.
    """


def check_settings(run_config: Mapping[str, Any]) -> None:
    """Parse every shared setting once, so a bad value fails before any work."""
    for key in _BY_KEY:
        setting(run_config, key)


def personal_patterns(run_config: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``personal-parameters`` patterns (comma-separated)."""
    text = setting(run_config, "personal-parameters")
    return tuple(p.strip() for p in text.split(",") if p.strip())


def strategy_common(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments every strategy takes (sampling, seed, personal)."""
    return {
        "fraction_train": setting(run_config, "fraction-train"),
        "fraction_evaluate": setting(run_config, "fraction-evaluate"),
        "min_train_nodes": setting(run_config, "min-train-nodes"),
        "min_evaluate_nodes": setting(run_config, "min-evaluate-nodes"),
        "min_available_nodes": setting(run_config, "min-available-nodes"),
        "node_wait_timeout": setting(run_config, "node-wait-timeout"),
        "max_num_examples": setting(run_config, "max-num-examples"),
        "seed": setting(run_config, "seed"),
        "personal": personal_patterns(run_config),
    }
