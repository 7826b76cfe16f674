"""Omniscient attacks: the server-side half of ALIE and min-max (issue #23).

The client-side attacks (``clientapps/attacks.py``) see one node's training
only. The adaptive attacks of the papers assume colluding attackers that know
the benign updates of the round; a simulation gets that by crafting the
attackers' replies on the server, after acceptance and before aggregation,
from the honest updates of every accepted reply (the attackers train
honestly: with ``attack = "alie-omniscient"`` or ``"min-max"`` their client
does nothing else). Every attacker sends the same crafted update, as in both
papers.

=====================  =====================================================
``alie-omniscient``    Baruch, Baruch, Goldberg, "A Little Is Enough:
                       Circumventing Defenses For Distributed Learning",
                       NeurIPS 2019, https://arxiv.org/abs/1902.06156:
                       ``mu - z sigma`` per coordinate, ``mu`` and ``sigma``
                       the mean and standard deviation of the round's honest
                       updates, ``z`` the paper's ``z_max`` from ``n`` and
                       ``f`` (or ``attack-scale``)
``min-max``            Shejwalkar, Houmansadr, "Manipulating the Byzantine:
                       Optimizing Model Poisoning Attacks and Defenses for
                       Federated Learning", NDSS 2021,
                       https://www.ndss-symposium.org/ndss-paper/manipulating-the-byzantine-optimizing-model-poisoning-attacks-and-defenses-for-federated-learning/:
                       ``mu + gamma p`` with the largest ``gamma`` such that
                       its largest distance to an honest update is at most
                       the largest distance between two honest updates
                       (aggregator-agnostic: it needs no knowledge of the
                       rule)
=====================  =====================================================

Decisions where the papers leave room:

- "Honest updates" are ``y_i - x`` of every accepted reply, the attackers'
  own honest ones included (the papers' full-knowledge setting); float
  shared entries only (integer buffers keep each reply's own value).
- Min-max's perturbation ``p`` is ``-mu / ||mu||`` (``dev_type =
  "unit_vec"``, the official code's default); ``gamma`` by bisection from 10
  down to a step of 1e-5, as in the paper's Algorithm 1 (``gamma_init = 10``,
  ``tau = 1e-5``), so ``gamma`` stays below ``2 gamma_init`` (as there).
  The paper's other perturbations (``std``, ``sign``) are arguments of
  :func:`min_max_update`, not run-config keys.
- Who attacks is the client simulation's choice
  (``clientapps.attacks.attacker_partitions``), read from each reply's
  ``partition-id``; a reply without one is honest.
- Only synchronous algorithms whose replies are the model
  (``reply_arrays = "model"`` or the ``plain`` routine): an update-shaped,
  asynchronous or ranking reply (FRL) has no ``y - x`` to craft.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from bouquet.strategies.base import BouquetStrategy
from bouquet.strategies.context import RoundContext
from bouquet.strategies.uplink import reply_kind
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import compression

SERVER_ATTACKS = ("alie-omniscient", "min-max")
"""Attacks crafted on the server from the round's honest updates."""
PERTURBATIONS = ("unit_vec", "std", "sign")
GAMMA_INIT = 10.0
GAMMA_TOLERANCE = 1e-5


def alie_update(updates: np.ndarray, z: float) -> np.ndarray:
    """ALIE: ``mean - z * std`` per coordinate of ``updates`` (one per row)."""
    return updates.mean(axis=0) - z * updates.std(axis=0)


def _perturbation(updates: np.ndarray, kind: str) -> np.ndarray:
    mean = updates.mean(axis=0)
    if kind == "unit_vec":
        norm = np.linalg.norm(mean)
        return -mean / norm if norm > 0 else np.zeros_like(mean)
    if kind == "std":
        return -updates.std(axis=0)
    if kind == "sign":
        return -np.sign(mean)
    raise ValueError(f"perturbation must be one of {PERTURBATIONS}; got {kind!r}.")


def _distances(rows: np.ndarray, point: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum((rows - point) ** 2, axis=1))


def min_max_update(
    updates: np.ndarray,
    perturbation: str = "unit_vec",
    gamma_init: float = GAMMA_INIT,
    tolerance: float = GAMMA_TOLERANCE,
) -> np.ndarray:
    """Min-max: ``mean + gamma p``, ``gamma`` the largest found by bisection.

    The crafted update's largest distance to a row of ``updates`` may not
    exceed the largest distance between two rows.
    """
    mean = updates.mean(axis=0)
    p = _perturbation(updates, perturbation)
    bound = max((_distances(updates, row).max() for row in updates), default=0.0)
    # Steps gamma_init / 2, / 4, ...: gamma can reach any value in (0, 2 gamma_init).
    gamma, step, found = gamma_init, gamma_init, 0.0
    while abs(found - gamma) > tolerance and step > tolerance:
        if _distances(updates, mean + gamma * p).max() <= bound:
            found = gamma
            gamma += step / 2
        else:
            gamma -= step / 2
        step /= 2
    return mean + found * p


@dataclass(frozen=True)
class OmniscientAttack:
    """Rewrites the attackers' accepted replies with one crafted model."""

    kind: str
    attackers: frozenset[int]
    z: float = 0.0
    """ALIE's ``z`` (unused by min-max)."""

    def __call__(self, replies: list[ClientReply], ctx: RoundContext) -> None:
        """Replace, in place, the arrays of the replies whose partition attacks."""
        bad = [r for r in replies if r.partition in self.attackers]
        if not bad or len(replies) < 2:
            return
        keys = compression.compressed_keys(ctx.arrays, ctx.personal)
        x = compression.flatten(ctx.arrays, keys).astype(np.float64)
        updates = np.stack(
            [
                compression.flatten(r.arrays, keys).astype(np.float64) - x
                for r in replies
            ]
        )
        if self.kind == "alie-omniscient":
            crafted = alie_update(updates, self.z)
        else:
            crafted = min_max_update(updates)
        model = compression.unflatten(x + crafted, ctx.arrays, keys)
        for reply in bad:
            reply.arrays = {
                k: np.asarray(model[k], dtype=v.dtype) if k in model else v
                for k, v in reply.arrays.items()
            }


def attack_on_server(
    strategy: BouquetStrategy, kind: str, attackers: Collection[int], z: float = 0.0
) -> BouquetStrategy:
    """Make ``strategy`` craft its attackers' replies (``kind``); returns it.

    Raises
    ------
    ValueError
        ``kind`` is not a server-side attack, or the strategy's replies are
        not models.

    """
    if kind not in SERVER_ATTACKS:
        raise ValueError(f"attack must be one of {SERVER_ATTACKS}; got {kind!r}.")
    if reply_kind(strategy) != "model":
        raise ValueError(
            f"attack: '{kind}' crafts a model from the round's honest updates; "
            f"{strategy.name or 'this strategy'} replies with something else "
            f"(routine '{strategy.routine}')."
        )
    strategy.reply_attack = OmniscientAttack(kind, frozenset(attackers), float(z))
    return strategy
