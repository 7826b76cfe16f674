"""Plain local SGD: the client of FedAvg and of every server-only algorithm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bouquet.clientapps.hooks import Hook


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """No hooks: the loop's SGD is the whole client."""
    return []
