"""One import name, ``bouquet``, wherever Bouquet's code runs from.

Bouquet's modules import each other as ``bouquet.<package>`` (``bouquet.tasks``,
``bouquet.strategies``, ...), never as bare ``tasks`` or ``strategies``: a
user's Flower app is first on ``sys.path`` and its own ``tasks.py`` or
``strategies/`` would shadow ours (architecture rule 10). An install provides
``bouquet`` (``pyproject.toml`` maps the checkout's folders under it; an
editable install maps them onto the checkout).

A checkout or a FAB run by ``flwr run .`` has no ``bouquet`` folder: Flower
imports the entry modules ``serverapps.app`` and ``clientapps.app`` from the
app's directory. Those two call :func:`name_this_copy_bouquet` first, which
makes ``bouquet`` a package whose path is the folder(s) holding these
packages, so the FAB's own code runs even where another copy is installed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

PACKAGES = ("strategies", "clientapps", "serverapps", "simulations", "tasks")
"""The checkout's top-level packages, which ``bouquet`` holds."""


def copy_roots() -> list[str]:
    """The folders that hold this copy's top-level packages.

    One for a checkout or a FAB; one per package where Ray's ``py_modules``
    shipped them separately.
    """
    roots: list[str] = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = str(Path(next(iter(spec.submodule_search_locations))).resolve().parent)
        if root not in roots:
            roots.append(root)
    return roots


def name_this_copy_bouquet() -> None:
    """Make ``import bouquet.<package>`` load this checkout's or FAB's packages.

    Raises
    ------
    ImportError
        Modules of another ``bouquet`` copy are already loaded in this process:
        mixing two copies would give two registries and two sets of classes.

    """
    roots = copy_roots()
    current = sys.modules.get("bouquet")
    if current is not None:
        paths = [str(Path(p).resolve()) for p in getattr(current, "__path__", [])]
        if all(root in paths for root in roots):
            return
        loaded = sorted(n for n in sys.modules if n.startswith("bouquet."))
        if loaded:
            raise ImportError(
                f"Another copy of Bouquet ({paths}) is already loaded "
                f"({', '.join(loaded[:3])}, ...); this app's copy is in {roots}. "
                "Run the app in a fresh process (Flower's default)."
            )
    spec = importlib.machinery.ModuleSpec("bouquet", None, is_package=True)
    spec.submodule_search_locations = roots
    module = importlib.util.module_from_spec(spec)
    module.__doc__ = "Bouquet, from this app's own folders (bouquet.tasks.fab)."
    module.__fab__ = True
    sys.modules["bouquet"] = module


def module_command(module: str, *args: str) -> list[str]:
    """The command that runs ``python -m bouquet.<module> args`` in a child process.

    Where this process named its own copy ``bouquet`` (:func:`name_this_copy_bouquet`),
    the child does the same before running the module, so it runs that copy
    too; the child's ``PYTHONPATH`` must hold this process's ``sys.path``.
    """
    bouquet = sys.modules.get("bouquet")
    if bouquet is None or not getattr(bouquet, "__fab__", False):
        return [sys.executable, "-m", f"bouquet.{module}", *args]
    code = (
        "import runpy, sys; from tasks.fab import name_this_copy_bouquet; "
        f"name_this_copy_bouquet(); runpy.run_module({f'bouquet.{module}'!r}, "
        "run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, "-c", code, *args]
