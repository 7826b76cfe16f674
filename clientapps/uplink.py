"""The compressed uplink of any plain client: the reply carries ``C(y - x)``.

Where the server's config names ``uplink.compressor`` (``strategies/uplink.py``),
:func:`train_client` replaces the reply's dense model by the compressor's
payload (:mod:`tasks.compression`) of the update ``y - x`` over the shared
float entries, flattened in state-dict order; the server decodes it once and
reads the reply as the model ``x + C(y - x)``. With ``uplink.error-feedback``
the node adds its last compression error ``e`` to the update first and keeps
the new one, ``e <- (y - x + e) - C(y - x + e)`` (Seide et al., "1-Bit
Stochastic Gradient Descent", Interspeech 2014; Stich, Cordonnier, Jaggi,
"Sparsified SGD with Memory", NeurIPS 2018, https://arxiv.org/abs/1809.07599),
in ``Context.state`` under ``bouquet.uplink-error``.

Extra records the config names in ``uplink.records`` (the model-shaped ones,
SCAFFOLD's control-variate change ``dc``) are compressed too, each as ``C(r)``
with its own error ``bouquet.uplink-error.<record>``
(:func:`compress_records`).

With ``uplink.reply = "update"`` (the asynchronous ``delta`` routine) the
routine's reply already is the update ``Delta``: the node sends ``C(Delta)``
(``compress_reply`` with ``sent = None``). A routine whose reply is not what
``uplink.reply`` names fails the call after training (``clientapps/routine.py``;
the server never asks for that, ``strategies/uplink.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from bouquet.clientapps import bounds
from bouquet.clientapps.state import array_record, load_arrays, save_arrays
from bouquet.tasks import compression, wire

ERROR_STATE = ("bouquet", "uplink-error")
"""Where a node keeps its compression error in ``Context.state``."""


def error_state(record: str) -> tuple[str, str]:
    """Where a node keeps the compression error of ``record`` in ``Context.state``."""
    if record == wire.ARRAYS:
        return ERROR_STATE
    return ERROR_STATE[0], f"{ERROR_STATE[1]}.{record}"


def record_names(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The extra records the config asks to compress (``uplink.records``)."""
    names = bounds.UPLINK_RECORDS.read(config)
    return tuple(name for name in names.split(",") if name)


def compress_records(
    records: MutableMapping[str, ArrayRecord],
    config: Mapping[str, Any],
    state: MutableMapping[str, Any],
    seed: int,
) -> None:
    """Replace each extra record ``uplink.records`` names by the payload of ``C(r)``.

    Each record is a difference (SCAFFOLD's ``dc``), compressed as it is, with
    its own error feedback state (:func:`error_state`) and random draws.

    Raises
    ------
    ConfigError
        The config names a record the routine did not produce.

    """
    for name in record_names(config):
        if name not in records or name == wire.ARRAYS:
            raise bounds.ConfigError(
                wire.UPLINK_RECORDS,
                config[wire.UPLINK_RECORDS],
                f"records this routine replies with ({sorted(records)})",
            )
        entries = {k: a.numpy() for k, a in records[name].items()}
        records[name] = compress_reply(entries, None, config, state, seed, name)


def codec(config: Mapping[str, Any]) -> compression.Compressor | None:
    """The uplink compressor the config names (None: dense replies).

    With error feedback an unbiased compressor is scaled to be contractive,
    as the server does (``strategies/uplink.py``).
    """
    name = bounds.UPLINK_COMPRESSOR.read(config)
    if name == "none":
        return None
    made = compression.make_compressor(
        name, bounds.UPLINK_K.read(config), bounds.UPLINK_LEVELS.read(config)
    )
    if bounds.UPLINK_ERROR_FEEDBACK.read(config):
        return compression.contractive(made)
    return made


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


def compress_reply(
    entries: Mapping[str, Any],
    sent: ArrayRecord | None,
    config: Mapping[str, Any],
    state: MutableMapping[str, Any],
    seed: int,
    record: str = wire.ARRAYS,
) -> ArrayRecord:
    """The payload of ``C(y - x)``: ``entries`` (``y``) against ``sent`` (``x``).

    ``sent`` None: ``entries`` is already the update (the ``delta`` routine's
    ``Delta``, an extra record's difference). ``seed`` draws the randomised
    compressors (Rand-k, QSGD), ``record`` names the reply record (its own
    error feedback and draws).
    """
    compressor = codec(config)
    local = {k: _numpy(v) for k, v in entries.items()}
    keys = compression.compressed_keys(local)
    update = compression.flatten(local, keys)
    if sent is not None:
        update = update - compression.flatten({k: sent[k].numpy() for k in keys}, keys)
    feedback = bounds.UPLINK_ERROR_FEEDBACK.read(config)
    if feedback:
        error = (load_arrays(state, *error_state(record)) or {}).get("e")
        if error is not None and error.shape == update.shape:
            update = update + error
    stream = "uplink" if record == wire.ARRAYS else f"uplink.{record}"
    rng = np.random.default_rng(wire.derive_seed(seed, stream))
    payload = compressor.encode(update, rng)
    if feedback:
        error = update - compressor.decode(payload, update.size)
        save_arrays(state, *error_state(record), {"e": error})
    return array_record(payload)
