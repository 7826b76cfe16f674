"""Who takes part: the strategies' node sampler, and the participation models.

:func:`wait_for_node_list` waits until enough nodes are connected (never for
ever) and :func:`sample_nodes` is how every strategy draws among them. The
rest of the module models which clients are available in a round (the
environment).

The environment, not the strategy, decides who can take part: a client that is
unavailable in round ``t`` never receives that round's train message and so
never replies, like an offline device (see ``serverapps/participation.py``,
which applies a model to a Grid). Strategies therefore never see the
probabilities; FedAU's point is to cope without them.

Every decision is a pure function of ``(seed, round, client index)``: the
uniform draws of round ``t`` are one stream ``U_t`` seeded by
``derive_seed(seed, t, "participation")``, client ``i`` uses ``U_t[i]``, so a
run replays exactly and a resumed run sees the same availability. The client
index is the node's ``partition-id`` (the same in the in-process runner, Ray
and deployment demos).

Models (run-config ``participation``), following Wang & Ji, "A Lightweight
Method for Tackling Unknown Participation Statistics in Federated Averaging",
ICLR 2024 (official code IBM/fedau, ``util/util.py``):

- ``uniform``: every client is always available; the strategy's own sampling
  (``fraction-train``) is the only selection. Today's behaviour, the default.
- ``bernoulli``: client ``i`` is available with probability ``p_i``,
  independently across rounds (``U_t[i] < p_i``).
- ``cyclic``: ``a_i = max(1, round(cycle p_i))`` available rounds then
  ``max(1, cycle - a_i)`` unavailable rounds, repeated, with a random phase
  per client (the official code starts each client at a random point of its
  inactive stretch; any phase gives the same long-run rate).
- ``markov``: a two-state chain per client; ``P(off -> on) = q``
  (``participation-markov-active``), ``P(on -> off) = q (1/p_i - 1)`` so that
  the stationary rate is ``p_i``; when that exceeds 1 both are scaled down so
  that ``P(on -> off) = 1`` (as the official code). The state at round 0 is
  drawn from the stationary law and the chain steps once before each round.

Probabilities ``p_i`` (``participation-link``):

- ``label`` (official): ``p_i = max(p_min, p_mean C <h_i, m>)`` with ``h_i``
  the client's label distribution over ``C`` classes and ``m ~ Dirichlet(alpha
  1_C)`` one class multiplier per run, so participation correlates with data.
- ``size``: ``p_i = max(p_min, p_mean n_i / mean(n))``, larger clients show up
  more often.
- ``none``: ``p_i = p_mean`` for every client (homogeneous).

Probabilities are capped at 1.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.serverapp import Grid
from flwr.supercore import log

from bouquet.tasks.wire import derive_seed

NODE_POLL_INTERVAL = 0.5
"""Seconds between node-list queries while waiting for nodes."""


def wait_for_node_list(
    grid: Grid,
    minimum: int,
    timeout: float,
    settle: float = 0.0,
    poll_interval: float = NODE_POLL_INTERVAL,
) -> list[int]:
    """The sorted node ids once ``minimum`` are connected.

    With ``settle``, also once the count has not changed for that long (nodes
    still registering). After ``timeout`` seconds, whatever is connected then
    (``timeout <= 0``: wait for ever). A wait past 5 s is logged once.
    """
    start = time.monotonic()
    last, stable_since, logged = -1, start, False
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        now = time.monotonic()
        if len(nodes) != last:
            last, stable_since = len(nodes), now
        if len(nodes) >= minimum and now - stable_since >= settle:
            return nodes
        if timeout > 0 and now - start >= timeout:
            return nodes
        if not logged and len(nodes) < minimum and now - start >= 5.0:
            log(INFO, "Waiting for nodes: %d connected, %d wanted", len(nodes), minimum)
            logged = True
        time.sleep(poll_interval)


MODELS = ("uniform", "bernoulli", "cyclic", "markov")


def sample_nodes(
    node_ids: Iterable[int], count: int, seed: int, server_round: int, phase: str
) -> list[int]:
    """``count`` of the sorted ``node_ids``, drawn from ``(seed, round, phase)``.

    The strategies' sampler (architecture rule 6): an explicit function of its
    inputs, so that a run replays exactly and nothing else in the process is
    touched (Python's global ``random`` stays as it was).
    """
    rng = random.Random(derive_seed(seed, server_round, phase))
    return rng.sample(sorted(int(n) for n in node_ids), count)


LINKS = ("label", "size", "none")


@dataclass(frozen=True)
class ParticipationSpec:
    """How clients become available (see the module docstring for each field)."""

    model: str = "uniform"
    mean: float = 0.1
    minimum: float = 0.02
    alpha: float = 0.1
    link: str = "label"
    cycle: int = 100
    markov_active: float = 0.05

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(
                f"participation must be one of {MODELS}; got {self.model!r}."
            )
        if self.link not in LINKS:
            raise ValueError(
                f"participation-link must be one of {LINKS}; got {self.link!r}."
            )
        if not 0.0 < self.mean <= 1.0 or not 0.0 <= self.minimum <= 1.0:
            raise ValueError(
                "participation-mean must be in (0, 1] and participation-min in "
                f"[0, 1]; got {self.mean} and {self.minimum}."
            )
        if self.link == "label" and self.alpha <= 0.0:
            raise ValueError(f"participation-alpha must be > 0; got {self.alpha}.")
        if self.cycle < 2 or not 0.0 < self.markov_active <= 1.0:
            raise ValueError(
                "participation-cycle must be >= 2 and participation-markov-active "
                f"in (0, 1]; got {self.cycle} and {self.markov_active}."
            )


def participation_probabilities(
    spec: ParticipationSpec,
    seed: int,
    label_counts: np.ndarray | None = None,
    sizes: Sequence[float] | None = None,
) -> np.ndarray:
    """The probability ``p_i`` of every client, shape ``(N,)``.

    Parameters
    ----------
    spec : ParticipationSpec
        The model; ``spec.link`` says what the probabilities depend on.
    seed : int
        Run seed (draws the class multiplier of the ``label`` link).
    label_counts : np.ndarray, optional
        ``(N, C)`` label histogram of each client (``label`` link).
    sizes : sequence of float, optional
        Number of examples of each client (``size`` link; else its length
        gives N for ``none``).

    """
    if spec.link == "label":
        if label_counts is None:
            raise ValueError("participation-link 'label' needs label histograms.")
        counts = np.asarray(label_counts, dtype=np.float64)
        dist = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        rng = np.random.default_rng(derive_seed(seed, "participation-multiplier"))
        multiplier = rng.dirichlet(spec.alpha * np.ones(counts.shape[1]))
        raw = spec.mean * counts.shape[1] * (dist @ multiplier)
    elif spec.link == "size":
        if sizes is None:
            raise ValueError("participation-link 'size' needs client sizes.")
        n = np.asarray(sizes, dtype=np.float64)
        raw = spec.mean * n / max(n.mean(), 1e-12)
    else:
        count = len(sizes) if sizes is not None else len(label_counts)  # type: ignore[arg-type]
        raw = np.full(count, spec.mean)
    return np.clip(np.maximum(spec.minimum, raw), 0.0, 1.0)


class Availability:
    """Which clients are available in each round, for fixed probabilities.

    Parameters
    ----------
    spec : ParticipationSpec
        The participation model.
    probabilities : np.ndarray
        ``p_i`` per client index (unused by ``uniform``).
    seed : int
        Run seed; all draws derive from ``(seed, round, index)``.

    """

    def __init__(
        self, spec: ParticipationSpec, probabilities: np.ndarray, seed: int
    ) -> None:
        self.spec = spec
        self.p = np.asarray(probabilities, dtype=np.float64)
        self.seed = int(seed)
        n = self.p.size
        if spec.model == "cyclic":
            self.active = np.maximum(1, np.round(spec.cycle * self.p)).astype(int)
            self.period = self.active + np.maximum(1, spec.cycle - self.active)
            phase = np.random.default_rng(derive_seed(seed, "participation-phase"))
            self.phase = np.floor(phase.random(n) * self.period).astype(int)
        if spec.model == "markov":
            to_active = np.full(n, spec.markov_active)
            to_inactive = to_active * (1.0 / self.p - 1.0)
            over = to_inactive > 1.0
            to_active[over] /= to_inactive[over]
            to_inactive[over] = 1.0
            self.to_active, self.to_inactive = to_active, to_inactive
            # states[t] = chain state at round t; replayed on demand (pure in t).
            self._states = [self._draws(0) < self.p]

    def _draws(self, server_round: int) -> np.ndarray:
        seed = derive_seed(self.seed, server_round, "participation")
        return np.random.default_rng(seed).random(self.p.size)

    def __call__(self, server_round: int) -> np.ndarray:
        """Boolean mask ``(N,)``: who is available in ``server_round`` (>= 1)."""
        model = self.spec.model
        if model == "uniform":
            return np.ones(self.p.size, dtype=bool)
        if model == "bernoulli":
            return self._draws(server_round) < self.p
        if model == "cyclic":
            position = (server_round - 1 + self.phase) % self.period
            return position < self.active
        while len(self._states) <= server_round:
            before = self._states[-1]
            u = self._draws(len(self._states))
            self._states.append(
                np.where(before, u >= self.to_inactive, u < self.to_active)
            )
        return self._states[server_round].copy()
