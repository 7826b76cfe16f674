"""Reply acceptance: every reply is checked against what was sent, decoded once.

:func:`accept` turns a reply into a :class:`ClientReply` (its arrays decoded
once, as read-only views of the bytes that were checked) or into a short
reason why it cannot be used. Aggregation reads only ``ClientReply`` objects,
so what it reads is what was validated (architecture rule 8); a bad reply is
dropped with its reason, never raised, and the round goes on with the rest.

What a reply must carry is a :class:`Contract`, derived by the strategy from
what it sent and what its algorithm declares (reply records, metrics, the
client routine).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from strategies.aggregation import NDArrays, array_view
from tasks import wire

ArraySpec = Mapping[str, tuple[tuple[int, ...], str]]
"""Array name -> (shape, dtype string), in state-dict order."""

MAX_ABS_VALUE = 1e10
"""Largest magnitude a float array in a reply may hold.

Weights, buffers and updates of a trained model stay many orders below this;
a value above it is garbage or an attack, and left in it would overflow the
float32 sums and squared distances of aggregation (Krum squares differences:
``(1e10)^2 * 1e7`` parameters is still ~1e27, far from float32's 3e38).
"""


def array_spec(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> dict:
    """Shapes and dtypes of ``arrays``, the yardstick for replies."""
    return {k: (tuple(a.shape), str(a.dtype)) for k, a in arrays.items()}


@dataclass(frozen=True)
class Contract:
    """What an acceptable reply carries.

    Attributes
    ----------
    arrays : ArraySpec or None
        The ``arrays`` record's entries; None for evaluation replies.
    records : mapping
        Extra ArrayRecords, by name, each with its entries.
    metrics : tuple of str
        Metric keys the reply must report besides the weight.
    routine : str or None
        The client routine the reply must name in its ``client-info``
        record; None accepts any client.
    weight_key : str
        Metric that weights the reply; a positive number.

    """

    arrays: ArraySpec | None = None
    records: Mapping[str, ArraySpec] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    routine: str | None = None
    weight_key: str = wire.NUM_EXAMPLES


@dataclass
class ClientReply:
    """A reply that passed :func:`accept`: what aggregation reads.

    ``arrays`` and ``records`` are read-only views of the reply's bytes.
    """

    node: int
    partition: int | None
    num_examples: float
    metrics: dict[str, Any]
    arrays: NDArrays = field(default_factory=dict)
    records: dict[str, NDArrays] = field(default_factory=dict)
    message: Message | None = field(default=None, repr=False, compare=False)


class RoutineMissingError(ValueError):
    """A reply came from a client that did not run the algorithm's routine."""


def _decode(record: ArrayRecord, spec: ArraySpec, name: str) -> NDArrays | str:
    if list(record.keys()) != list(spec.keys()):
        missing = sorted(set(spec) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(spec))
        return f"record '{name}' keys differ (missing {missing}, extra {extra})"
    out: NDArrays = {}
    for key, array in record.items():
        shape, dtype = spec[key]
        where = f"array '{name}/{key}'"
        if tuple(array.shape) != shape or str(array.dtype) != dtype:
            found = f"{array.dtype}{list(array.shape)}"
            return f"{where} is {found}, expected {dtype}{list(shape)}"
        try:
            values = array_view(array)
        except Exception as err:
            return f"{where} cannot be decoded ({type(err).__name__})"
        # The declared dtype and shape travel apart from the bytes: check both.
        if values.shape != shape or str(values.dtype) != dtype:
            held = f"{values.dtype}{list(values.shape)}"
            return f"{where} holds {held}, declared {dtype}{list(shape)}"
        if values.dtype.kind in "fc" and values.size:
            if values.dtype.kind == "f":
                # max and min propagate NaN and inf: no temporary arrays
                largest = max(abs(float(values.max())), abs(float(values.min())))
            else:
                largest = float(np.abs(values).max())
            if not math.isfinite(largest):
                return f"{where} has non-finite values"
            if largest > MAX_ABS_VALUE:
                return (
                    f"{where} has a value of magnitude {largest:.3g} "
                    f"(limit {MAX_ABS_VALUE:.3g})"
                )
        out[key] = values
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_metrics(record: MetricRecord, contract: Contract) -> str | None:
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        if not all(_is_number(v) and math.isfinite(v) for v in values):
            return f"metric '{key}' is not a finite number"
    weight = record.get(contract.weight_key)
    if weight is None:
        return f"metric '{contract.weight_key}' is missing"
    if isinstance(weight, list) or weight <= 0:
        return f"metric '{contract.weight_key}' must be a positive number"
    if missing := [k for k in contract.metrics if k not in record]:
        return f"metrics {missing} are missing"
    return None


def routine_reason(expected: str, found: object) -> str:
    """Why a reply without the algorithm's client routine is refused."""
    return (
        f"the client did not run the routine '{expected}' (it names {found!r}): "
        "call clientapps.routine.train_client in the ClientApp's train handler, "
        f"which runs the routine the message's config names ('{wire.ROUTINE}')"
    )


def accept(msg: Message, contract: Contract) -> ClientReply | str:
    """The :class:`ClientReply` in ``msg``, or the reason it cannot be used."""
    if msg.has_error():
        return f"error reply ({msg.error.code}): {msg.error.reason}"
    if not msg.has_content():
        return "reply has no content"
    content = msg.content
    if contract.routine is not None:
        info = content.config_records.get(wire.CLIENT_INFO, {})
        ran = info.get(wire.ROUTINE)
        if ran != contract.routine:
            return routine_reason(contract.routine, ran)
    expected = dict(contract.records)
    if contract.arrays is not None:
        expected[wire.ARRAYS] = contract.arrays
    if set(content.array_records) != set(expected):
        return (
            f"array records {sorted(content.array_records)} != "
            f"expected {sorted(expected)}"
        )
    if list(content.metric_records) != [wire.METRICS]:
        return f"expected one metric record '{wire.METRICS}'"
    metrics = content.metric_records[wire.METRICS]
    if reason := _check_metrics(metrics, contract):
        return reason
    if unexpected := set(content.config_records) - {wire.CLIENT_INFO}:
        return f"unexpected config records {sorted(unexpected)}"
    decoded: dict[str, NDArrays] = {}
    for name, spec in expected.items():
        arrays = _decode(content.array_records[name], spec, name)
        if isinstance(arrays, str):
            return arrays
        decoded[name] = arrays
    pid = metrics.get(wire.PARTITION_ID)
    return ClientReply(
        node=int(msg.metadata.src_node_id),
        partition=int(pid) if _is_number(pid) else None,
        num_examples=float(metrics[contract.weight_key]),
        metrics=dict(metrics),
        arrays=decoded.pop(wire.ARRAYS, {}),
        records=decoded,
        message=msg,
    )


def accept_all(
    replies: Iterable[Message],
    contract: Contract,
    recipients: Mapping[str, int] | None = None,
) -> tuple[list[ClientReply], list[str], int]:
    """Accepted replies in a deterministic order, drop reasons, error count.

    Accepted replies are ordered by the ``partition-id`` they report (the same
    in every engine), then node id, so float sums do not depend on arrival
    order. ``recipients`` maps message ids to the node each was sent to: the
    SuperLink answers for a node it found offline with its own id as sender.
    """
    good: list[ClientReply] = []
    reasons: list[str] = []
    errors = 0
    for msg in replies:
        result = accept(msg, contract)
        if isinstance(result, ClientReply):
            good.append(result)
            continue
        errors += msg.has_error()
        node = (recipients or {}).get(
            msg.metadata.reply_to_message_id, msg.metadata.src_node_id
        )
        reasons.append(f"node {node}: {result}")
    good.sort(key=reply_order)
    return good, reasons, errors


def reply_order(reply: ClientReply) -> tuple[float, int]:
    """Sort key: partition id (engine-independent), then node id."""
    return (
        float("inf") if reply.partition is None else float(reply.partition),
        reply.node,
    )


def weighted_metrics(replies: Sequence[ClientReply]) -> MetricRecord:
    """Weighted mean of every scalar metric over the replies that report it.

    Replies may report different keys; the bookkeeping keys (``num-examples``,
    ``partition-id``, ``client-time``) are not averaged, and the result
    carries the total ``num-examples`` instead.
    """
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    num_examples = 0.0
    for reply in replies:
        weight = reply.num_examples
        num_examples += weight
        for key, value in reply.metrics.items():
            if key in wire.BOOKKEEPING_METRICS or isinstance(value, list):
                continue
            sums[key] = sums.get(key, 0.0) + weight * float(value)
            totals[key] = totals.get(key, 0.0) + weight
    result = MetricRecord({k: sums[k] / totals[k] for k in sums})
    result[wire.NUM_EXAMPLES] = num_examples
    return result


NODE_ACCURACY_MEAN = "node-accuracy-mean"
NODE_ACCURACY_WORST = "node-accuracy-worst10"


def node_accuracy(
    replies: Sequence[ClientReply], key: str = wire.EVAL_ACCURACY
) -> dict:
    """Mean and worst-10% accuracy over nodes (each node counts once).

    The worst 10% is the mean over the ``ceil(0.1 n)`` lowest accuracies (at
    least one node): personalised FL reports how the least-served nodes fare,
    which a mean weighted by examples hides.
    """
    values = sorted(
        float(r.metrics[key]) for r in replies if _is_number(r.metrics.get(key))
    )
    if not values:
        return {}
    worst = values[: max(1, math.ceil(0.1 * len(values)))]
    return {
        NODE_ACCURACY_MEAN: sum(values) / len(values),
        NODE_ACCURACY_WORST: sum(worst) / len(worst),
    }
