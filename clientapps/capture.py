"""The ClientApp's side of ``audit-capture`` (:mod:`tasks.capture`).

:func:`recorder` says whether this node captures this round (a
:class:`BatchRecorder` to add to the training hooks, else None);
:func:`save` writes the round once the reply is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message

from bouquet.clientapps import bounds
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun
from bouquet.tasks import capture, wire


class BatchRecorder(Hook):
    """Keeps a copy of every batch the loop trains on; changes nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.batches: list[tuple[np.ndarray, np.ndarray]] = []

    def transform_batch(
        self, run: LocalRun, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record ``(x, y)`` and return them unchanged."""
        self.batches.append(
            (x.detach().cpu().numpy().copy(), y.detach().cpu().numpy().copy())
        )
        return x, y


def recorder(
    msg: Message, context: Context, run_config: Mapping[str, Any]
) -> BatchRecorder | None:
    """A recorder when this node's round is the captured one, else None."""
    server_round = bounds.SERVER_ROUND.read(wire.config_of(msg.content))
    path = capture.wanted(
        run_config, context.node_config, context.node_id, server_round
    )
    return None if path is None else BatchRecorder(path)


def save(
    hook: BatchRecorder, msg: Message, reply: Message, run_config: Mapping[str, Any]
) -> Path:
    """Write what the server receives from this node, with the true batches."""
    sent = {k: a.numpy() for k, a in msg.content[wire.ARRAYS].items()}
    records = {
        name: {k: a.numpy() for k, a in record.items()}
        for name, record in reply.content.array_records.items()
    }
    return capture.save_capture(
        hook.path,
        sent,
        records,
        dict(msg.content[wire.CONFIG]),
        run_config,
        hook.batches,
    )
