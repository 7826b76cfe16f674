"""Reply acceptance: every reply is checked against what was sent, decoded once.

:func:`accept` turns a reply into a :class:`ClientReply` (its arrays decoded
once, as read-only views of the bytes that were checked) or into a short
reason why it cannot be used. Aggregation reads only ``ClientReply`` objects,
so what it reads is what was validated (architecture rule 8); a bad reply is
dropped with its reason, never raised, and the round goes on with the rest.

What a reply must carry is a :class:`Contract`, derived by the strategy from
what it sent and what its algorithm declares (reply records, metrics, the
client routine). Clients are not trusted (``docs/deploy.md``, "Threat
model"); acceptance is the one place that decides what of a reply reaches
the server's arithmetic:

- **matched**: a reply answers a message this driver sent and that is not
  answered yet, comes from the node it was sent to and is of the type sent;
- **arrays**: each entry's bytes are decoded once (NumPy ``.npy``, nothing
  else) and the decoded dtype, shape and byte count must be what was sent;
  the declared size is checked before anything is read, values must be
  finite and at most :data:`MAX_ABS_VALUE` in magnitude;
- **metrics**: the weight (``num-examples``) is a positive integer of at
  most ``max_weight``; ``partition-id`` a non-negative integer of at most
  :data:`MAX_PARTITION_ID`; declared metrics finite and in their declared
  range. Any other key is only reported, so a bad value there (a string, a
  NaN, a list) is ignored, never fatal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.constant import SType

from bouquet.strategies.aggregation import NDArrays, npy_view
from bouquet.tasks import wire
from bouquet.tasks.params import Range

ArraySpec = Mapping[str, tuple[tuple[int, ...], str]]
"""Array name -> (shape, dtype string), in state-dict order."""

MAX_ABS_VALUE = 1e10
"""Largest magnitude a float array in a reply may hold.

Weights, buffers and updates of a trained model stay many orders below this;
a value above it is garbage or an attack, and left in it would overflow the
float32 sums and squared distances of aggregation (Krum squares differences:
``(1e10)^2 * 1e7`` parameters is still ~1e27, far from float32's 3e38).
"""


MAX_NUM_EXAMPLES = 10**9
"""Default cap on a reply's ``num-examples`` (run-config ``max-num-examples``).

Weights are what a client claims: without a cap, two claims of 1e308 make the
weight sum infinite and the global model zero. A claim under the cap still
buys its share of the mean (see the threat model in ``docs/deploy.md``).
"""

MAX_PARTITION_ID = 10**6
"""Largest ``partition-id`` a reply or data profile may report.

Partition ids index per-client tables; the cap keeps a forged id from
allocating gigabytes.
"""

METRIC_LIMIT = 1e30
"""Largest magnitude of a reported metric: weighted sums of metrics stay finite."""

MAX_METRIC_LIST = 100_000
"""Longest list a metric may hold (e.g. label counts)."""

MAX_CLIENT_TIME = 1e7
"""Longest ``client-time`` (seconds) a reply may report; others are ignored."""


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
        Metric that weights the reply; a positive number (an integer for
        ``num-examples``).
    max_weight : float
        Largest weight a reply may claim.
    metric_ranges : mapping
        Valid ranges of declared metrics (a value in any of them is valid); a
        declared metric without one must be a finite number of magnitude at
        most :data:`METRIC_LIMIT`.
    node_arrays : mapping
        Node id -> the ``arrays`` entries that node's reply carries, where it
        was sent part of the model (FedPipe's rank slices); every other node's
        reply carries ``arrays``.

    """

    arrays: ArraySpec | None = None
    records: Mapping[str, ArraySpec] = field(default_factory=dict)
    metrics: tuple[str, ...] = ()
    routine: str | None = None
    weight_key: str = wire.NUM_EXAMPLES
    max_weight: float = MAX_NUM_EXAMPLES
    metric_ranges: Mapping[str, tuple[Range, ...]] = field(default_factory=dict)
    node_arrays: Mapping[int, ArraySpec] = field(default_factory=dict)


@dataclass(frozen=True)
class Sent:
    """What a reply must answer: the node a message went to and its type."""

    node: int
    message_type: str

    @classmethod
    def of(cls, messages: Iterable[Message]) -> dict[str, Sent]:
        """``message id -> Sent`` for ``messages`` (as pushed)."""
        return {
            m.metadata.message_id: cls(
                int(m.metadata.dst_node_id), str(m.metadata.message_type)
            )
            for m in messages
        }


@dataclass
class ClientReply:
    """A reply that passed :func:`accept`: what aggregation reads.

    ``arrays`` and ``records`` are read-only views of the reply's bytes.
    """

    node: int
    partition: int | None
    num_examples: float
    metrics: dict[str, Any]
    """The reply's metrics that passed the checks (ignored keys left out)."""
    arrays: NDArrays = field(default_factory=dict)
    records: dict[str, NDArrays] = field(default_factory=dict)
    message: Message | None = field(default=None, repr=False, compare=False)


class RoutineMissingError(ValueError):
    """A reply came from a client that did not run the algorithm's routine."""


def decode_array(array: Array, shape: tuple[int, ...], dtype: str) -> np.ndarray | str:
    """The values of ``array`` as a read-only view of its bytes, or why not.

    Only NumPy's ``.npy`` format is read (:func:`~strategies.aggregation.npy_view`:
    versions 1-2, no pickled objects, the byte count checked against the
    header before any value is read), and only when its header states
    ``dtype`` and ``shape``.
    """
    if array.stype != SType.NUMPY or not isinstance(array.data, bytes):
        return f"is serialised as {array.stype!r}, not numpy"
    try:
        values = npy_view(array.data)
    except ValueError as err:
        return f"cannot be decoded ({err})"
    if values.shape != shape or str(values.dtype) != dtype:
        return (
            f"holds {values.dtype}{list(values.shape)}, declared {dtype}{list(shape)}"
        )
    return values


def value_problem(values: np.ndarray, limit: float = MAX_ABS_VALUE) -> str | None:
    """Why ``values`` cannot be used (non-finite, too large), or None."""
    if not values.size or values.dtype.kind not in "fciu":
        return None
    if values.dtype.kind == "c":
        largest = float(np.abs(values).max())
    else:
        # max and min propagate NaN and inf: no temporary arrays
        largest = max(abs(float(values.max())), abs(float(values.min())))
    if not math.isfinite(largest):
        return "has non-finite values"
    if largest > limit:
        return f"has a value of magnitude {largest:.3g} (limit {limit:.3g})"
    return None


def _decode(record: ArrayRecord, spec: ArraySpec, name: str) -> NDArrays | str:
    if list(record.keys()) != list(spec.keys()):
        missing = sorted(set(spec) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(spec))
        return f"record '{name}' keys differ (missing {missing}, extra {extra})"
    out: NDArrays = {}
    for key, array in record.items():
        shape, dtype = spec[key]
        where = f"array '{name}/{key}'"
        # The declared dtype and shape travel apart from the bytes: both are
        # checked, the declared ones first (cheap), then the bytes'.
        if tuple(array.shape) != shape or str(array.dtype) != dtype:
            found = f"{array.dtype}{list(array.shape)}"
            return f"{where} is {found}, expected {dtype}{list(shape)}"
        values = decode_array(array, shape, dtype)
        if isinstance(values, str):
            return f"{where} {values}"
        if problem := value_problem(values):
            return f"{where} {problem}"
        out[key] = values
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: object, limit: float = METRIC_LIMIT) -> bool:
    return _is_number(value) and math.isfinite(value) and abs(value) <= limit


