"""Resuming a run: its saved run config comes back, changes are refused.

A resumed run must be the run that was interrupted. ``run_server`` writes the
full run config into ``<run-dir>/config.json`` when the run starts; with
``resume`` set, :func:`resumed_config` returns that saved config, not the one
Flower fused from ``pyproject.toml`` and this submission's ``--run-config``.
So ``flwr run . <conn> --run-config "resume='<dir>'"`` alone continues the run
with its own rounds, evaluation, seed and hyperparameters. Flower still gives
the ClientApps this submission's fused config (its defaults): :class:`RunConfigGrid`
adds the restored values that differ from it to every message
(``wire.RUN_CONFIG``), and Bouquet's ClientApp lets them win, so the nodes
build the same data partitions and model as in the interrupted run.

A key this submission sets explicitly (Flower's ``override_config``) to a value
other than the saved one is an error that names every such key with both
values, except:

- keys that cannot change the result (:data:`RESULT_NEUTRAL_KEYS`):
  ``resume`` (which run), ``output-dir`` (where runs live), ``plot`` (a picture
  at the end), and ``round-timeout`` / ``node-wait-timeout`` (how long the
  server waits for slow or lost nodes: operational knobs for the machines at
  hand; the rounds' arithmetic does not read them);
- ``num-server-rounds`` may be *raised* (:data:`EXTENDABLE_KEYS`): the run
  goes on for more rounds; what the checkpoint holds is kept. Algorithms whose
  schedule reads the number of rounds (curriculum pacing) schedule the rounds
  still to come for the new total; the log warns. Lowering it is refused (the
  run directory could hold rounds past the new end).

For these keys an explicit value wins, else the saved one. Everything else
(``device`` too: the last bits differ between devices) must match. A key the
saved config lacks (added to the app after the run started) has nothing to be
compared with: it takes this submission's value.

Decisions where the spec was open: only explicit overrides are compared, so a
key left at its ``pyproject.toml`` default is restored silently (that is the
point of resuming); the ServerApp takes the explicit overrides from
``grid.run.override_config``, because the fused ``context.run_config`` cannot
tell an override that equals the default from no override. Values are compared
as numbers when both are numbers (``4`` equals ``4.0``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore import log

from bouquet.serverapps.gridview import GridView
from bouquet.tasks import wire

RESULT_NEUTRAL_KEYS = (
    "resume",
    "output-dir",
    "plot",
    "round-timeout",
    "node-wait-timeout",
)
"""Keys a resumed run may change: they cannot change its result."""

EXTENDABLE_KEYS = ("num-server-rounds",)
"""Keys a resumed run may raise (never lower)."""

CONFIG_FILE = "config.json"


class ResumeConfigError(ValueError):
    """A resume asked for a run config other than the saved one."""


def _same(a: Any, b: Any) -> bool:
    numbers = (int, float)
    if (
        isinstance(a, numbers)
        and isinstance(b, numbers)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return float(a) == float(b)
    return a == b


def changed_keys(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, new value)}`` for overrides that would change the run."""
    changed = {}
    for key, value in overrides.items():
        if key in RESULT_NEUTRAL_KEYS:
            continue
        if key not in saved:
            continue
        before = saved[key]
        if _same(before, value) or (key in EXTENDABLE_KEYS and _raised(before, value)):
            continue
        changed[key] = (before, value)
    return changed


def _raised(before: Any, after: Any) -> bool:
    try:
        return float(after) >= float(before)
    except (TypeError, ValueError):
        return False


def merge_resumed(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    overrides: Mapping[str, Any],
    where: str = "the run directory",
) -> dict[str, Any]:
    """The config of a resumed run (see the module docstring).

    Parameters
    ----------
    saved : Mapping[str, Any]
        The run config the run started with (``config.json``).
    current : Mapping[str, Any]
        This submission's full run config (defaults fused with overrides).
    overrides : Mapping[str, Any]
        The keys this submission set explicitly.
    where : str
        The run directory, for the error message.

    Raises
    ------
    ResumeConfigError
        An override changes a key outside :data:`RESULT_NEUTRAL_KEYS`.

    """
    changed = changed_keys(saved, current, overrides)
    if changed:
        listed = "; ".join(
            f"{key}: {before!r} in the run, {after!r} now"
            for key, (before, after) in sorted(changed.items())
        )
        raise ResumeConfigError(
            f"Cannot resume {where} with a different run config ({listed}). "
            "Resuming restores the run's saved config.json; only "
            f"{', '.join(RESULT_NEUTRAL_KEYS)} may change, and "
            f"{', '.join(EXTENDABLE_KEYS)} may be raised. Drop these overrides, "
            "or start a new run to change them."
        )
    allowed = RESULT_NEUTRAL_KEYS + EXTENDABLE_KEYS
    kept = {k: v for k, v in overrides.items() if k in allowed}
    return {**current, **saved, **kept, "resume": current.get("resume", "")}


def resumed_config(
    directory: Path,
    current: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """Read ``directory/config.json`` and merge (:func:`merge_resumed`)."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"Cannot resume {directory}: no {CONFIG_FILE}, so its run config "
            "cannot be restored or checked."
        )
    saved = json.loads(path.read_text())
    merged = merge_resumed(saved, current, overrides, str(directory))
    for key in EXTENDABLE_KEYS:
        if key in saved and not _same(saved[key], merged[key]):
            log(
                WARNING,
                "Resuming with %s raised from %r to %r: the run goes on past its "
                "planned end (schedules that read it plan the rest for the new "
                "total).",
                key,
                saved[key],
                merged[key],
            )
    return merged


def restored_values(
    current: Mapping[str, Any], merged: Mapping[str, Any]
) -> dict[str, Any]:
    """The merged values that differ from this submission's fused config."""
    return {k: v for k, v in sorted(merged.items()) if not _same(current.get(k), v)}


class RunConfigGrid(GridView):
    """A Grid view that adds restored run-config values to every message.

    Parameters
    ----------
    grid : Grid
        The real grid.
    values : Mapping[str, Any]
        What goes into each message's ``wire.RUN_CONFIG`` ConfigRecord.

    """

    def __init__(self, grid: Grid, values: Mapping[str, Any]) -> None:
        super().__init__(grid)
        self.values = dict(values)

    def outgoing(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for msg in messages:
            msg.content[wire.RUN_CONFIG] = ConfigRecord(self.values)
        return messages


__all__ = [
    "EXTENDABLE_KEYS",
    "RESULT_NEUTRAL_KEYS",
    "ResumeConfigError",
    "RunConfigGrid",
    "changed_keys",
    "merge_resumed",
    "restored_values",
    "resumed_config",
]
