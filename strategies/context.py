"""What a round knows, passed explicitly to everything that needs it.

``configure_train`` builds one :class:`RoundContext` from what it samples and
sends; aggregation, the aggregation pieces (:mod:`strategies.pieces`) and the
driver read it from there, never from attributes a strategy set on itself in
another method (``docs/architecture.md``, "The round context").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NDArrays = dict[str, np.ndarray]


@dataclass
class Outcome:
    """What became of a phase's replies (filled by acceptance and aggregation)."""

    accepted: int = 0
    dropped: list[str] = field(default_factory=list)
    """``"node N: reason"`` for every reply that was not used."""
    errors: int = 0
    """Of the dropped replies, those that were Flower error replies."""
    update_skipped: bool = False
    """Too few replies were accepted, or the update was refused: the global
    arrays were left as they were."""
    refused: str = ""
    """Why the update was refused (it would have left the model or the state
    non-finite or out of bounds); empty otherwise."""


@dataclass
class RoundContext:
    """One phase of one round, as the strategy configured it.

    Attributes
    ----------
    server_round : int
        The round (for an asynchronous run: the task's serial number).
    num_rounds : int or None
        The run's length, when the driver knows it (``num-server-rounds`` in
        the train config); None under a caller that does not say.
    phase : str
        ``"train"`` or ``"evaluate"``.
    nodes : tuple of int
        The connected nodes the sample was drawn from (the population N).
    sampled : tuple of int
        The nodes that were sent a message.
    arrays : dict of np.ndarray
        The global arrays sent (read-only views, state-dict order).
    config : mapping
        The config record sent (shared part, before per-node changes).
    caller_config : mapping
        The config the caller passed in (the run's settings, before this
        strategy's values: e.g. the initial ``lr`` a schedule starts from).
    seed : int
        The run seed.
    personal : tuple of str
        Entries of ``arrays`` that never leave the nodes (resolved from the
        strategy's ``personal`` patterns): replies omit them.
    per_node : dict
        What individual nodes were told beyond the shared content (a role,
        the version of a stale model), by node id.
    outcome : Outcome
        Filled when the replies come back.
    messages : list of Message
        The messages sent: replies must answer one of them, from its recipient.
    answered : set of str
        Ids of the messages answered so far (a second answer is refused).
    unsent : dict, optional
        ``x - x_hat``: the part of the global model a compressed downlink did
        not send (``strategies/downlink.py``); ``arrays`` is then ``x_hat``.

    """

    server_round: int
    num_rounds: int | None
    phase: str
    nodes: tuple[int, ...]
    sampled: tuple[int, ...]
    arrays: NDArrays
    config: Mapping[str, Any]
    seed: int = 0
    caller_config: Mapping[str, Any] = field(default_factory=dict)
    personal: tuple[str, ...] = ()
    per_node: dict[int, dict[str, Any]] = field(default_factory=dict)
    outcome: Outcome = field(default_factory=Outcome)
    messages: list[Any] = field(default_factory=list, repr=False)
    answered: set[str] = field(default_factory=set, repr=False)
    unsent: NDArrays | None = field(default=None, repr=False)

    @property
    def population(self) -> int:
        """N: the number of connected nodes (at least the number sampled)."""
        return max(len(self.nodes), len(self.sampled))

    @property
    def shared(self) -> list[str]:
        """The entries replies carry: every array sent but the personal ones."""
        return [k for k in self.arrays if k not in self.personal]
