"""Reply validation: a reply is checked against what the strategy sent.

Every check returns ``None`` for a good reply or a short reason for a bad one;
the base strategy drops bad replies with that reason logged, and the round
goes on with the rest (DESIGN section 3).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from strategies import keys
from strategies.aggregation import array_view

ArraySpec = Mapping[str, tuple[tuple[int, ...], str]]
"""Array name -> (shape, dtype string), in state-dict order."""

MAX_ABS_VALUE = 1e10
"""Largest magnitude a float array in a reply may hold.

Weights, buffers and updates of a trained model stay many orders below this;
a value above it is garbage or an attack, and left in it would overflow the
float32 sums and squared distances of aggregation (Krum squares differences:
``(1e10)^2 * 1e7`` parameters is still ~1e27, far from float32's 3e38).
"""


def array_spec(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and dtypes of ``arrays``, the yardstick for replies."""
    return {k: (tuple(a.shape), str(a.dtype)) for k, a in arrays.items()}


def _check_arrays(
    record: ArrayRecord, spec: ArraySpec, name: str, max_abs: float
) -> str | None:
    if list(record.keys()) != list(spec.keys()):
        missing = sorted(set(spec) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(spec))
        return f"record '{name}' keys differ (missing {missing}, extra {extra})"
    for key, array in record.items():
        shape, dtype = spec[key]
        if tuple(array.shape) != shape or str(array.dtype) != dtype:
            return (
                f"array '{name}/{key}' is {array.dtype}{list(array.shape)}, "
                f"expected {dtype}{list(shape)}"
            )
        values = array_view(array)
        if values.dtype.kind in "fc" and values.size:
            if values.dtype.kind == "f":
                # max and min propagate NaN and inf: no temporary arrays
                largest = max(abs(float(values.max())), abs(float(values.min())))
            else:
                largest = float(np.abs(values).max())
            if not math.isfinite(largest):
                return f"array '{name}/{key}' has non-finite values"
            if largest > max_abs:
                return (
                    f"array '{name}/{key}' has a value of magnitude {largest:.3g} "
                    f"(limit {max_abs:.3g})"
                )
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_metrics(record: MetricRecord, weight_key: str) -> str | None:
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        if not all(_is_number(v) and math.isfinite(v) for v in values):
            return f"metric '{key}' is not a finite number"
    weight = record.get(weight_key)
    if weight is None:
        return f"metric '{weight_key}' is missing"
    if isinstance(weight, list) or weight <= 0:
        return f"metric '{weight_key}' must be a positive number"
    return None


def check_reply(
    msg: Message,
    *,
    array_records: Mapping[str, ArraySpec],
    weight_key: str = keys.NUM_EXAMPLES,
    config_records: Collection[str] = (),
    max_abs: float = MAX_ABS_VALUE,
) -> str | None:
    """Return why ``msg`` cannot be aggregated, or ``None`` if it can.

    Parameters
    ----------
    msg : Message
        A reply from a node.
    array_records : Mapping[str, ArraySpec]
        The ArrayRecords the reply must carry, each with its expected arrays.
        Empty for evaluation replies.
    weight_key : str
        Metric that weights the reply; must be a positive number.
    config_records : Collection[str]
        ConfigRecords the reply may carry besides its arrays and metrics.
    max_abs : float
        Largest magnitude allowed in a float array (see ``MAX_ABS_VALUE``).

    """
    if msg.has_error():
        return f"error reply ({msg.error.code}): {msg.error.reason}"
    if not msg.has_content():
        return "reply has no content"
    content = msg.content
    if set(content.array_records) != set(array_records):
        return (
            f"array records {sorted(content.array_records)} != "
            f"expected {sorted(array_records)}"
        )
    for name, spec in array_records.items():
        record = content.array_records[name]
        if reason := _check_arrays(record, spec, name, max_abs):
            return reason
    if list(content.metric_records) != [keys.METRICS]:
        return f"expected one metric record '{keys.METRICS}'"
    if reason := _check_metrics(content.metric_records[keys.METRICS], weight_key):
        return reason
    if unexpected := set(content.config_records) - set(config_records):
        return f"unexpected config records {sorted(unexpected)}"
    return None
