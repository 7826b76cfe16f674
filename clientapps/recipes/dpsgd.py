"""D-PSGD client: mix with the neighbours' models, then plain local SGD.

Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms?",
NeurIPS 2017, https://arxiv.org/abs/1705.09056 (Algorithm 1). The node's model
is its personal parameters (the server sends ``personal-parameters = "*"``),
so Bouquet's client keeps it in ``Context.state`` between rounds.
:class:`GossipMix` replaces it by ``W_ii x_i + sum_j W_ij x_j`` before the
first step, with ``W_i`` from ``gossip.weights`` and ``x_j`` from the
``gossip.neighbor-<k>`` records, and replies with the trained model as
``gossip.model``. A node that lost its state (its model) but was sent
neighbours starts from ``sum_j W_ij x_j / sum_j W_ij``. Other decentralized
recipes (DFedSAM) compose the same hook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.routine import PERSONAL_STATE
from bouquet.clientapps.state import array_record, has_arrays
from bouquet.tasks import wire

BOUNDS = ()
MAX_NEIGHBORS = 100_000
"""Most neighbour models a node accepts in one message."""


def read_weights(config: Mapping[str, Any]) -> list[float]:
    """``gossip.weights``: finite numbers in [0, 1] summing to 1 (own weight first)."""
    value = config.get(wire.GOSSIP_WEIGHTS, [1.0])
    allowed = f"a list of 1 to {MAX_NEIGHBORS + 1} weights in [0, 1] summing to 1"
    if (
        not isinstance(value, list | tuple)
        or not 1 <= len(value) <= MAX_NEIGHBORS + 1
        or not all(
            isinstance(w, int | float) and not isinstance(w, bool) for w in value
        )
        or not all(math.isfinite(w) and 0.0 <= w <= 1.0 for w in value)
        or abs(math.fsum(value) - 1.0) > 1e-6
    ):
        raise ConfigError(wire.GOSSIP_WEIGHTS, value, allowed)
    return [float(w) for w in value]


def read_train(config: Mapping[str, Any]) -> bool:
    """``gossip.train``: False for a gossip step without local steps."""
    value = config.get(wire.GOSSIP_TRAIN, True)
    if not isinstance(value, bool):
        raise ConfigError(wire.GOSSIP_TRAIN, value, "true or false")
    return value


class GossipMix(Hook):
    """``x_i <- w_0 x_i + sum_k w_k x_(k)`` before training; reply the model after.

    Float entries are mixed in float64 (own model first, then the neighbours
    in record order) and cast back; integer buffers keep the node's value.

    Parameters
    ----------
    weights : sequence of float
        The node's row of the mixing matrix: its own weight, then one per
        relayed neighbour model ``gossip.neighbor-<k>``.
    train : bool
        False: mix only, take no local step (``run.stop``).

    """

    def __init__(self, weights: Sequence[float], train: bool = True) -> None:
        self.train = bool(train)
        self.weights = [float(w) for w in weights]
        self.reads = tuple(wire.gossip_neighbor(k) for k in range(len(weights) - 1))

    def setup(self, run: LocalRun) -> None:
        run.stop = run.stop or not self.train
        # load_model put the node's own model in; a node that lost its state
        # (a restarted SuperNode) has none and rejoins from its neighbours.
        held = has_arrays(run.state, *PERSONAL_STATE)
        sent = len(run.incoming.get(wire.ARRAYS, {})) > 0
        if not self.reads:
            if not held and not sent:
                raise ConfigError(wire.ARRAYS, "empty", "a model", "record")
            return
        weights = self.weights
        if not held and not sent:
            rest = math.fsum(weights[1:])
            if rest <= 0:
                raise ConfigError(wire.GOSSIP_WEIGHTS, weights, "neighbour weight")
            weights = [0.0, *(w / rest for w in weights[1:])]
        entries = run.model.state_dict()
        floats = [k for k, v in entries.items() if v.is_floating_point()]
        neighbors = []
        for name in self.reads:
            record = run.incoming.get(name)
            if record is None:
                raise ConfigError(name, None, "present", "record")
            arrays = {k: np.asarray(a.numpy()) for k, a in record.items()}
            if missing := [k for k in floats if k not in arrays]:
                raise ConfigError(f"{name}[{missing[0]!r}]", None, "present", "record")
            neighbors.append(arrays)
        mixed = {}
        for key in floats:
            total = entries[key].detach().cpu().double() * weights[0]
            for weight, arrays in zip(weights[1:], neighbors, strict=True):
                total += weight * torch.from_numpy(arrays[key].astype(np.float64))
            mixed[key] = total
        mixed = self.after_mix(run, mixed, neighbors, own_weight=weights[0])
        cast = {key: value.to(entries[key].dtype) for key, value in mixed.items()}
        run.model.load_state_dict(cast, strict=False)

    def after_mix(
        self,
        run: LocalRun,
        mixed: dict[str, torch.Tensor],
        neighbors: list[dict[str, np.ndarray]],
        own_weight: float,
    ) -> dict[str, torch.Tensor]:
        """A step on the mixed float entries (float64) before they are loaded.

        ``run.model`` still holds the node's own model, ``neighbors`` are the
        relayed models in record order and ``own_weight`` is ``w_0`` (0 for a
        node that lost its model). Plain gossip returns ``mixed`` unchanged;
        VCMA rescales each layer's variance (``clientapps/recipes/vcma.py``).
        """
        return mixed

    def finish(self, run: LocalRun) -> None:
        run.reply_records[wire.GOSSIP_MODEL] = array_record(run.model.state_dict())


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """Mix with the neighbours, then plain local SGD."""
    return [GossipMix(read_weights(config), read_train(config))]
