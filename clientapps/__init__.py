"""Client side of Bouquet: the ClientApp, the one training loop, hooks and recipes.

The client routines are the public entry points for a user's own ClientApp::

    from bouquet.clientapps import describe_client, evaluate_client, train_client

Importing this package is cheap: the routines (and torch) load on first use
(PEP 562), and the ClientApp (``clientapps.app``) imports the data only when a
message arrives. The ClientApp and the routines, imported inside Flower's
simulation engine (which loads the ClientApp before it starts), replace the
engine's per-node polling with one pass over all nodes
(``bouquet.tasks.flower_engine``, version-checked).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bouquet.clientapps.bounds import ConfigError
    from bouquet.clientapps.routine import (
        describe_client,
        evaluate_client,
        train_client,
    )

_EXPORTS = {
    "train_client": "bouquet.clientapps.routine",
    "evaluate_client": "bouquet.clientapps.routine",
    "describe_client": "bouquet.clientapps.routine",
    "ConfigError": "bouquet.clientapps.bounds",
}

__all__ = ["ConfigError", "describe_client", "evaluate_client", "train_client"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bouquet.clientapps' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
