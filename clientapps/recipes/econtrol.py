"""EControl client: a compressed step with controlled error feedback.

Gao, Islamov, Stich, "EControl: Fast Distributed Optimization with
Compression and Error Control", ICLR 2024, https://arxiv.org/abs/2311.05645.
See ``strategies/econtrol.py`` for the rules.

After the loop's local training from ``x^t`` to ``y_i``,
:class:`EControlUplink` takes the node's update ``v_i = y_i - x^t`` and
replies with ``Delta_i = C(eta e_i + v_i - h_i)`` *compressed* (the payload
of :mod:`tasks.compression` is the reply's ``arrays`` record), keeping
``e_i <- e_i + v_i - h_i - Delta_i`` and ``h_i <- h_i + Delta_i`` in
``Context.state`` (``econtrol.e``, ``econtrol.h``; zero before the node's
first round). Config keys read: ``econtrol.compressor``, ``econtrol.k``,
``econtrol.levels``, ``econtrol.eta``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bouquet.clientapps.bounds import Bound
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.recipes.ef21 import LocalUpdate
from bouquet.clientapps.state import array_record, load_arrays, save_arrays
from bouquet.tasks import compression, wire

NAMESPACE = "econtrol"
COMPRESSOR = Bound(
    wire.algorithm_key(NAMESPACE, "compressor"), "topk", choices=compression.NAMES
)
K = Bound(wire.algorithm_key(NAMESPACE, "k"), 1, 1, 2**62)
LEVELS = Bound(wire.algorithm_key(NAMESPACE, "levels"), 16, 1, compression.MAX_LEVELS)
ETA = Bound(wire.algorithm_key(NAMESPACE, "eta"), 0.05, 0.0, 1.0)
BOUNDS = (COMPRESSOR, K, LEVELS, ETA)


def _saved(run: LocalRun, name: str, like: np.ndarray) -> np.ndarray:
    """A state vector shaped as ``like``, zero when absent or of another shape."""
    saved = (load_arrays(run.state, NAMESPACE, name) or {}).get(name)
    return (
        saved
        if saved is not None and saved.shape == like.shape
        else np.zeros_like(like)
    )


class EControlUplink(LocalUpdate):
    """Reply with ``C(eta e_i + v_i - h_i)``; keep ``e_i``, ``h_i`` in client state.

    Parameters
    ----------
    compressor : tasks.compression.Compressor
        A contractive compressor; the server decodes with the same one.
    eta : float
        Feedback strength (0: EF21's client).

    """

    def __init__(self, compressor: compression.Compressor, eta: float) -> None:
        self.compressor = compressor
        self.eta = float(eta)

    def finish(self, run: LocalRun) -> None:
        v = self.local_update(run)
        e, h = _saved(run, "e", v), _saved(run, "h", v)
        # The node's stream (seeded by seed, round, partition) draws Rand-k / QSGD.
        seed = int(torch.randint(0, 2**62, (1,), generator=run.generator))
        payload = self.compressor.encode(
            self.eta * e + v - h, np.random.default_rng(seed)
        )
        delta = self.compressor.decode(payload, v.size)
        save_arrays(run.state, NAMESPACE, "e", {"e": e + v - h - delta})
        save_arrays(run.state, NAMESPACE, "h", {"h": h + delta})
        run.reply_records[wire.ARRAYS] = array_record(payload)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the compressed controlled-feedback reply."""
    made = compression.make_compressor(
        COMPRESSOR.read(config), K.read(config), LEVELS.read(config)
    )
    return [EControlUplink(compression.contractive(made), ETA.read(config))]
