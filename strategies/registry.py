"""The algorithm registry: one entry per algorithm, looked up by name.

An algorithm registers itself at import time from its own module in
``strategies/`` (``register(AlgorithmEntry(...))``). The registry imports every
module of the package on first use, so adding an algorithm means adding its
module, never editing a list here.

Names may be listed with shell-style wildcards (``list_algorithms("fed*")``);
an unknown name raises a :class:`KeyError` that lists the known ones and
suggests the closest.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp.strategy import Strategy

# Modules of this package that hold infrastructure, not algorithms.
_INFRASTRUCTURE = frozenset(
    {
        "registry",
        "keys",
        "base",
        "aggregation",
        "state",
        "sampling",
        "validation",
        "profiles",
        "asynchrony",
    }
)

StrategyBuilder = Callable[[Mapping[str, Any], Mapping[str, Any]], Strategy]
"""``build(common, hyperparameters) -> Strategy``.

``common`` holds the shared strategy settings as Python keyword names
(``fraction_train``, ``min_train_nodes``, ``seed`` ...); ``hyperparameters`` the
algorithm's own values, keyed as in its ``pyproject.toml`` table (kebab-case,
without the ``"<algorithm>."`` prefix).
"""


@dataclass(frozen=True)
class AlgorithmEntry:
    """Everything the apps need to know about one algorithm.

    Attributes
    ----------
    name : str
        Registry name; equals the module name and the ``pyproject.toml`` table.
    build : StrategyBuilder
        Creates the server-side strategy.
    client : str
        Name of the client recipe in ``clientapps.recipes`` (``"plain"`` for
        algorithms whose clients just train, e.g. FedAvg, Krum).
    hyperparameters : Mapping[str, Any]
        The algorithm's own run-config keys with their defaults (the paper's
        names and values). ``pyproject.toml`` must declare exactly these.
    paper : str
        Citation: title, venue, link.
    summary : str
        One line for the README's algorithm table.
    family : str
        Grouping used in the README table.

    """

    name: str
    build: StrategyBuilder
    client: str = "plain"
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    paper: str = ""
    summary: str = ""
    family: str = "baseline"


class UnknownAlgorithmError(KeyError):
    """Raised for a name that is not registered; the message lists known names."""

    def __str__(self) -> str:
        return str(self.args[0])


_REGISTRY: dict[str, AlgorithmEntry] = {}
_discovered = False


def register(entry: AlgorithmEntry) -> AlgorithmEntry:
    """Add ``entry`` to the registry; a name registered twice raises ValueError."""
    if entry.name in _REGISTRY and _REGISTRY[entry.name] is not entry:
        raise ValueError(f"Algorithm '{entry.name}' is already registered.")
    _REGISTRY[entry.name] = entry
    return entry


def _discover() -> None:
    """Import every algorithm module of this package once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(__package__ or "strategies")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.startswith("_") or module.name in _INFRASTRUCTURE:
            continue
        importlib.import_module(f"{package.__name__}.{module.name}")


def list_algorithms(pattern: str = "*") -> list[str]:
    """Registered names matching the shell-style ``pattern``, sorted."""
    _discover()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_algorithm(name: str) -> AlgorithmEntry:
    """Return the entry registered as ``name``.

    Raises
    ------
    UnknownAlgorithmError
        If no algorithm has that name; the message lists the known names and
        the closest matches.

    """
    _discover()
    if name in _REGISTRY:
        return _REGISTRY[name]
    known = sorted(_REGISTRY)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownAlgorithmError(
        f"Unknown algorithm '{name}'.{hint} Known algorithms: {', '.join(known)}."
    )
