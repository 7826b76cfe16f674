"""The participation environment: a Grid through which only available nodes train.

``participation_grid(grid, run_config)`` returns ``grid`` itself under the
default ``participation = "uniform"`` (nothing changes), and otherwise a
:class:`ParticipationGrid`: ``get_node_ids()`` is unchanged, but train messages
addressed to nodes that the participation model (``strategies/sampling.py``)
marks unavailable in that round are never delivered, so those nodes never
reply, like offline devices. Strategies see only who replied.

Which node is which client: once, before the first train message, every node
gets a query message (``config["query"] = "data-profile"``) and answers with
its ``partition-id``, ``num-examples`` and ``label-counts`` (the ClientApp's
query handler). The client index is the ``partition-id`` when every node
reports a distinct one (true in the in-process runner, Ray and demo
deployments, so availability is identical across them), else the rank of the
sorted node id. Nodes that appear later are profiled when first addressed.
Evaluate and query messages are always delivered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Message, MessageType
from flwr.serverapp import Grid
from flwr.supercore import log

from bouquet.serverapps.gridview import GridView
from bouquet.serverapps.settings import setting
from bouquet.strategies.profiles import client_indices, query_profiles
from bouquet.strategies.sampling import (
    Availability,
    ParticipationSpec,
    participation_probabilities,
)
from bouquet.tasks import wire


def participation_spec(run_config: Mapping[str, Any]) -> ParticipationSpec:
    """The participation model the run config names (typed and checked)."""
    return ParticipationSpec(
        model=setting(run_config, "participation"),
        mean=setting(run_config, "participation-mean"),
        minimum=setting(run_config, "participation-min"),
        alpha=setting(run_config, "participation-alpha"),
        link=setting(run_config, "participation-link"),
        cycle=setting(run_config, "participation-cycle"),
        markov_active=setting(run_config, "participation-markov-active"),
    )


def participation_grid(grid: Grid, run_config: Mapping[str, Any]) -> Grid:
    """``grid`` wrapped by the run's participation model (unchanged if uniform)."""
    spec = participation_spec(run_config)
    if spec.model == "uniform":
        return grid
    return ParticipationGrid(  # type: ignore[return-value]
        grid,
        spec,
        seed=setting(run_config, "seed"),
        timeout=setting(run_config, "round-timeout"),
    )


def _is_train(message: Message) -> bool:
    return str(message.metadata.message_type).split(".")[0] == MessageType.TRAIN


def _round_of(msg: Message) -> int:
    config = msg.content.config_records.get(wire.CONFIG, {})
    if wire.SERVER_ROUND in config:
        return int(config[wire.SERVER_ROUND])
    return int(msg.metadata.group_id)


class ParticipationGrid(GridView):
    """A Grid view that delivers train messages only to available nodes.

    Parameters
    ----------
    grid : Grid
        The real grid (in-process, Ray simulation or SuperLink).
    spec : ParticipationSpec
        The participation model.
    seed : int
        The run seed (availability derives from ``(seed, round, index)``).
    timeout : float
        Seconds to wait for the nodes' data profiles.

    """

    def __init__(
        self, grid: Grid, spec: ParticipationSpec, seed: int, timeout: float = 3600
    ) -> None:
        super().__init__(grid)
        self.spec = spec
        self.seed = int(seed)
        self.timeout = timeout
        self.profiles: dict[int, dict[str, Any]] = {}
        self.index: dict[int, int] = {}
        self.availability: Availability | None = None
        self.available_counts: dict[int, int] = {}
        """Round -> number of addressed nodes that were available (diagnostics)."""

    # ----------------------------------------------------------- profiles --
    def _profile(self, node_ids: Iterable[int]) -> None:
        missing = sorted(set(node_ids) - set(self.profiles))
        if not missing:
            return
        answered = query_profiles(self._grid, missing, self.timeout, "participation")
        if not answered and not any(self.profiles.values()):
            raise RuntimeError(
                f"No node described its data (asked {missing}): non-uniform "
                "participation needs the ClientApp's query handler, "
                "@app.query() calling clientapps.routine.describe_client, as "
                "clientapps/app.py has."
            )
        # One node that did not describe its data is treated as having none
        # (and is not asked again): it cannot stop the run.
        self.profiles.update({n: answered.get(n, {}) for n in missing})
        self._build()

    def _build(self) -> None:
        nodes = sorted(self.profiles)
        self.index = client_indices(self.profiles)
        size = max(self.index.values()) + 1
        by_index = {self.index[n]: self.profiles[n] for n in nodes}
        sizes = [
            float(by_index.get(i, {}).get(wire.NUM_EXAMPLES, 0.0)) for i in range(size)
        ]
        counts = None
        if self.spec.link == "label":
            classes = max(len(p.get(wire.LABEL_COUNTS, [])) for p in by_index.values())
            counts = np.zeros((size, classes))
            for i, profile in by_index.items():
                row = profile.get(wire.LABEL_COUNTS, [])
                counts[i, : len(row)] = row
        p = participation_probabilities(self.spec, self.seed, counts, sizes)
        self.availability = Availability(self.spec, p, self.seed)
        log(
            INFO,
            "Participation '%s': %d clients, mean probability %.3f (min %.3f)",
            self.spec.model,
            len(nodes),
            float(p[list(self.index.values())].mean()),
            float(p[list(self.index.values())].min()),
        )

    # ----------------------------------------------------------- delivery --
    def available(self, server_round: int, node_ids: Iterable[int]) -> set[int]:
        """The nodes among ``node_ids`` that are available in ``server_round``."""
        node_ids = list(node_ids)
        self._profile(node_ids)
        assert self.availability is not None
        mask = self.availability(server_round)
        return {n for n in node_ids if mask[self.index[n]]}

    def outgoing(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        # A round's train messages, and its split-learning exchanges
        # (``train.split``): an unavailable node gets none of them.
        train = [m for m in messages if _is_train(m)]
        if not train:
            return messages
        server_round = _round_of(train[0])
        open_ = self.available(server_round, {m.metadata.dst_node_id for m in train})
        self.available_counts[server_round] = len(open_)
        return [
            m for m in messages if not _is_train(m) or m.metadata.dst_node_id in open_
        ]
