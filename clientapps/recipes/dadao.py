"""DADAO client: a node's six vectors, its gradient events and its exchanges.

Nabli, Oyallon, "DADAO: Decoupled Accelerated Decentralized Asynchronous
Optimization", ICML 2023, https://arxiv.org/abs/2208.00779. The node keeps
``X = (x, xt, y, yt, z, zt)`` (float64, over its trainable parameters, in
``Context.state``) and the virtual time ``last`` of its last event. Between
events ``X`` follows ``X' = M X`` (:func:`ode_matrix`), applied exactly as
``expm(M dt) X`` (:func:`advance`). A train message carries:

- ``gossip.neighbor-0`` (optional): the partner's ``y + z`` at the node's last
  exchange, which the node applies first, at time ``last``
  (:func:`exchange`: ``z -= beta m``, ``zt -= beta_t m`` with
  ``m = (y + z) - (y + z)_partner``);
- ``dadao.gradient-times``: the times of its gradient events; each one past
  ``last`` advances ``X`` to it and takes one gradient on one mini-batch of the
  one training loop (:func:`gradient_event`, with ``f_i`` the local loss plus
  ``mu / 2 ||x||^2``);
- ``dadao.time``: the time to advance to at the end (its next exchange, or
  the end of the server's batch of exchanges).

The reply carries the model (``x``) as ``gossip.model`` and ``y + z`` as
``dadao.message`` (float64 over the model's float entries; zero on the
buffers, which DADAO does not touch). Config keys read:
``dadao.smoothness``, ``dadao.strong-convexity``, ``dadao.chi1``,
``dadao.time``, ``dadao.gradient-times``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch

from bouquet.clientapps.bounds import RATE_MAX, Bound, ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.state import (
    array_record,
    load_arrays,
    load_values,
    save_arrays,
    save_values,
)
from bouquet.tasks import wire
from bouquet.tasks.wire import algorithm_key

NAMESPACE = "dadao"
TIME_MAX = 1e12
SMOOTHNESS = Bound(algorithm_key(NAMESPACE, "smoothness"), 1.0, 0.0, RATE_MAX, True)
STRONG_CONVEXITY = Bound(
    algorithm_key(NAMESPACE, "strong-convexity"), 0.01, 0.0, RATE_MAX, True
)
CHI1 = Bound(algorithm_key(NAMESPACE, "chi1"), 1.0, 0.0, TIME_MAX, True)
TIME = Bound(algorithm_key(NAMESPACE, "time"), 0.0, 0.0, TIME_MAX)
BOUNDS = (SMOOTHNESS, STRONG_CONVEXITY, CHI1, TIME)
GRADIENT_TIMES = algorithm_key(NAMESPACE, "gradient-times")
MAX_EVENTS = 100_000
"""Most gradient events one message may ask for."""


@dataclass(frozen=True)
class Constants:
    """DADAO's constants from ``L``, ``mu`` and ``chi1`` (``nu = mu / 2``)."""

    smoothness: float
    strong_convexity: float
    chi1: float

    @property
    def nu(self) -> float:
        return self.strong_convexity / 2

    @property
    def root(self) -> float:
        """``sqrt(nu / L)``."""
        return math.sqrt(self.nu / self.smoothness)

    @property
    def alpha(self) -> float:
        return self.root / 4

    @property
    def alpha_t(self) -> float:
        return self.root / 8

    @property
    def eta(self) -> float:
        return self.root / 8

    @property
    def theta(self) -> float:
        return 1 / (2 * self.root)

    @property
    def beta(self) -> float:
        return 0.5

    @property
    def beta_t(self) -> float:
        return 2 * self.chi1 / self.root

    @property
    def delta(self) -> float:
        return self.root / 4

    @property
    def delta_t(self) -> float:
        return 1.0

    @property
    def gamma(self) -> float:
        return 1 / (4 * self.smoothness)

    @property
    def gamma_t(self) -> float:
        return 1 / (4 * math.sqrt(self.smoothness * self.nu))


def ode_matrix(c: Constants) -> np.ndarray:
    """``M`` of ``X' = M X`` over ``(x, xt, y, yt, z, zt)`` (eta_t = eta)."""
    e, a, at, th = c.eta, c.alpha, c.alpha_t, c.theta
    return np.array(
        [
            [-e, e, 0, 0, 0, 0],
            [e, -e, 0, 0, 0, 0],
            [0, 0, -a, a, 0, 0],
            [0, -th * c.nu, -th, 0, -th, 0],
            [0, 0, 0, 0, -a, a],
            [0, 0, 0, 0, at, -at],
        ],
        dtype=np.float64,
    )


def advance(vectors: np.ndarray, dt: float, c: Constants) -> np.ndarray:
    """``expm(M dt) X`` for the ``(6, d)`` stack ``X`` (``dt >= 0``)."""
    if dt <= 0:
        return vectors
    return scipy.linalg.expm(ode_matrix(c) * dt) @ vectors


def gradient_event(vectors: np.ndarray, grad: np.ndarray, c: Constants) -> np.ndarray:
    """One gradient event with ``grad = grad f_i(x)``."""
    x, _, _, yt, _, _ = vectors
    r = grad - c.nu * x - yt
    out = vectors.copy()
    out[0] -= c.gamma * r
    out[1] -= c.gamma_t * r
    out[3] += (c.delta + c.delta_t) * r
    return out


def exchange(vectors: np.ndarray, partner: np.ndarray, c: Constants) -> np.ndarray:
    """The node's half of an exchange, ``partner`` being the partner's ``y + z``."""
    m = vectors[2] + vectors[4] - partner
    out = vectors.copy()
    out[4] -= c.beta * m
    out[5] -= c.beta_t * m
    return out


