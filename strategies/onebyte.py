"""One-Byte SPSA: clients send seed-derived scalars, the server replays the steps.

Zelikman, Huang, Liang, Haber, Goodman, "Just One Byte (per gradient): A Note
on Low-Bandwidth Decentralized Language Model Finetuning Using Shared
Randomness", arXiv 2023, https://arxiv.org/abs/2306.10015 (official code:
ezelikman/justonebyte, a peer-to-peer prototype).

- **Client** (recipe ``onebyte``): from the global ``x^t``, for ``j = 1..J``
  it draws a minibatch of ``batch-size`` examples and a direction
  ``z_j ~ N(0, I)`` from the seed the server gave it, evaluates the loss at
  ``x + eps z_j`` and ``x - eps z_j`` and keeps the projected gradient
  ``g_j = (L+ - L-) / (2 eps)``. The reply is the ``J`` scalars, one byte
  each (:class:`tasks.compression.LogByte`), not a model: no backward pass,
  no local step.
- **Server**: regenerates every ``z_{m,j}`` from the seeds it issued and
  steps ``x^{t+1} = x^t - (lr / sqrt(N_t)) sum_{m,j} g_{m,j} z_{m,j}``, with
  ``N_t`` the number of scalars received this round (the code's
  ``1/sqrt(N)``, not ``1/N``).

Wire protocol: each train message carries ``arrays`` (``x^t``, dense) and
``config`` with ``onebyte.seed`` (this node's seed for this round, its own
per node), ``onebyte.eps``, ``onebyte.samples`` (``J``) and
``onebyte.quantize``; a reply's ``arrays`` record is ``codes`` (``J``
uint8: sign bit and 7-bit log magnitude) or, with ``quantize = "float32"``,
``values`` (``J`` float32), plus ``num-examples`` and ``train-loss`` (the
mean of the ``L+`` and ``L-``). Directions: ``z_{m,j}`` is the standard
normal vector of NumPy's ``default_rng(derive_seed(seed_m, j))`` over the
shared float entries flattened in state-dict order
(:func:`tasks.compression.compressed_keys`), cast to each entry's dtype.
State: none on either side (the node's seed is kept per round in
``ctx.per_node``).

Decisions where the spec was open:

- **Server-mediated, downlink dense.** The paper's peers broadcast the byte
  lists and every machine keeps a replica. Here the server holds the model
  and sends ``x^t`` each round, so sampled, stateless or late-joining nodes
  need no replay of past rounds and replicas cannot drift; the uplink is
  the paper's (``J`` bytes). Sending the previous round's bytes down
  instead would need every node to keep a bit-identical replica and to
  replay the rounds it missed.
- **Seeds come from the server** (``derive_seed(seed, round, "onebyte",
  node)``, sent per node): the paper's ``seed(iteration, machine, j)``
  without the client having to know its identity; the reply carries no seed.
- **The byte.** The released prototype computes a byte but shares the float;
  here the byte is what travels: sign bit plus ``m = round(16 (ln|g| -
  4)) + 127`` clamped to ``[0, 127]`` (``m = 0``: exactly 0), i.e. the
  reference's ``16 ln|g|`` scale in 7 bits, magnitudes from ``~0.021`` to
  ``e^4 ~ 54.6`` with relative error at most ``e^(1/32) - 1 ~ 3.2%``.
  ``quantize = "float32"`` sends the exact scalars (the spec's comparison).
- The forward passes run in eval mode (no dropout noise between ``L+`` and
  ``L-``; BatchNorm uses its running statistics) with the loop's loss; the
  perturbation covers every shared float entry, buffers included (none in
  the MLP), as the uplink compressors do.
- Every scalar counts equally (the paper's sum), whatever the node's data
  size. The adaptive ``eps`` of the code (``gamma``) is not implemented
  (the spec: optional, ``gamma = 0`` disables it).
- Defaults are the code's: ``eps = 1e-3``, ``lr = 0.1``, ``J = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord

from bouquet.strategies import pieces
from bouquet.strategies.base import BouquetStrategy, Record
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.pieces import Replies, State, Updated
from bouquet.strategies.registry import register
from bouquet.tasks import compression, wire
from bouquet.tasks.params import Param

SEED = "onebyte.seed"
"""Config key: the node's seed for this round's directions."""
SCALARS = "scalars"
"""Key of a decoded reply's ``J`` projected gradients."""


