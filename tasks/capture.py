"""Captured updates: what an honest-but-curious server receives from one node.

With ``audit-capture = "<folder>"`` in the run config, the node with
partition id ``audit-capture-node`` (a node without one: its node id) saves,
in round ``audit-capture-round``, one file
``<folder>/capture-round<r>-node<n>.npz`` holding

- ``sent/<name>``: the global arrays it trained from (after a compressed
  downlink is decoded: the model the server knows it sent);
- ``reply/<record>/<name>``: every array record of its reply, as the server
  receives it (a compressed uplink's payload stays encoded);
- ``config``: the message's config as JSON (the training settings: ``lr``,
  ``batch-size``, ``local-epochs``, the routine, the wrapper, the uplink);
- ``run-config``: the run config as JSON (the model and dataset to rebuild);
- ``true-x``, ``true-y``, ``true-steps``: the batches the node trained on, in
  order, and the size of each (for scoring only: the server never sees them).

``simulations/gifd_audit.py --captured <file>`` reconstructs inputs from it.
An audit of the simulation: the flag is off by default, and a real node would
only write the file where it runs. The batches are recorded by a hook that
leaves them unchanged (:class:`clientapps.capture.BatchRecorder`, after the
recipe's and the attack's hooks: the batch as it was trained on, flipped
labels included).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bouquet.tasks.params import Param, parse_all

PARAMS: tuple[Param, ...] = (
    Param(
        "audit-capture",
        "",
        help="a folder: one node's round is saved there (simulations/gifd_audit.py)",
    ),
    Param("audit-capture-round", 1, ">= 1", "the round that is captured"),
    Param("audit-capture-node", 0, ">= 0", "partition id of the captured node"),
)


def _settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    return parse_all(PARAMS, run_config)


def wanted(
    run_config: Mapping[str, Any],
    node_config: Mapping[str, Any],
    node_id: int,
    server_round: int,
) -> Path | None:
    """The file this node writes this round, or None (the usual case)."""
    settings = _settings(run_config)
    if not settings["audit-capture"]:
        return None
    node = int(node_config.get("partition-id", node_id))
    if (
        node != settings["audit-capture-node"]
        or server_round != settings["audit-capture-round"]
    ):
        return None
    folder = Path(settings["audit-capture"]).expanduser()
    return folder / f"capture-round{server_round}-node{node}.npz"


def _jsonable(values: Mapping[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in values.items() if isinstance(v, (bool, int, float, str))},
        sort_keys=True,
    )


def save_capture(
    path: Path,
    sent: Mapping[str, np.ndarray],
    reply: Mapping[str, Mapping[str, np.ndarray]],
    config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    batches: list[tuple[np.ndarray, np.ndarray]],
) -> Path:
    """Write one captured round (the layout in the module docstring)."""
    entries: dict[str, np.ndarray] = {
        f"sent/{k}": np.asarray(v) for k, v in sent.items()
    }
    for record, arrays in reply.items():
        for name, value in arrays.items():
            entries[f"reply/{record}/{name}"] = np.asarray(value)
    entries["config"] = np.array(_jsonable(config))
    entries["run-config"] = np.array(_jsonable(run_config))
    if batches:
        entries["true-x"] = np.concatenate([x for x, _ in batches])
        entries["true-y"] = np.concatenate([y for _, y in batches])
    entries["true-steps"] = np.array([len(y) for _, y in batches], dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **entries)
    tmp.replace(path)
    return path


def load_capture(path: str | Path) -> dict[str, Any]:
    """A captured round by part: ``sent``, ``reply``, ``config``, ``true-x`` ..."""
    with np.load(Path(path), allow_pickle=False) as data:
        out: dict[str, Any] = {"sent": {}, "reply": {}}
        for key in data.files:
            if key.startswith("sent/"):
                out["sent"][key[len("sent/") :]] = data[key]
            elif key.startswith("reply/"):
                record, name = key[len("reply/") :].split("/", 1)
                out["reply"].setdefault(record, {})[name] = data[key]
            elif key in ("config", "run-config"):
                out[key] = json.loads(str(data[key]))
            else:
                out[key] = data[key]
    return out
