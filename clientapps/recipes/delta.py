"""Plain local SGD that replies with its update ``Delta_i``, not its weights.

The client of the asynchronous algorithms (``fedasync``, ``fedbuff``,
``fedfix``, ``fedcompass``): the server applies ``Delta_i`` to whatever model
version is current when the reply arrives (see ``strategies/asynchrony.py``).
The task's size arrives as ``local-steps``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bouquet.clientapps.hooks import Hook, ReturnDelta


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: reply with the delta."""
    return [ReturnDelta()]
