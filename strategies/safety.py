"""Keeping the server usable: a round that would break the model or state is undone.

Acceptance (:mod:`strategies.validation`) bounds each reply; it cannot bound
what accepted replies add up to. Momentum buffers, second moments, tables of
updates and hypergradient rates grow across rounds, and a run of legal,
adversarial values can push them past any finite limit. The base therefore
takes a :func:`snapshot` of the strategy state before aggregating and puts it
back when :func:`state_problem` finds the new arrays or state unusable.

The snapshot is cheap because strategy state is a value (``docs/architecture.md``,
rule "state as a value"): pieces replace arrays, they never write into them
(FedAU's bookkeeping copies its small arrays before it counts). Containers
are copied; arrays are shared and made read-only, so code that broke the
rule fails loudly instead of silently changing the snapshot. A table of N
client models therefore costs nothing to snapshot, and nothing to re-check:
only arrays that are new since the snapshot are read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bouquet.strategies.validation import MAX_ABS_VALUE, value_problem

STATE_LIMIT = 1e20
"""Largest magnitude any float in the strategy state may reach.

Above the reply bound (:data:`~strategies.validation.MAX_ABS_VALUE`, 1e10),
because state holds squares of updates (Adam's second moment) and sums over
rounds; far below float32's maximum (3.4e38), so sums of it over clients and
rounds cannot overflow.
"""


class Snapshot:
    """A copy of a state that later changes to the original do not reach.

    ``shared`` holds the ids of the arrays the copy shares (read-only): they
    were checked when they entered the state, so a check of the new state
    skips them (a table of N client updates is not re-read each round).
    """

    def __init__(self, state: Any) -> None:
        self.shared: set[int] = set()
        self.value = self._copy(state)

    def _copy(self, value: Any) -> Any:
        if isinstance(value, dict):
            return type(value)((k, self._copy(v)) for k, v in value.items())
        if isinstance(value, list):
            return [self._copy(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self._copy(v) for v in value)
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
            self.shared.add(id(value))
            return value
        if isinstance(value, set):
            return set(value)
        return value


def snapshot(state: Any) -> Snapshot:
    """A :class:`Snapshot` of ``state``."""
    return Snapshot(state)


def state_problem(
    arrays: Mapping[str, np.ndarray], state: Any, before: Snapshot | None = None
) -> str | None:
    """Why the new global ``arrays`` or ``state`` cannot be kept, or None.

    With ``before``, arrays the state still shares with that snapshot are
    not read again.
    """
    for key, values in arrays.items():
        if problem := value_problem(np.asarray(values), MAX_ABS_VALUE):
            return f"the new global array '{key}' {problem}"
    return _state_problem(state, "state", before.shared if before else set())


def _state_problem(value: Any, where: str, known: set[int]) -> str | None:
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    elif isinstance(value, np.ndarray):
        if id(value) in known:
            return None
        if problem := value_problem(value, STATE_LIMIT):
            return f"{where} {problem}"
        return None
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or abs(value) > STATE_LIMIT:
            return f"{where} is {float(value):.3g}"
        return None
    else:
        return None
    for key, item in items:
        if problem := _state_problem(item, f"{where}[{key!r}]", known):
            return problem
    return None
