"""Client recipes: one module per algorithm that changes local training.

A recipe module defines ``make_hooks(config) -> list[Hook]``; ``config`` is the
message's config record. The registry entry of an algorithm names its recipe
(``AlgorithmEntry.client``); algorithms whose clients just train use ``plain``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from clientapps.hooks import Hook

Recipe = Callable[[Mapping[str, Any]], list[Hook]]


def get_recipe(name: str) -> Recipe:
    """The ``make_hooks`` of recipe module ``name``."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise ValueError(f"No client recipe named '{name}' in {__name__}.") from err
    return module.make_hooks
