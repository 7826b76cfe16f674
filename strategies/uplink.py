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

- Only algorithms whose clients run the ``plain`` routine with rounds
  (FedAvg, FedAvgM, FedAdam, FedMedian, Krum, ...) are supported in this
  increment: their reply is the model. Recipes that reply with something
  else (a gradient, a delta, control variates) are refused with a message;
  EF21 (``strategies/ef21.py``) compresses its own uplink.
- Simulated attacks that rewrite the reply's model (``sign-flip``,
  ``gaussian``, ``random``, ``unreliable``) are refused with a compressed
  uplink (``serverapps/run.py``); ``label-flip`` only changes training.
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
    if strategy.routine != wire.PLAIN_ROUTINE or strategy.schedule != "rounds":
        raise ValueError(
            f"compressor: '{compressor}' applies to algorithms whose clients run "
            f"plain local training in rounds; {strategy.name or 'this strategy'} "
            f"runs the routine '{strategy.routine}' ({strategy.schedule})."
        )
    strategy.uplink = compression.contractive(made) if error_feedback else made
    strategy.extra_config = {
        **strategy.extra_config,
        wire.UPLINK_COMPRESSOR: compressor,
        wire.UPLINK_K: int(k),
        wire.UPLINK_LEVELS: int(levels),
        wire.UPLINK_ERROR_FEEDBACK: bool(error_feedback),
    }
    return strategy
