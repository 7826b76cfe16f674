"""A Grid view that changes what is sent, and forwards everything else.

The ServerApp wraps the run's grid for environment effects the strategy must
not know about: non-uniform participation (:mod:`serverapps.participation`
drops train messages to unavailable nodes) and resume (:mod:`serverapps.resume`
stamps the restored run config on every message). Each view overrides
:meth:`GridView.outgoing` only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


class GridView:
    """Forwards to ``grid``; messages pass through :meth:`outgoing` first."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def outgoing(self, messages: Iterable[Message]) -> list[Message]:
        """What of ``messages`` is delivered, as delivered (default: all, as is)."""
        return list(messages)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(self.outgoing(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        deliver = self.outgoing(messages)
        if not deliver:
            return []
        return self._grid.send_and_receive(deliver, timeout=timeout)
