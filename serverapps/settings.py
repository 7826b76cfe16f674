"""Run-config parsing: typed, checked values with errors that name the key.

Flower does not type-check ``--run-config`` values (``lr='oops'`` arrives as a
string), so every value is coerced to the type of its default here, once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strategies import keys
from strategies.registry import AlgorithmEntry

# Shared run-config keys and their defaults (pyproject.toml declares the same).
DEFAULTS: dict[str, Any] = {
    "algorithm": "fedavg",
    "num-server-rounds": 10,
    "fraction-train": 1.0,
    "fraction-evaluate": 1.0,
    "min-train-nodes": 2,
    "min-evaluate-nodes": 2,
    "min-available-nodes": 2,
    keys.LOCAL_EPOCHS: 2,
    keys.LOCAL_STEPS: 0,
    keys.BATCH_SIZE: 16,
    keys.LR: 0.1,
    keys.MOMENTUM: 0.9,
    keys.WEIGHT_DECAY: 0.0,
    "seed": 42,
    "dataset": "digits",
    "partitioner": "dirichlet",
    "num-partitions": 0,
    "dirichlet-alpha": 0.3,
    "classes-per-partition": 2,
    "num-shards-per-partition": 2,
    "partition-by": "label",
    "data-path": "",
    "test-fraction": 0.2,
    "val-fraction": 0.2,
    "synthetic-alpha": 1.0,
    "synthetic-beta": 1.0,
    "model": "mlp",
    "model-norm": "batch",
    "device": "cpu",
    "output-dir": "",
    "plot": True,
    "resume": "",
    "round-timeout": 3600.0,
    "node-wait-timeout": 300.0,
    "attack": "none",
    "attack-fraction": 0.0,
    "attack-scale": 0.0,
    "participation": "uniform",
    "participation-mean": 0.1,
    "participation-min": 0.02,
    "participation-alpha": 0.1,
    "participation-link": "label",
    "participation-cycle": 100,
    "participation-markov-active": 0.05,
    "async-clock": "virtual",
    "device-speeds": "equal",
    "device-speed-ratio": 5.0,
    "device-speed-noise": 0.0,
    "time-budget": 0.0,
}

TRAIN_CONFIG_KEYS = (
    keys.LOCAL_EPOCHS,
    keys.LOCAL_STEPS,
    keys.BATCH_SIZE,
    keys.LR,
    keys.MOMENTUM,
    keys.WEIGHT_DECAY,
)
"""Shared keys sent to clients in every train message's config."""


def coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default``; ValueError naming ``key`` if impossible."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Run config '{key}' must be {kind.__name__} (like {default!r}); "
            f"got {value!r}."
        ) from None


def setting(run_config: Mapping[str, Any], key: str) -> Any:
    """A shared setting, typed, falling back to :data:`DEFAULTS`."""
    default = DEFAULTS[key]
    return coerce(key, run_config.get(key, default), default)


def hyperparameters(
    entry: AlgorithmEntry, run_config: Mapping[str, Any]
) -> dict[str, Any]:
    """The algorithm's own values (``"<name>.<key>"`` in the run config), typed."""
    values = {}
    for key, default in entry.hyperparameters.items():
        full = keys.algorithm_key(entry.name, key)
        values[key] = coerce(full, run_config.get(full, default), default)
    return values


def strategy_common(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments every strategy takes (sampling and seed)."""
    return {
        "fraction_train": setting(run_config, "fraction-train"),
        "fraction_evaluate": setting(run_config, "fraction-evaluate"),
        "min_train_nodes": setting(run_config, "min-train-nodes"),
        "min_evaluate_nodes": setting(run_config, "min-evaluate-nodes"),
        "min_available_nodes": setting(run_config, "min-available-nodes"),
        "node_wait_timeout": setting(run_config, "node-wait-timeout"),
        "seed": setting(run_config, "seed"),
    }
