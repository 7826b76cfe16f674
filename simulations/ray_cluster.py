"""Run Bouquet simulations on an existing Ray cluster whose workers lack the code.

Flower's simulation engine attaches to a running Ray cluster through
``RAY_ADDRESS``, but it does not ship the app to the worker machines: their
actors get the submitting machine's ``sys.path`` (absolute paths that do not
exist there) and every ClientApp call fails with ``ModuleNotFoundError``.

:func:`ship_bouquet` is a Ray runtime-env hook. Set it in the environment of
the simulation SuperLink, next to ``RAY_ADDRESS``::

    RAY_ADDRESS=<head>:6379 \
    RAY_RUNTIME_ENV_HOOK=simulations.ray_cluster.ship_bouquet \
    flower-superlink --simulation ...

When Flower's engine calls ``ray.init``, the hook adds Bouquet's packages
(``strategies``, ``clientapps``, ``serverapps``, ``simulations``, ``tasks``, as
they are on the driver: the app that ``flwr run`` shipped) to the job's
``py_modules``: Ray zips them once, uploads them to the cluster and puts them
first on every worker's path. Entries of the ``PYTHONPATH`` Flower forwards
that hold any of these packages are removed, so every worker, local or
remote, runs the same uploaded copy. Workers need the same Python environment (Python,
ray, flwr, torch, ...), nothing of Bouquet.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

PACKAGES = ("strategies", "clientapps", "serverapps", "simulations", "tasks")
"""Bouquet's top-level packages, all shipped."""


def package_dirs() -> list[Path]:
    """Where this process imports Bouquet's packages from."""
    dirs = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"Bouquet package {name!r} is not importable.")
        dirs.append(Path(next(iter(spec.submodule_search_locations))).resolve())
    return dirs


def _holds_bouquet(entry: str) -> bool:
    """Whether a path entry makes any Bouquet package importable."""
    return any((Path(entry) / name / "__init__.py").is_file() for name in PACKAGES)


def _without_bouquet_paths(env: dict[str, Any]) -> dict[str, Any]:
    env_vars = dict(env.get("env_vars", {}))
    if "PYTHONPATH" in env_vars:
        kept = [
            p
            for p in env_vars["PYTHONPATH"].split(os.pathsep)
            if p and not _holds_bouquet(p)
        ]
        env_vars["PYTHONPATH"] = os.pathsep.join(kept)
        env["env_vars"] = env_vars
    return env


def strip_bouquet_paths(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Ray runtime-env hook for diagnosis: forward no path that holds Bouquet.

    Without :func:`ship_bouquet`'s upload, workers then see only what their own
    machine has: on one host this simulates a cluster whose workers lack the
    code (their ClientApp calls fail, and the run counts the error replies).
    """
    return _without_bouquet_paths(dict(runtime_env or {}))


def ship_bouquet(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Ray runtime-env hook: ship Bouquet's packages with the job (see module doc).

    Parameters
    ----------
    runtime_env : dict or None
        The runtime env ``ray.init`` was called with (Flower sets
        ``env_vars.PYTHONPATH``).

    Returns
    -------
    dict
        The runtime env with Bouquet's package directories in ``py_modules``.

    """
    env = _without_bouquet_paths(dict(runtime_env or {}))
    others = [m for m in env.get("py_modules", []) if Path(str(m)).name not in PACKAGES]
    env["py_modules"] = [*others, *(str(d) for d in package_dirs())]
    return env
