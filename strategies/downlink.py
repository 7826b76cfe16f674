"""Compressed downlink for any algorithm whose train messages carry the global model.

Issue #22 (the downlink half): with the run-config keys
``downlink-compressor`` (``none`` | ``identity`` | ``topk`` | ``randk`` |
``sign`` | ``qsgd`` | ``quantize`` | ``fedzip``), ``downlink-k`` and
``downlink-levels``, e.g. ::

    flwr run . --run-config "downlink-compressor='topk' downlink-k=500"

the server keeps ``x_hat``, the model every up-to-date node holds, and sends
each train message ``C(x_t - x_hat)`` (the compressor's payload,
:mod:`tasks.compression`: real small dtypes on the wire) instead of the
dense ``x_t``; both halves then set ``x_hat <- x_hat + C(x_t - x_hat)``
(``clientapps/downlink.py``) and the node trains from that ``x_hat_t``. The
compression error stays in ``x_t - x_hat_t`` and is sent in later rounds
(server-side error feedback: Seide et al., "1-Bit Stochastic Gradient
Descent", Interspeech 2014, applied to the broadcast as in Tang et al.,
"DoubleSqueeze", ICML 2019, https://arxiv.org/abs/1905.05957). The uplink is
independent (``strategies/uplink.py``); evaluate messages stay dense.

Wire protocol: every train message's config carries ``downlink.compressor``,
``downlink.k``, ``downlink.levels``, ``downlink.version`` (the version ``t``
of the ``x_hat_t`` it brings) and ``downlink.base``: the version the payload
applies to, in which case ``arrays`` holds only the entries that are not
compressed (integer ones, e.g. BatchNorm's ``num_batches_tracked``, sent
dense) and the record ``downlink.payload`` the payload; or 0, in which case
``arrays`` is the dense ``x_hat_t``. State (``strategy.state["downlink"]``,
checkpointed): ``x_hat`` (the float entries, in their dtypes), ``version``
and ``held`` (node id -> the version a node confirmed by replying).

Decisions where the spec was open:

- A node gets the payload only when it confirmed holding the previous
  version by replying to the previous round's train message; otherwise
  (first round, a node that skipped rounds, failed, or whose reply was an
  error) it gets the dense ``x_hat_t``. A node whose stored version is not
  the payload's base refuses the message (``ConfigError``) rather than train
  on a wrong model; its error reply makes its next message dense.
- What the nodes were sent is ``x_hat_t``: the round context's ``arrays``
  are ``x_hat_t`` while the round aggregates (replies, compressed uplink
  replies included, are read against it, so every combine rule sees the
  nodes' real updates), and the unsent part ``x_t - x_hat_t`` is added back
  to the new global model afterwards: ``x_{t+1} = x_t + (agg - x_hat_t)``.
  A skipped update leaves ``x_t`` as it was.
- Both halves add in float64 and store ``x_hat`` in each entry's own dtype,
  with the same NumPy calls, so their ``x_hat`` are bit-for-bit equal.
- Algorithms that send some nodes their own ``arrays`` (stale models, cluster
  models, pruned models: ``broadcasts_global_model = False``), asynchronous
  and decentralized ones are refused when the strategy is built: there is no
  single global model to track. A subclass that does so anyway fails its
  round with a ``ValueError`` rather than send a wrong model.
- Randomised compressors (Rand-k, QSGD) draw from ``(seed, round,
  "downlink")``; unbiased ones are used as declared (the error feedback is
  the server's, not a contraction requirement here).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from bouquet.strategies.aggregation import to_record
from bouquet.strategies.base import BouquetStrategy, Record
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.tasks import compression, wire
from bouquet.tasks.arrays import array_record

NONE = "none"
STATE = "downlink"


class Downlink:
    """The server half: encodes each train message's model, keeps ``x_hat``."""

    def __init__(self, name: str, k: int, levels: int) -> None:
        self.name, self.k, self.levels = name, int(k), int(levels)
        self.compressor = compression.make_compressor(name, k, levels)

    @staticmethod
    def init() -> dict[str, Any]:
        """State before round 1: no version sent yet."""
        return {"x_hat": {}, "version": 0, "held": {}}

    def plan(
        self,
        strategy: BouquetStrategy,
        ctx: RoundContext,
        plan: Mapping[int, Mapping[str, Record]],
    ) -> dict[int, dict[str, Record]]:
        """Each node's records with the round's model compressed where it can be.

        Advances ``x_hat`` and makes ``ctx.arrays`` the ``x_hat_t`` sent;
        ``ctx.unsent`` is ``x_t - x_hat_t``.
        """
        if own := sorted(n for n, extra in plan.items() if wire.ARRAYS in extra):
            raise ValueError(
                f"downlink-compressor: {strategy.name or 'this strategy'} sends "
                f"node(s) {own[:3]} their own arrays, not the global model."
            )
        state = strategy.state[STATE]
        x = ctx.arrays
        keys = compression.compressed_keys(x)
        held_hat, base = state["x_hat"], int(state["version"])
        payload = None
        if base > 0 and _same_layout(held_hat, x, keys):
            diff = compression.flatten(x, keys) - compression.flatten(held_hat, keys)
            seed = wire.derive_seed(strategy.seed, ctx.server_round, "downlink")
            payload = self.compressor.encode(diff, np.random.default_rng(seed))
            x_hat = compression.advance(
                held_hat, keys, self.compressor.decode(payload, diff.size)
            )
        else:
            x_hat = {k: np.array(x[k], copy=True) for k in keys}
        version = base + 1
        state["x_hat"], state["version"] = x_hat, version
        sent = {k: x_hat.get(k, v) for k, v in x.items()}
        dense = to_record(sent)
        rest = to_record({k: v for k, v in x.items() if k not in x_hat})
        held = state["held"]
        out = {}
        for node, extra in plan.items():
            # A sampled node holds what it confirms by replying (``received``).
            holds = held.pop(str(node), None)
            compressed = payload is not None and holds == base
            config = dict(extra.get(wire.CONFIG, ctx.config))
            config.update(
                {
                    wire.DOWNLINK_COMPRESSOR: self.name,
                    wire.DOWNLINK_K: self.k,
                    wire.DOWNLINK_LEVELS: self.levels,
                    wire.DOWNLINK_VERSION: version,
                    wire.DOWNLINK_BASE: base if compressed else 0,
                }
            )
            records = {**extra, wire.CONFIG: ConfigRecord(config)}
            records[wire.ARRAYS] = rest if compressed else dense
            if compressed:
                records[wire.DOWNLINK_PAYLOAD] = array_record(payload)
            out[node] = records
        ctx.unsent = {k: np.subtract(x[k], x_hat[k], dtype=np.float64) for k in keys}
        ctx.arrays = sent
        return out

    @staticmethod
    def received(strategy: BouquetStrategy, ctx: RoundContext, replies: list) -> None:
        """Nodes that replied without error hold this round's version."""
        state = strategy.state[STATE]
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in ctx.messages}
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id)
            if node is None or node != reply.metadata.src_node_id:
                continue
            if reply.has_error():
                state["held"].pop(str(node), None)
            else:
                state["held"][str(node)] = int(state["version"])

    @staticmethod
    def restore(arrays: NDArrays, ctx: RoundContext) -> NDArrays:
        """The new global model: the aggregate of ``x_hat_t`` plus ``x_t - x_hat_t``."""
        unsent = ctx.unsent or {}
        return {
            k: np.add(v, unsent[k], dtype=np.float64).astype(v.dtype)
            if k in unsent
            else v
            for k, v in arrays.items()
        }