@dataclass(frozen=True)
class Scalars(compression.Compressor):
    """``count`` scalars coded by ``inner``, whatever the model's size ``d``."""

    inner: compression.Compressor
    count: int

    def spec(self, d: int) -> compression.PayloadSpec:
        return self.inner.spec(self.count)

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> compression.Payload:
        return self.inner.encode(x, rng)

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        return self.inner.decode(payload, self.count)

    def problem(self, payload: Mapping[str, np.ndarray], d: int) -> str | None:
        return self.inner.problem(payload, self.count)


def codec(quantize: str, samples: int) -> Scalars:
    """The reply's coding: one byte (``byte``) or one float32 per scalar."""
    inner = compression.LogByte() if quantize == "byte" else compression.Identity()
    return Scalars(inner, int(samples))


@dataclass(frozen=True)
class SeededSteps(pieces.Combine):
    """``Delta = -(lr / sqrt(N)) sum_{m,j} g_{m,j} z_{m,j}`` from the issued seeds.

    The replies' arrays are ``{"scalars": g_m}``; ``ctx.per_node[m]["seed"]``
    is the seed node ``m`` was sent. Weights are not used.
    """

    lr: float = 0.1

    def update(
        self, replies: Replies, weights: np.ndarray, state: State, ctx: RoundContext
    ) -> Updated:
        keys = compression.compressed_keys(ctx.arrays, ctx.personal)
        d = sum(math.prod(ctx.arrays[k].shape) for k in keys)
        total, count = np.zeros(d), 0
        for reply in replies:
            seed = ctx.per_node[reply.node]["seed"]
            for j, g in enumerate(np.asarray(reply.arrays[SCALARS], np.float64)):
                total += g * compression.seeded_direction(seed, j, d)
                count += 1
        step = -self.lr / math.sqrt(max(count, 1)) * total
        return compression.unflatten(step, ctx.arrays, keys), state


@register
class OneByte(BouquetStrategy):
    """One-Byte SPSA's server (see the module docstring)."""

    name = "onebyte"
    routine = "onebyte"
    paper = "Zelikman et al., arXiv 2023, https://arxiv.org/abs/2306.10015"
    tagline = "Shared-seed SPSA: clients send J one-byte scalars, not a model"
    family = "compression"
    params = (
        Param("eps", 1e-3, "> 0", "perturbation scale eps", send="onebyte.eps"),
        Param("lr", 0.1, "> 0", "server step lr (scaled by 1/sqrt(N))"),
        Param(
            "samples",
            1,
            "[1, 4096]",
            "projected gradients J per node per round",
            send="onebyte.samples",
        ),
        Param(
            "quantize",
            "byte",
            choices=("byte", "float32"),
            help="scalar coding: log-scale byte or float32",
            send="onebyte.quantize",
        ),
    )

    def make_aggregator(self) -> pieces.Aggregator:
        """Uniform weights (unused), the seeded steps, a unit server step."""
        return pieces.Aggregator(
            pieces.Uniform(), SeededSteps(self.lr), pieces.ServerSGD()
        )

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        """The sampled nodes, each with its own seed for this round."""
        plan: dict[int, dict[str, Record]] = {}
        for node in super().recipients(ctx):
            seed = wire.derive_seed(self.seed, ctx.server_round, "onebyte", node)
            ctx.per_node[node] = {"seed": seed}
            plan[node] = {wire.CONFIG: ConfigRecord({**ctx.config, SEED: seed})}
        return plan

    def reply_codec(self, ctx: RoundContext) -> compression.Compressor:
        """Train replies are the ``J`` coded scalars."""
        return codec(self.quantize, self.samples)

    def decoded(self, flat: np.ndarray, ctx: RoundContext) -> NDArrays:
        """The scalars themselves (the combine piece replays the directions)."""
        return {SCALARS: flat}
