"""Compressed uplink for any algorithm whose clients reply with their model.

Issue #22 ("compression for every algorithm"): with the run-config keys
``compressor`` (``none`` | ``identity`` | ``topk`` | ``randk`` | ``sign`` |
``qsgd`` | ``quantize``), ``compressor-k``, ``compressor-levels`` and
``error-feedback``, e.g. ::

    flwr run . --run-config "algorithm='fedavg' compressor='topk' compressor-k=500"

each train message asks the client for ``C(y - x)`` instead of its model
``y`` (``clientapps/uplink.py``); the reply's ``arrays`` record is the
compressor's payload (:mod:`tasks.compression`: indices and values, codes and
a scale, packed signs), so the serialised message is smaller, and the
strategy decodes it once, at acceptance, into the model ``x + C(y - x)``
(:meth:`~strategies.base.BouquetStrategy.reply_codec`). The algorithm's
aggregation is unchanged.

Decisions where the spec was open:

- Algorithms whose train reply's ``arrays`` are the local model
  (``reply_arrays = "model"``: every ``plain`` routine, FedAvg, FedAvgM,
  FedAdam, FedMedian, Krum, ...; FedLD; the SCAFFOLD / momentum family)
  send ``C(y - x)``; those whose ``arrays`` are the update
  (``reply_arrays = "update"``: the asynchronous FedAsync, FedBuff, FedFix,
  FedCompass, routine ``delta``) send ``C(Delta)``, which the server
  decodes as the update itself (asynchronous replies are decoded as they
  arrive, ``strategies/events.py``). Others (a gradient, EF21's own
  compressed ``c_i``, a role-dependent reply) are refused with a message.
  The config key ``uplink.reply`` tells clients which of the two to expect;
  a client whose routine does otherwise fails the call.
- Every extra record shaped like the model is compressed too
  (:meth:`~strategies.base.BouquetStrategy.compressed_records`; today
  SCAFFOLD's control-variate change ``momentum.dc``, also in SCAFFOLD-M and
  the -VR variants), so the whole reply shrinks by the declared ratio. A
  record is a difference, sent as ``C(r)`` (no reference point) and decoded
  with integer entries zero; with error feedback each record keeps its own
  error (``bouquet.uplink-error.<record>``). What this changes in SCAFFOLD:
  the server's ``c`` moves by the mean of ``C(dc_i)`` while node ``i`` keeps
  its exact ``c_i``, so ``c = mean_i c_i`` (option II's invariant) holds only
  up to the compression: in expectation for an unbiased compressor without
  error feedback, and up to ``-mean_i e_i`` (the errors not yet sent, bounded
  for a contractive compressor) with error feedback, where the sum of what
  a node sent equals the sum of its ``dc`` minus its current error. A
  biased compressor without error feedback (Top-k alone) drops the rest of
  ``dc`` for good: prefer ``error-feedback = true`` with SCAFFOLD.
- Simulated attacks compose with it: an attacker's model (``sign-flip``,
  ``gaussian``, ``random``, ``alie``, ``unreliable``) is what the client
  encodes (``train_client``'s ``poison``, before compression), as a real
  attacker would send its crafted update compressed. The server-side attacks
  (``alie-omniscient``, ``min-max``: crafted from decoded models) and FRL's
  ``rank-reversal`` are refused with a compressed uplink
  (``serverapps/run.py``).
- Integer entries (BatchNorm's ``num_batches_tracked``) are not sent and
  keep the server's value; float entries are compressed as one flat vector.
- Without error feedback a compressor is used as declared (Rand-k and QSGD
  unbiased, so FedAvg's mean stays unbiased); with error feedback, unbiased
  compressors are scaled by ``1/(omega + 1)`` to be contractive, as error
  feedback needs.
"""

from __future__ import annotations

from bouquet.strategies.base import BouquetStrategy
from bouquet.tasks import compression, wire

NONE = "none"
CHOICES = (NONE, *compression.NAMES)


def compress_uplink(
    strategy: BouquetStrategy,
    compressor: str,
    k: int = 1,
    levels: int = 16,
    error_feedback: bool = False,
) -> BouquetStrategy:
    """Make ``strategy``'s clients send ``C(y - x)``; returns ``strategy``.

    Raises
    ------
    ValueError
        The compressor is unknown, or the algorithm's clients do not reply
        with their model (their routine is not ``plain``, or the schedule is
        asynchronous).

    """
    if compressor == NONE:
        strategy.uplink = None
        return strategy
    made = compression.make_compressor(compressor, k, levels)
    kind = reply_kind(strategy)
    if kind is None:
        raise ValueError(
            f"compressor: '{compressor}' applies to algorithms whose clients reply "
            f"with their model or their update; {strategy.name or 'this strategy'} "
            f"runs the routine '{strategy.routine}', whose reply is neither."
        )
    strategy.uplink = compression.contractive(made) if error_feedback else made
    strategy.extra_config = {
        **strategy.extra_config,
        wire.UPLINK_COMPRESSOR: compressor,
        wire.UPLINK_K: int(k),
        wire.UPLINK_LEVELS: int(levels),
        wire.UPLINK_ERROR_FEEDBACK: bool(error_feedback),
        wire.UPLINK_REPLY: kind,
    }
    return strategy


def reply_kind(strategy: BouquetStrategy) -> str | None:
    """``"model"``, ``"update"`` or None: what ``strategy``'s replies' arrays are."""
    if strategy.reply_arrays is not None:
        return strategy.reply_arrays
    return "model" if strategy.routine == wire.PLAIN_ROUTINE else None
