"""The algorithm registry: every algorithm's declaration, looked up by name.

An algorithm is its strategy class (``docs/architecture.md``, "One
declaration"): the class attributes ``name``, ``routine``, ``params``,
``paper``, ``tagline``, ``family`` and ``reductions`` say everything the apps,
the docs and the tests need. A module registers its classes with the
:func:`register` decorator; the registry imports every module of this package
on first use, so adding an algorithm means adding its module, never editing a
list. A module that fails to import is reported by name and does not hide the
others.

Names may be listed with shell-style wildcards (``list_algorithms("fed*")``);
an unknown name raises a :class:`KeyError` that lists the known ones and
suggests the closest.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import pkgutil
import re
import traceback
from logging import ERROR
from typing import TYPE_CHECKING, TypeVar

from flwr.supercore import log

if TYPE_CHECKING:
    from bouquet.strategies.base import BouquetStrategy

_NAME = re.compile(r"^[a-z][a-z0-9-]*$")

S = TypeVar("S", bound="type[BouquetStrategy]")


class UnknownAlgorithmError(KeyError):
    """Raised for a name that is not registered; the message lists known names."""

    def __str__(self) -> str:
        return str(self.args[0])


_REGISTRY: dict[str, type[BouquetStrategy]] = {}
_BROKEN: dict[str, str] = {}
_discovered = False


def register(cls: S) -> S:
    """Class decorator: add an algorithm's strategy class under ``cls.name``."""
    name = cls.name
    if not _NAME.match(name or ""):
        raise ValueError(f"{cls.__name__}.name must be kebab-case; got {name!r}.")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"Algorithm '{name}' is already registered.")
    keys = [p.key for p in cls.params]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{name}: a hyperparameter is declared twice: {keys}.")
    if not _NAME.match(cls.routine):
        raise ValueError(f"{name}: routine must name a recipe; got {cls.routine!r}.")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    """Import every module of this package once (broken ones are reported)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(__package__ or "strategies")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{package.__name__}.{module.name}")
        except Exception as err:
            _BROKEN[module.name] = "".join(traceback.format_exception_only(err)).strip()
            log(ERROR, "strategies.%s failed to import: %s", module.name, err)


def list_algorithms(pattern: str = "*") -> list[str]:
    """Registered names matching the shell-style ``pattern``, sorted."""
    _discover()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def get_algorithm(name: str) -> type[BouquetStrategy]:
    """Return the strategy class registered as ``name``.

    Raises
    ------
    UnknownAlgorithmError
        If no algorithm has that name; the message lists the known names and
        the closest matches (and any module that failed to import).

    """
    _discover()
    if name in _REGISTRY:
        return _REGISTRY[name]
    known = sorted(_REGISTRY)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    broken = (
        f" Modules that failed to import: {', '.join(sorted(_BROKEN))}."
        if _BROKEN
        else ""
    )
    raise UnknownAlgorithmError(
        f"Unknown algorithm '{name}'.{hint} Known algorithms: "
        f"{', '.join(known)}.{broken}"
    )


def strategy_classes() -> dict[str, type[BouquetStrategy]]:
    """Every registered class by its class name (``bouquet.strategies``' table)."""
    _discover()
    return {cls.__name__: cls for cls in _REGISTRY.values()}


def broken_modules() -> dict[str, str]:
    """Modules of this package that failed to import, with their error."""
    _discover()
    return dict(_BROKEN)


def pyproject_tables() -> str:
    """The ``[tool.flwr.app.config.<name>]`` tables every algorithm needs.

    ``pyproject.toml`` must declare them (Flower rejects undeclared run-config
    keys); a test checks that it does, value for value.
    """
    blocks = []
    for name in list_algorithms():
        lines = [f"[tool.flwr.app.config.{name}]"]
        for p in get_algorithm(name).params:
            value = (
                repr(p.default) if not isinstance(p.default, str) else f'"{p.default}"'
            )
            value = {"True": "true", "False": "false"}.get(value, value)
            lines.append(f"{p.key} = {value}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"