def _same_layout(
    x_hat: Mapping[str, np.ndarray], x: Mapping[str, np.ndarray], keys: list[str]
) -> bool:
    return list(x_hat) == keys and all(
        x_hat[k].shape == x[k].shape and x_hat[k].dtype == x[k].dtype for k in keys
    )


def compress_downlink(
    strategy: BouquetStrategy, compressor: str, k: int = 1, levels: int = 16
) -> BouquetStrategy:
    """Make ``strategy``'s train messages carry ``C(x - x_hat)``; returns it.

    Raises
    ------
    ValueError
        The compressor is unknown, or the algorithm has no single global model
        that every train message carries (asynchronous, decentralized, or no
        global model).

    """
    if compressor == NONE:
        strategy.downlink = None
        strategy.state.pop(STATE, None)
        return strategy
    if (
        strategy.schedule != "rounds"
        or not strategy.global_model
        or not strategy.broadcasts_global_model
        or "*" in strategy.personal
    ):
        raise ValueError(
            f"downlink-compressor: '{compressor}' applies to synchronous algorithms "
            f"that send every node the global model; {strategy.name or 'this'} "
            "does not."
        )
    strategy.downlink = Downlink(compressor, k, levels)
    strategy.state[STATE] = Downlink.init()
    return strategy
