"""FedZip client: plain local training, then the update FedZip-compressed.

Malekijoo et al., "FEDZIP: A Compression Framework for Communication-
Efficient Federated Learning", 2021, https://arxiv.org/abs/2102.01593. See
``strategies/fedzip.py``.

After the loop's local training from ``x^t`` to ``y_i``, :class:`FedZipUplink`
replies with the :class:`tasks.compression.FedZip` payload of ``y_i - x^t``
over the shared float entries (state-dict order) instead of the model. No
state. Config keys read: ``fedzip.z``, ``fedzip.clusters``,
``fedzip.iterations``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bouquet.clientapps.bounds import Bound
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.recipes.ef21 import LocalUpdate
from bouquet.clientapps.state import array_record
from bouquet.tasks import compression, wire

NAMESPACE = "fedzip"
Z = Bound(wire.algorithm_key(NAMESPACE, "z"), 0.2, 0.0, 1.0, low_open=True)
CLUSTERS = Bound(wire.algorithm_key(NAMESPACE, "clusters"), 3, 3, 256)
ITERATIONS = Bound(wire.algorithm_key(NAMESPACE, "iterations"), 4, 1, 100)
BOUNDS = (Z, CLUSTERS, ITERATIONS)


class FedZipUplink(LocalUpdate):
    """Reply with ``C(y - x)`` compressed by ``compressor`` (no state)."""

    def __init__(self, compressor: compression.Compressor) -> None:
        self.compressor = compressor

    def finish(self, run: LocalRun) -> None:
        v = self.local_update(run)
        payload = self.compressor.encode(v, np.random.default_rng(0))  # deterministic
        run.reply_records[wire.ARRAYS] = array_record(payload)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the FedZip-compressed update."""
    made = compression.FedZip(
        Z.read(config), CLUSTERS.read(config), ITERATIONS.read(config)
    )
    return [FedZipUplink(made)]
