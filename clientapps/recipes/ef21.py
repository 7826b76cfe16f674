"""EF21 client: local training, then a compressed step of its gradient estimate.

Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better,
and Practically Faster Error Feedback", NeurIPS 2021,
https://arxiv.org/abs/2106.05203 (as restated by Richtarik, Gasanov,
Burlachenko, "Error Feedback Reloaded", ICLR 2024,
https://arxiv.org/abs/2402.10774). See ``strategies/ef21.py`` for the rules.

After the loop's local training from ``x^t`` to ``y_i``, :class:`EF21Uplink`
takes the node's update ``v_i = y_i - x^t`` (one full-batch SGD step: exactly
``-lr grad f_i(x^t)``), and replies with ``c_i = C(v_i - g_i)``
*compressed* (the payload of :mod:`tasks.compression` is the reply's
``arrays`` record) while keeping ``g_i <- g_i + C(v_i - g_i)`` in
``Context.state`` (``ef21.g``, zero before the node's first round). Config
keys read: ``ef21.compressor``, ``ef21.k``, ``ef21.levels``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bouquet.clientapps.bounds import Bound
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.state import array_record, load_arrays, save_arrays
from bouquet.tasks import compression, wire

NAMESPACE = "ef21"
COMPRESSOR = Bound(
    wire.algorithm_key(NAMESPACE, "compressor"), "topk", choices=compression.NAMES
)
K = Bound(wire.algorithm_key(NAMESPACE, "k"), 1, 1, 2**62)
LEVELS = Bound(wire.algorithm_key(NAMESPACE, "levels"), 16, 1, compression.MAX_LEVELS)
BOUNDS = (COMPRESSOR, K, LEVELS)


def _entries(run: LocalRun) -> dict[str, np.ndarray]:
    return {
        k: v.detach().cpu().numpy()
        for k, v in run.model.state_dict().items()
        if k not in run.personal
    }


class EF21Uplink(Hook):
    """Reply with ``C(v_i - g_i)`` (compressed); keep ``g_i`` in client state.

    Parameters
    ----------
    compressor : tasks.compression.Compressor
        A contractive compressor; the server decodes with the same one.

    """

    def __init__(self, compressor: compression.Compressor) -> None:
        self.compressor = compressor
        self._start: dict[str, np.ndarray] = {}

    def setup(self, run: LocalRun) -> None:
        self._start = {k: np.array(v, copy=True) for k, v in _entries(run).items()}

    def finish(self, run: LocalRun) -> None:
        end = _entries(run)
        keys = compression.compressed_keys(end)
        v = compression.flatten(end, keys) - compression.flatten(self._start, keys)
        saved = (load_arrays(run.state, NAMESPACE, "g") or {}).get("g")
        g = saved if saved is not None and saved.shape == v.shape else np.zeros_like(v)
        # The node's stream (seeded by seed, round, partition) draws Rand-k / QSGD.
        seed = int(torch.randint(0, 2**62, (1,), generator=run.generator))
        payload = self.compressor.encode(v - g, np.random.default_rng(seed))
        g = g + self.compressor.decode(payload, v.size)
        save_arrays(run.state, NAMESPACE, "g", {"g": g})
        run.reply_records[wire.ARRAYS] = array_record(payload)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the compressed error-feedback reply."""
    made = compression.make_compressor(
        COMPRESSOR.read(config), K.read(config), LEVELS.read(config)
    )
    return [EF21Uplink(compression.contractive(made))]
