"""FedPipe's planning: adapter importance, selection, and the rank/batch solver.

Pure functions on plain numbers (no messages, no state), used by
:mod:`strategies.fedpipe` and tested on hand-made values.

**Cost model** (per node and round; floats are 4 bytes). ``D`` is the
adapters' floats per unit of rank, ``sum (d_in + d_out)`` over the selected
adapters; ``H`` the other trainable floats (the head); ``W`` the adapted
layers' frozen weights, ``sum d_in d_out``; ``tau`` positions per example
through each adapted layer (tokens, patches; 1 for an MLP); ``E`` the
examples a node trains on per round; ``q`` the quantisation bits.

- memory(r, b) = ``16 (H + r D)`` (weights, gradients and Adam's two moments)
  ``+ 4 b tau sum (d_in + r + d_out)`` (the adapted layers' activations that
  backward keeps) ``+ q/8 W`` (the quantised adapted weights; the rest of the
  backbone is a constant each node's budget absorbs);
- time(r, b) = compute + communication: ``E tau (4 W + 6 r D) / speed``
  (forward and input gradients of the frozen weights, forward and backward
  of the adapters) ``+ ceil(E / b) 8 (H + r D) / speed`` (one Adam step per
  batch) ``+ 8 (H + r D) / bandwidth`` (the node's slice down and up).

**Solver** (the spec's two stages after the selection; an integer program
over each node's candidate ranks and batch sizes): with the selection fixed
it separates over nodes given the round's deadline, so it is solved exactly
by enumeration. Stage A: the deadline ``T*`` is the slowest node's fastest
configuration that fits its memory (the spec's objective, the slowest
node's round time, at its minimum); stage B: every node takes the largest
rank, then the fastest batch size, that fits its memory and finishes by
``T*``: strong nodes spend their slack on rank and no node delays the round.
A node that no configuration fits gets the smallest one (over budget).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def adapters(keys: Sequence[str]) -> dict[str, tuple[str, str]]:
    """LoRA adapter name (the adapted module) -> its (A, B) keys, in order."""
    found = {}
    for key in keys:
        if ".lora_A." in key:
            found[key.split(".lora_A.")[0]] = (key, key.replace(".lora_A.", ".lora_B."))
    return found


def adapter_dims(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """``(d_in, d_out)`` from the factors ``A (r, in...)``, ``B (out, r, ...)``."""
    return int(math.prod(a.shape[1:])), int(b.shape[0] * math.prod(b.shape[2:]))


@dataclass(frozen=True)
class CostModel:
    """Memory (bytes) and round time (seconds) of one node's configuration."""

    dims: tuple[tuple[int, int], ...]
    """``(d_in, d_out)`` of every selected adapter."""
    head: int
    """Trainable floats besides the adapters."""
    tokens: int = 1
    examples: int = 256
    bits: int = 4

    @property
    def per_rank(self) -> int:
        """``D``: adapter floats per unit of rank."""
        return sum(i + o for i, o in self.dims)

    @property
    def frozen(self) -> int:
        """``W``: the adapted layers' frozen weights."""
        return sum(i * o for i, o in self.dims)

    def trainable(self, rank: int) -> int:
        """Floats a node of this rank trains (and sends each way)."""
        return self.head + rank * self.per_rank

    def memory(self, rank: int, batch: int) -> float:
        """Bytes: training state, activations, quantised adapted weights."""
        activations = 4 * batch * self.tokens * sum(i + rank + o for i, o in self.dims)
        bits = self.bits or 32
        return 16 * self.trainable(rank) + activations + bits / 8 * self.frozen

    def time(self, rank: int, batch: int, speed: float, bandwidth: float) -> float:
        """Seconds: compute at ``speed`` FLOP/s, the slices at ``bandwidth`` B/s."""
        work = (
            self.examples * self.tokens * (4 * self.frozen + 6 * rank * self.per_rank)
        )
        steps = math.ceil(self.examples / batch) * 8 * self.trainable(rank)
        return (work + steps) / speed + 8 * self.trainable(rank) / bandwidth


@dataclass(frozen=True)
class Profile:
    """One node's simulated resources."""

    memory: float
    """Bytes available for training."""
    speed: float
    """FLOP/s."""
    bandwidth: float
    """Bytes/s each way."""


def solve(
    profiles: Mapping[int, Profile],
    cost: CostModel,
    ranks: Sequence[int],
    batches: Sequence[int],
) -> dict[int, tuple[int, int, float]]:
    """Node -> ``(rank, batch, time)``: the two-stage solution (module docstring)."""
    options = [(r, b) for r in sorted(ranks) for b in sorted(batches)]
    smallest = (min(ranks), min(batches))

    def fits(node: int) -> list[tuple[int, int]]:
        p = profiles[node]
        return [o for o in options if cost.memory(*o) <= p.memory] or [smallest]

    def time(node: int, option: tuple[int, int]) -> float:
        p = profiles[node]
        return cost.time(*option, p.speed, p.bandwidth)

    feasible = {node: fits(node) for node in profiles}
    deadline = max(
        (min(time(n, o) for o in opts) for n, opts in feasible.items()), default=0.0
    )
    plan = {}
    for node, opts in feasible.items():
        in_time = [o for o in opts if time(node, o) <= deadline * (1 + 1e-9)]
        rank, batch = min(in_time, key=lambda o: (-o[0], time(node, o)))
        plan[node] = (rank, batch, time(node, (rank, batch)))
    return plan


def select(
    scores: Mapping[str, float],
    current: Sequence[str] | None,
    count: int,
    hysteresis: float,
) -> list[str]:
    """The ``count`` adapters to train, by importance, with hysteresis.

    From scratch (``current`` None): the ``count`` highest scores (ties: the
    earlier adapter). Else the current set is kept except that an adapter
    outside it replaces the weakest inside while its score exceeds that one's
    by the factor ``1 + hysteresis`` (re-selection resets an adapter, so it
    should not oscillate on noise). The result is in the order of ``scores``.
    """
    order = list(scores)
    rank = sorted(order, key=lambda a: (-scores[a], order.index(a)))
    if current is None:
        chosen = set(rank[:count])
    else:
        chosen = {a for a in current if a in scores}
        for a in rank:  # fill up to count (the count or the candidates changed)
            if len(chosen) >= count:
                break
            chosen.add(a)
        while len(chosen) > count:
            chosen.remove(min(chosen, key=lambda a: (scores[a], -order.index(a))))
        outside = [a for a in rank if a not in chosen]
        for candidate in outside:
            weakest = min(chosen, key=lambda a: (scores[a], -order.index(a)))
            if scores[candidate] > (1 + hysteresis) * scores[weakest]:
                chosen.remove(weakest)
                chosen.add(candidate)
            else:
                break
    return [a for a in order if a in chosen]