def count(value: object, low: int, high: float) -> int | None:
    """``value`` as an integer in ``[low, high]`` (integral floats too), or None."""
    if not _finite(value, math.inf) or value != int(value):
        return None
    number = int(value)
    return number if low <= number <= high else None


def _usable_metric(value: object) -> bool:
    if isinstance(value, list):
        return len(value) <= MAX_METRIC_LIST and all(_finite(v) for v in value)
    return _finite(value)


def valid_client_time(value: object) -> bool:
    """Whether ``value`` is a usable ``client-time`` (seconds)."""
    return _finite(value, MAX_CLIENT_TIME) and value >= 0


def check_metrics(record: MetricRecord, contract: Contract) -> dict[str, Any] | str:
    """The usable metrics of ``record``, or why the reply is refused.

    The weight, ``partition-id`` and the declared metrics are read by the
    server: a bad value refuses the reply. Every other key is only reported;
    a bad value there is left out.
    """
    weight = record.get(contract.weight_key)
    if weight is None:
        return f"metric '{contract.weight_key}' is missing"
    if contract.weight_key == wire.NUM_EXAMPLES:
        ok = count(weight, 1, contract.max_weight) is not None
        kind = "a positive integer"
    else:
        ok = _finite(weight, contract.max_weight) and weight > 0
        kind = "a positive number"
    if not ok:
        return (
            f"metric '{contract.weight_key}' must be {kind} of at most "
            f"{contract.max_weight:g}; got {_short(weight)}"
        )
    pid = record.get(wire.PARTITION_ID)
    if pid is not None and count(pid, 0, MAX_PARTITION_ID) is None:
        return (
            f"metric '{wire.PARTITION_ID}' must be an integer in "
            f"[0, {MAX_PARTITION_ID}]; got {_short(pid)}"
        )
    for key in contract.metrics:
        value = record.get(key)
        if value is None:
            return f"metric '{key}' is missing"
        valid = contract.metric_ranges.get(key)
        if not _finite(value) or (valid and not any(value in r for r in valid)):
            where = "finite"
            if valid:
                where = "in " + " or ".join(str(r) for r in valid)
            return f"metric '{key}' must be a number {where}; got {_short(value)}"
    return {
        key: value
        for key, value in record.items()
        if (valid_client_time if key == wire.CLIENT_TIME else _usable_metric)(value)
    }


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def routine_reason(expected: str, found: object) -> str:
    """Why a reply without the algorithm's client routine is refused."""
    return (
        f"the client did not run the routine '{expected}' (it names {found!r}): "
        "return bouquet.clientapps.train_client(msg, context, model, data) from "
        "the ClientApp's train handler; it runs the routine the message's config "
        f"names ('{wire.ROUTINE}'; see the README, 'Using a Bouquet strategy in "
        "your own Flower app')"
    )


