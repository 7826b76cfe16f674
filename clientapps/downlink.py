"""The compressed downlink, client half: rebuild ``x_hat_t`` before training.

Where the server's config names ``downlink.compressor``
(``strategies/downlink.py``), a train message brings the model ``x_hat_t``
either dense (``downlink.base`` 0) or as the payload of ``C(x_t - x_hat)``
against the version ``downlink.base`` this node holds; the node keeps its
``x_hat`` and its version in ``Context.state`` (``bouquet.downlink-model``,
``bouquet.downlink-version``), adds the decoded payload exactly as the
server does (:func:`tasks.compression.advance`) and trains from the result.
A node whose stored version is not the payload's base (it missed a round the
server thinks it saw, or lost its state) refuses the message
(:class:`~clientapps.bounds.ConfigError`) instead of training on a wrong
model. The new ``x_hat`` is stored only once training succeeded
(:func:`keep`), so a failed call leaves the node at its old version, which
its error reply tells the server.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from bouquet.clientapps import bounds
from bouquet.clientapps.state import load_arrays, load_values, save_arrays, save_values
from bouquet.tasks import compression, wire
from bouquet.tasks.arrays import array_record

MODEL_STATE = ("bouquet", "downlink-model")
"""Where a node keeps its ``x_hat`` (every entry, in the server's order)."""
VERSION_STATE = ("bouquet", "downlink-version")
"""Where a node keeps the version of its ``x_hat``."""


def received_model(
    content: RecordDict, config: Mapping[str, Any], state: Mapping[str, Any]
) -> dict[str, np.ndarray] | None:
    """The ``x_hat_t`` this train message brings (None: no compressed downlink).

    Raises
    ------
    ConfigError
        The payload's base is not this node's version, or the records do not
        fit the node's ``x_hat`` or the compressor's payload.

    """
    name = bounds.DOWNLINK_COMPRESSOR.read(config)
    if name == "none":
        return None
    bounds.DOWNLINK_VERSION.read(config)
    base = bounds.DOWNLINK_BASE.read(config)
    sent = {k: a.numpy() for k, a in content[wire.ARRAYS].items()}
    if base == 0:
        return sent
    held = (load_values(state, *VERSION_STATE) or {}).get("version")
    stored = load_arrays(state, *MODEL_STATE)
    if stored is None or held != base:
        raise bounds.ConfigError(
            wire.DOWNLINK_BASE,
            base,
            f"this node's model version ({held or 'none'}); send it the dense model",
        )
    keys = compression.compressed_keys(stored)
    rest = {k: v for k, v in stored.items() if k not in keys}
    if list(sent) != list(rest) or any(
        sent[k].shape != v.shape or sent[k].dtype != v.dtype for k, v in rest.items()
    ):
        raise bounds.ConfigError(
            wire.ARRAYS, sorted(sent), f"the uncompressed entries {sorted(rest)}"
        )
    codec = compression.make_compressor(
        name, bounds.DOWNLINK_K.read(config), bounds.DOWNLINK_LEVELS.read(config)
    )
    d = sum(stored[k].size for k in keys)
    payload = _payload(content, codec, d)
    x_hat = compression.advance(stored, keys, codec.decode(payload, d))
    return {k: x_hat[k] if k in x_hat else sent[k] for k in stored}


def _payload(
    content: RecordDict, codec: compression.Compressor, d: int
) -> dict[str, np.ndarray]:
    """The payload record, checked against the compressor's spec."""
    record = content.get(wire.DOWNLINK_PAYLOAD)
    spec = codec.spec(d)
    payload = (
        {k: a.numpy() for k, a in record.items()}
        if isinstance(record, ArrayRecord)
        else {}
    )
    fits = list(payload) == list(spec) and all(
        payload[k].shape == shape
        and payload[k].dtype == np.dtype(dtype)
        and (payload[k].dtype.kind != "f" or np.isfinite(payload[k]).all())
        for k, (shape, dtype) in spec.items()
    )
    problem = codec.problem(payload, d) if fits else "does not fit"
    if problem:
        raise bounds.ConfigError(
            wire.DOWNLINK_PAYLOAD, sorted(payload), f"a payload of {spec} ({problem})"
        )
    return payload


def keep(
    model: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    state: MutableMapping[str, Any],
) -> None:
    """Store ``model`` as this node's ``x_hat`` at the message's version."""
    save_arrays(state, *MODEL_STATE, model)
    save_values(
        state, *VERSION_STATE, {"version": bounds.DOWNLINK_VERSION.read(config)}
    )


def as_record(model: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``model`` as the ``arrays`` record the rest of the routine reads."""
    return array_record(model)
