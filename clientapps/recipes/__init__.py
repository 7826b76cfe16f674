"""Client recipes: one module per client routine, found by name.

A recipe module defines ``make_hooks(config) -> list[Hook]``; ``config`` is the
message's config record. The server's strategy names the routine its
algorithm needs (``config["client-routine"]``); algorithms whose clients just
train use ``plain``. Only the named module is imported: one broken recipe
never breaks the others, and the client never imports the server side.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping
from typing import Any

from clientapps.hooks import Hook

Recipe = Callable[[Mapping[str, Any]], list[Hook]]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def list_recipes() -> list[str]:
    """The routines this client can run."""
    return sorted(
        m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")
    )


def get_recipe(name: str) -> Recipe:
    """The ``make_hooks`` of recipe module ``name``."""
    if not _NAME.match(name) or name not in list_recipes():
        known = ", ".join(list_recipes())
        raise ValueError(
            f"This client has no routine {name!r} (it has {known}): "
            "install the Bouquet version the server runs."
        )
    return importlib.import_module(f"{__name__}.{name}").make_hooks