def read_times(config: Mapping[str, Any]) -> list[float]:
    """``dadao.gradient-times``: finite, non-negative, non-decreasing times."""
    value = config.get(GRADIENT_TIMES, [])
    if (
        not isinstance(value, list | tuple)
        or len(value) > MAX_EVENTS
        or not all(
            isinstance(t, int | float) and not isinstance(t, bool) for t in value
        )
        or not all(math.isfinite(t) and 0 <= t <= TIME_MAX for t in value)
        or any(b < a for a, b in itertools.pairwise(value))
    ):
        allowed = f"up to {MAX_EVENTS} non-decreasing times in [0, {TIME_MAX:g}]"
        raise ConfigError(GRADIENT_TIMES, value, allowed)
    return [float(t) for t in value]


class DadaoEvents(Hook):
    """The node's events of one message (see the module docstring).

    Takes over the step: each loop step is one gradient event (the optimizer
    is not used); the loop stops after the last one.
    """

    def __init__(
        self, constants: Constants, times: Sequence[float], until: float
    ) -> None:
        self.constants = constants
        self.times = list(times)
        self.until = float(until)
        self.done = 0

    def _load(self, run: LocalRun, vector: np.ndarray) -> None:
        with torch.no_grad():
            offset = 0
            for p in run.parameters:
                size = p.numel()
                chunk = vector[offset : offset + size].reshape(p.shape)
                p.copy_(torch.from_numpy(chunk).to(p.dtype))
                offset += size

    def setup(self, run: LocalRun) -> None:
        own = np.concatenate(
            [p.detach().cpu().double().ravel().numpy() for p in run.parameters]
        )
        stored = load_arrays(run.state, NAMESPACE, "vectors")
        clock = load_values(run.state, NAMESPACE, "clock")
        if stored is not None and stored["X"].shape == (6, own.size) and clock:
            self.vectors, self.last = stored["X"].copy(), float(clock["time"])
        else:  # the first message (or a node that lost its state)
            self.vectors, self.last = np.zeros((6, own.size)), 0.0
            self.vectors[0] = own
        if (partner := run.incoming.get(wire.gossip_neighbor(0))) is not None:
            self.vectors = exchange(
                self.vectors, self._flat(run, partner), self.constants
            )
        self.times = [t for t in self.times if self.last < t <= self.until]
        self._load(run, self.vectors[0])
        run.stop = run.stop or not self.times

    def _flat(self, run: LocalRun, record: Any) -> np.ndarray:
        """A relayed ``y + z`` record as one float64 vector over the parameters."""
        parts = []
        for name, p in run.model.named_parameters():
            if not p.requires_grad:
                continue
            if name not in record:
                name_ = wire.gossip_neighbor(0)
                raise ConfigError(f"{name_}[{name!r}]", None, "present", "record")
            value = np.asarray(record[name].numpy(), dtype=np.float64)
            if value.shape != tuple(p.shape) or not np.isfinite(value).all():
                name_ = wire.gossip_neighbor(0)
                raise ConfigError(
                    f"{name_}[{name!r}]", "bad", "finite, shaped", "record"
                )
            parts.append(value.ravel())
        return np.concatenate(parts)

    def order(self, run: LocalRun, num_examples: int) -> torch.Tensor | None:
        """Enough batches for every gradient event, in one epoch."""
        need = len(self.times) * run.settings.batch_size
        if not need:
            return None
        rounds = -(-need // num_examples)
        perms = [
            torch.randperm(num_examples, generator=run.generator) for _ in range(rounds)
        ]
        return torch.cat(perms)[:need]

    def step(
        self,
        run: LocalRun,
        closure: Callable[[], torch.Tensor],
        default_step: Callable[[], None],
    ) -> torch.Tensor | None:
        c = self.constants
        t = self.times[self.done]
        self.vectors = advance(self.vectors, t - self.last, c)
        self.last = t
        self._load(run, self.vectors[0])
        loss = closure()
        grad = np.concatenate(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p))
                .detach()
                .cpu()
                .double()
                .ravel()
                .numpy()
                for p in run.parameters
            ]
        )
        # f_i is the local loss plus mu/2 ||x||^2: mu-strongly convex (spec).
        grad = grad + c.strong_convexity * self.vectors[0]
        self.vectors = gradient_event(self.vectors, grad, c)
        self.done += 1
        run.stop = self.done >= len(self.times)
        return loss

    def finish(self, run: LocalRun) -> None:
        self.vectors = advance(self.vectors, self.until - self.last, self.constants)
        self.last = max(self.last, self.until)
        self._load(run, self.vectors[0])
        save_arrays(run.state, NAMESPACE, "vectors", {"X": self.vectors})
        save_values(run.state, NAMESPACE, "clock", {"time": self.last})
        entries = run.model.state_dict()
        message = {
            k: np.zeros(tuple(v.shape))
            for k, v in entries.items()
            if v.is_floating_point()
        }
        total = self.vectors[2] + self.vectors[4]
        offset = 0
        for name, p in run.model.named_parameters():
            if p.requires_grad:
                message[name] = total[offset : offset + p.numel()].reshape(p.shape)
                offset += p.numel()
        run.reply_records[wire.GOSSIP_MODEL] = array_record(entries)
        run.reply_records[wire.DADAO_MESSAGE] = array_record(message)
        run.metrics["dadao-gradients"] = float(self.done)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """The node's DADAO events of this message."""
    constants = Constants(
        SMOOTHNESS.read(config), STRONG_CONVEXITY.read(config), CHI1.read(config)
    )
    return [DadaoEvents(constants, read_times(config), TIME.read(config))]