def accept(
    msg: Message,
    contract: Contract,
    sent: Mapping[str, Sent] | None = None,
    answered: set[str] | None = None,
) -> ClientReply | str:
    """The :class:`ClientReply` in ``msg``, or the reason it cannot be used.

    With ``sent`` (``message id -> Sent``), the reply must answer one of those
    messages, from its recipient, with its type; with ``answered`` (ids
    already answered, updated here) it must be the first answer.
    """
    if sent is not None:
        reply_to = msg.metadata.reply_to_message_id
        expected = sent.get(reply_to)
        if expected is None:
            return "reply to a message that was not sent in this phase"
        if answered is not None:
            if reply_to in answered:
                return "a second reply to the same message"
            answered.add(reply_to)
        if msg.metadata.message_type != expected.message_type:
            return (
                f"a '{msg.metadata.message_type}' reply to a "
                f"'{expected.message_type}' message"
            )
        # The SuperLink answers for a lost node in its own name: only a
        # content reply must come from the recipient.
        if not msg.has_error() and int(msg.metadata.src_node_id) != expected.node:
            return (
                f"sent by node {msg.metadata.src_node_id}, but the message went "
                f"to node {expected.node}"
            )
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
    expected_records = dict(contract.records)
    if contract.arrays is not None:
        node = expected.node if sent is not None else int(msg.metadata.src_node_id)
        expected_records[wire.ARRAYS] = contract.node_arrays.get(node, contract.arrays)
    if set(content.array_records) != set(expected_records):
        return (
            f"array records {sorted(content.array_records)} != "
            f"expected {sorted(expected_records)}"
        )
    if list(content.metric_records) != [wire.METRICS]:
        return f"expected one metric record '{wire.METRICS}'"
    if unexpected := set(content.config_records) - {wire.CLIENT_INFO}:
        return f"unexpected config records {sorted(unexpected)}"
    metrics = check_metrics(content.metric_records[wire.METRICS], contract)
    if isinstance(metrics, str):
        return metrics
    decoded: dict[str, NDArrays] = {}
    for name, spec in expected_records.items():
        arrays = _decode(content.array_records[name], spec, name)
        if isinstance(arrays, str):
            return arrays
        decoded[name] = arrays
    pid = metrics.get(wire.PARTITION_ID)
    return ClientReply(
        node=int(msg.metadata.src_node_id),
        partition=None if pid is None else int(pid),
        num_examples=float(metrics[contract.weight_key]),
        metrics=metrics,
        arrays=decoded.pop(wire.ARRAYS, {}),
        records=decoded,
        message=msg,
    )


def accept_all(
    replies: Iterable[Message],
    contract: Contract,
    sent: Mapping[str, Sent] | None = None,
    answered: set[str] | None = None,
) -> tuple[list[ClientReply], list[str], int]:
    """Accepted replies in a deterministic order, drop reasons, error count.

    Accepted replies are ordered by the ``partition-id`` they report (the same
    in every engine), then node id, so float sums do not depend on arrival
    order. ``sent`` (see :func:`accept`) also names the node a reason is
    about: the SuperLink answers for a node it found offline in its own name.
    A reply is never raised on: whatever it holds, it is accepted or dropped.
    """
    good: list[ClientReply] = []
    reasons: list[str] = []
    errors = 0
    answered = set() if answered is None and sent is not None else answered
    for msg in replies:
        try:
            result = accept(msg, contract, sent, answered)
        except Exception as err:  # a reply never stops the server
            result = f"cannot be read ({type(err).__name__}: {err})"
        if isinstance(result, ClientReply):
            good.append(result)
            continue
        errors += _has_error(msg)
        expected = (sent or {}).get(msg.metadata.reply_to_message_id)
        node = expected.node if expected is not None else msg.metadata.src_node_id
        reasons.append(f"node {node}: {result}")
    good.sort(key=reply_order)
    return good, reasons, errors


def _has_error(msg: Message) -> bool:
    try:
        return bool(msg.has_error())
    except Exception:
        return False


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
    carries the total ``num-examples`` instead. Keys of ``wire.MAX_METRICS``
    (a privacy budget spent) report their largest value.
    """
    sums: dict[str, float] = {}
    totals: dict[str, float] = {}
    largest: dict[str, float] = {}
    num_examples = 0.0
    for reply in replies:
        weight = reply.num_examples
        num_examples += weight
        for key, value in reply.metrics.items():
            if key in wire.BOOKKEEPING_METRICS or isinstance(value, list):
                continue
            if key in wire.MAX_METRICS:
                largest[key] = max(largest.get(key, -math.inf), float(value))
                continue
            sums[key] = sums.get(key, 0.0) + weight * float(value)
            totals[key] = totals.get(key, 0.0) + weight
    result = MetricRecord({k: sums[k] / totals[k] for k in sums})
    result.update(largest)
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
