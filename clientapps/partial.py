"""Part of the model on the wire: a node sent some entries, or leading slices.

A routine whose recipe declares ``PARTIAL_ARRAYS = True`` (FedPipe: each node
gets the adapters it trains, cut to its LoRA rank) may be sent a train
message whose ``arrays`` leave out trainable entries or carry an entry's
leading slices only. Before anything reads the message, :func:`expand`
makes it the model's full shapes: an absent entry is zero, a cut one is
zero-padded at the end of every axis (the slices beyond a rank are zero).
The reply carries exactly the entries and shapes that were sent
(:func:`shrink`), so the uplink saves what the downlink saved.

Frozen entries (never sent) and personal ones (the node's own) are left to
:func:`clientapps.routine.load_model` as for any message. A shape that is
not a leading block of the model's entry is refused (``ConfigError``).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
from flwr.app import ArrayRecord
from torch import nn

from bouquet.clientapps.bounds import ConfigError
from bouquet.tasks import wire
from bouquet.tasks.arrays import array_record, array_view


def expand(
    sent: ArrayRecord, model: nn.Module, skip: Collection[str] = ()
) -> ArrayRecord:
    """``sent`` in the model's full shapes: absent entries and pads are zero.

    ``skip``: entries the message leaves out on purpose (frozen, personal).
    """
    own = model.state_dict()
    if unknown := sorted(set(sent.keys()) - set(own)):
        raise ConfigError(wire.ARRAYS, unknown[:3], "entries of this node's model")
    full: dict[str, np.ndarray] = {}
    for name, tensor in own.items():
        if name in skip and name not in sent:
            continue
        shape = tuple(tensor.shape)
        dtype = str(tensor.dtype).removeprefix("torch.")
        values = np.zeros(shape, dtype=dtype)
        if name in sent:
            part = array_view(sent[name])
            if part.ndim != len(shape) or any(
                p > s for p, s in zip(part.shape, shape, strict=True)
            ):
                raise ConfigError(
                    wire.ARRAYS,
                    f"{name}{tuple(part.shape)}",
                    f"a leading block of the model's {shape}",
                )
            values[tuple(slice(0, n) for n in part.shape)] = part
        full[name] = values
    return array_record(full)


def shrink(reply: ArrayRecord, sent: ArrayRecord) -> ArrayRecord:
    """The reply's entries cut to the entries and shapes ``sent`` had."""
    cut = {}
    for name in sent.keys():
        shape = tuple(sent[name].shape)
        cut[name] = array_view(reply[name])[tuple(slice(0, n) for n in shape)]
    return array_record(cut)
