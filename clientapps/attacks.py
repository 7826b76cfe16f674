"""Attack simulation: turn a chosen fraction of nodes into attackers.

Selected by run config, applied on the client around any algorithm's routine
(the strategy does not know who attacks; robust strategies must cope):

=================  ============================================================
``attack``         what an attacking node sends instead of its honest update
=================  ============================================================
``sign-flip``      ``w_g - s * (w - w_g)``: the update reversed and scaled
                   (``s`` = ``attack-scale``, default 4)
``gaussian``       ``w + N(0, s^2)``: additive noise on every float entry
                   (default ``s`` = 1)
``label-flip``     honest training on flipped labels ``y -> C - 1 - y``
``random``         ``w_g + N(0, s^2)``: a random update, no training signal
                   (default ``s`` = 1)
``unreliable``     every round a seeded coin: a stale update (its previous
                   round's local model, kept in ``Context.state``) or a very
                   noisy one (``w + N(0, (3 s)^2)``); honest on its first round
``rank-reversal``  FRL's own attack (Mozaffari et al., 2023): honest training,
                   then every ranking in the ``frl.ranks`` record reversed
                   (``n - 1 - position``: the most important edges last); the
                   model arrays stay honest. Other algorithms: honest
``alie``           "A Little Is Enough" (Baruch et al., NeurIPS 2019): per
                   coordinate ``w_g + mu - z sigma``, ``mu`` the honest update,
                   ``sigma`` its estimated spread, ``z`` from the paper's
                   ``n`` and ``f`` (or ``s`` when ``attack-scale`` is set)
=================  ============================================================

``alie-omniscient`` and ``min-max`` train honestly here: the server crafts the
attackers' replies from the round's honest updates (colluding, omniscient
ALIE and Shejwalkar & Houmansadr's min-max, ``strategies/attacks.py``).

ALIE needs the spread of benign updates, which a node cannot see (there is
no channel between simulated attackers). Each attacker estimates it from its
own honest run: the per-step parameter changes ``d_1..d_S`` have standard
deviation ``sigma_step`` per coordinate (Welford, :class:`StepSpread`), and an
update of ``S`` such steps spreads about ``sqrt(S) sigma_step`` (independent
steps). ``z = Phi^-1((n - s) / n)`` with ``s = floor(n / 2 + 1) - f``, ``n`` the
number of partitions and ``f = round(attack-fraction * n)`` (the paper's
``z_max``); it is 0 (no shift) when ``f`` is too small for the formula.
Parameters only: buffers (BatchNorm statistics) stay honest.

Who attacks: ``round(attack-fraction * num-partitions)`` partitions, picked by
a permutation seeded by ``seed`` alone, so the same nodes attack in every
round and every run with that seed. A node without a ``partition-id`` (a real
device with a ``data-path``) attacks with probability ``attack-fraction``,
drawn from ``(seed, node id)``. Noise is drawn from ``(seed, round,
partition-id)``: runs replay exactly. Only float arrays are changed (integer
buffers such as BatchNorm's step count stay honest), and the reported
``num-examples`` is the node's true count.

Mix-in use: ``attack = attack_for_node(run_config, node_config, node_id,
num_classes)``, pass ``attack.hooks()`` as ``extra_hooks`` to
:func:`clientapps.routine.train_client` and ``attack.poison_model`` (with
``state`` and ``seed`` bound) as its ``poison``: the crafted model is then
what a compressed uplink encodes, so every client-side attack composes with
compression. ``attack.poison`` rewrites a finished reply instead (FRL's
rank reversal acts there).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from flwr.app import Message

from bouquet.clientapps.hooks import Hook, parameter_names
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.recipes.frl import RANKS
from bouquet.clientapps.state import array_record, load_arrays, save_arrays
from bouquet.tasks import wire
from bouquet.tasks.wire import derive_seed

ATTACKS = (
    "none",
    "sign-flip",
    "gaussian",
    "label-flip",
    "random",
    "unreliable",
    "alie",
    "rank-reversal",
    "alie-omniscient",
    "min-max",
)
DEFAULT_SCALE = {"sign-flip": 4.0, "gaussian": 1.0, "random": 1.0, "unreliable": 1.0}
_STATE = ("attack", "previous")
_SPREAD = ("attack", "spread")


def check_attack(kind: str, fraction: float) -> None:
    """Raise ValueError for an unknown attack or a fraction outside [0, 1]."""
    if kind not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}; got {kind!r}.")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"attack-fraction must be in [0, 1]; got {fraction}.")


def attacker_partitions(num_partitions: int, fraction: float, seed: int) -> set[int]:
    """The partitions that attack: ``round(fraction * N)`` of them, seeded."""
    rng = np.random.default_rng(derive_seed(seed, "attackers"))
    count = round(fraction * num_partitions)
    return {int(p) for p in rng.permutation(num_partitions)[:count]}


class LabelFlip(Hook):
    """Train on ``C - 1 - y`` instead of ``y`` (a data-poisoning attack)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)

    def transform_batch(
        self, run: LocalRun, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.num_classes - 1 - y


def reverse_rankings(reply: Message) -> None:
    """Reverse every ranking of the reply's ``frl.ranks`` record, in place."""
    if RANKS not in reply.content:
        return
    ranks = reply.content[RANKS]
    arrays = dict(zip(ranks.keys(), ranks.to_numpy_ndarrays(), strict=True))
    reversed_ = {
        name: (np.asarray(a.size - 1, a.dtype) - a) if a.ndim >= 2 else a
        for name, a in arrays.items()
    }
    reply.content[RANKS] = array_record(reversed_)


def alie_z(num_partitions: int, fraction: float) -> float:
    """ALIE's ``z_max = Phi^-1((n - s) / n)``, ``s = floor(n/2 + 1) - f``; >= 0."""
    n = max(1, int(num_partitions))
    f = round(fraction * n)
    s = n // 2 + 1 - f
    share = (n - s) / n
    if share <= 0.5:
        return 0.0
    return NormalDist().inv_cdf(min(share, 1.0 - 1e-9))


class StepSpread(Hook):
    """Keep ``sqrt(S) * std`` of the per-step parameter changes (for ALIE).

    Welford's running mean and variance over the ``S`` steps, per coordinate,
    saved in the node's state under ``attack.spread`` by parameter name.
    """

    def setup(self, run: LocalRun) -> None:
        self._last = [p.detach().clone() for p in run.parameters]
        self._mean = [torch.zeros_like(p) for p in self._last]
        self._m2 = [torch.zeros_like(p) for p in self._last]
        self._count = 0

    def after_step(self, run: LocalRun) -> None:
        self._count += 1
        with torch.no_grad():
            for i, p in enumerate(run.parameters):
                change = p.detach() - self._last[i]
                shift = change - self._mean[i]
                self._mean[i] += shift / self._count
                self._m2[i] += shift * (change - self._mean[i])
                self._last[i] = p.detach().clone()

    def finish(self, run: LocalRun) -> None:
        steps = max(self._count, 1)
        spread = {
            name: (torch.sqrt(m2 / steps) * steps**0.5).cpu().numpy()
            for name, m2 in zip(parameter_names(run), self._m2, strict=True)
        }
        save_arrays(run.state, *_SPREAD, spread)


@dataclass(frozen=True)
class Attack:
    """What one attacking node does (see the module docstring)."""

    kind: str
    scale: float
    num_classes: int

    def hooks(self) -> list[Hook]:
        """Hooks to add to the algorithm's recipe (label flipping only)."""
        if self.kind == "alie":
            return [StepSpread()]
        return [LabelFlip(self.num_classes)] if self.kind == "label-flip" else []

    def poison(
        self, reply: Message, msg: Message, state: MutableMapping[str, Any], seed: int
    ) -> None:
        """Replace the honest ``arrays`` of ``reply`` with the attack's, in place.

        Parameters
        ----------
        reply, msg : Message
            The honest reply and the train message it answers (global arrays).
        state : MutableMapping
            The node's ``Context.state`` (the unreliable attack keeps its last
            local model there).
        seed : int
            This node's seed for this round (noise is drawn from it).

        """
        if self.kind in ("none", "label-flip", "alie-omniscient", "min-max"):
            return  # the server-side ones are crafted there
        if self.kind == "rank-reversal":
            reverse_rankings(reply)
            return
        record = reply.content[wire.ARRAYS]
        local = {k: record[k].numpy() for k in record.keys()}
        sent = {k: msg.content[wire.ARRAYS][k].numpy() for k in local}
        reply.content[wire.ARRAYS] = array_record(
            self.poison_model(local, sent, state, seed)
        )

    @property
    def rewrites_model(self) -> bool:
        """Whether :meth:`poison_model` changes the model a node sends."""
        return self.kind not in (
            "none",
            "label-flip",
            "alie-omniscient",
            "min-max",
            "rank-reversal",
        )

    def poison_model(
        self,
        local: Mapping[str, np.ndarray],
        sent: Mapping[str, np.ndarray],
        state: MutableMapping[str, Any],
        seed: int,
    ) -> dict[str, np.ndarray]:
        """The attack's model from the honest ``local`` one and the ``sent`` one.

        What :meth:`poison` writes into a reply, on plain arrays: the ClientApp
        calls it inside :func:`clientapps.routine.train_client` (``poison``),
        before a compressed uplink encodes the update, so every attack of this
        module composes with compression.
        """
        if not self.rewrites_model:
            return dict(local)
        names = list(local)
        rng = np.random.default_rng(derive_seed(seed, "attack"))
        previous = load_arrays(state, *_STATE)
        spread = load_arrays(state, *_SPREAD) if self.kind == "alie" else None
        if self.kind == "unreliable":
            save_arrays(state, *_STATE, dict(local))
        poisoned = []
        stale = (
            self.kind == "unreliable" and previous is not None and rng.random() < 0.5
        )
        for name in names:
            w, w_g = local[name], sent[name]
            if w.dtype.kind != "f":
                poisoned.append(w)
                continue
            if stale:
                new = previous[name]
            elif self.kind == "sign-flip":
                new = w_g - self.scale * (w - w_g)
            elif self.kind == "random":
                new = w_g + rng.normal(0.0, self.scale, w.shape)
            elif self.kind == "alie":
                sigma = (spread or {}).get(name)
                new = w if sigma is None else w - self.scale * sigma
            elif self.kind == "gaussian":
                new = w + rng.normal(0.0, self.scale, w.shape)
            elif previous is None:  # unreliable, first round: honest
                new = w
            else:  # unreliable, noisy
                new = w + rng.normal(0.0, 3.0 * self.scale, w.shape)
            poisoned.append(np.asarray(new, dtype=w.dtype))
        return dict(zip(names, poisoned, strict=True))


def attack_for_node(
    run_config: Mapping[str, Any],
    node_config: Mapping[str, Any],
    node_id: int,
    num_classes: int,
) -> Attack | None:
    """This node's attack under the run config, or None for an honest node."""
    kind = str(run_config.get("attack", "none"))
    fraction = float(run_config.get("attack-fraction", 0.0))
    check_attack(kind, fraction)
    if kind == "none" or fraction == 0.0:
        return None
    seed = int(run_config.get("seed", 0))
    if wire.PARTITION_ID in node_config:
        partition = int(node_config[wire.PARTITION_ID])
        total = int(node_config.get("num-partitions", partition + 1))
        attacks = partition in attacker_partitions(total, fraction, seed)
    else:
        draw = np.random.default_rng(derive_seed(seed, "attacker", node_id)).random()
        attacks = draw < fraction
    if not attacks:
        return None
    scale = float(run_config.get("attack-scale", 0.0))
    if not scale and kind == "alie":
        scale = alie_z(int(node_config.get("num-partitions", 1)), fraction)
    elif not scale:
        scale = DEFAULT_SCALE.get(kind, 1.0)
    return Attack(kind, scale, num_classes)
