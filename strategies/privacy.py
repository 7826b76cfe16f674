"""Central differential privacy with fixed clipping, for Bouquet strategies.

The two wrappers have the interface of Flower's
(``flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`` and
``...ClientSideFixedClipping``: ``strategy, noise_multiplier, clipping_norm,
num_sampled_clients, *, accountant``; Andrew et al. 2021,
https://arxiv.org/abs/1905.03871 and McMahan et al. 2018,
https://arxiv.org/abs/1710.06963), but they privatize the *model update* of
any strategy they accept, where Flower's clip every array record of a reply
as if it were the model (SCAFFOLD's control variates included) and see only
synchronous rounds.

What they do: the strategy's combine piece (a weighted mean,
:class:`~strategies.pieces.WeightedMean`) is replaced by
:class:`PrivateMean`, which

1. takes each accepted reply's update, ``y_i - x`` for model replies or the
   reply itself for update replies (the asynchronous algorithms' deltas),
   over every shared state-dict entry, and scales it to L2 norm at most
   ``clipping_norm`` C (always on the server; with client-side clipping the
   clients clip first, :func:`bouquet.clientapps.routine.train_client`);
2. sums them with the strategy's own weights, ``Delta = sum_i w_i clip(u_i)``;
3. adds Gaussian noise of standard deviation ``sigma * C * max_i |w_i|`` to
   every coordinate of ``Delta`` (``sigma`` the noise multiplier; with the
   uniform weights ``1/n`` of accounted runs this is Flower's ``sigma C / n``),

before the strategy's server optimizer (momentum, Adam, ...), which is then
post-processing. Because the piece sits in the strategy, an asynchronous
strategy stays asynchronous: every committed version is one noisy release.

What they do not protect: metrics (as Flower's) and a strategy's extra reply
records (e.g. SCAFFOLD's ``momentum.dc``), which are used as sent; the
wrapper logs a warning naming them. A strategy whose server reads the raw
replies beyond the combine piece (FedAvg-M's direction g, FedAMD's table,
median or Krum aggregation, ...) is refused with the reason
(:meth:`~strategies.base.BouquetStrategy.dp_problem`).

Noise comes from the operating system's entropy, not the run's seed (noise
that a known seed reproduces protects nothing), so a private run does not
replay bit for bit. An ``accountant`` (Flower's ``PrivacyAccountant``, with
``sampling_method='no-amplification'`` as Flower requires) composes one
Gaussian event per release and requires equal weights in each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    PrivacyAccountant,
    PrivacySpent,
    SamplingMethod,
)

from bouquet.strategies.aggregation import weighted_sum
from bouquet.strategies.context import RoundContext
from bouquet.strategies.pieces import Combine, State, Updated, WeightedMean
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire


def update_norm(reply: ClientReply, keys: Iterable[str], reference: Any) -> float:
    """L2 norm of a reply's update over ``keys`` (float64, one layer at a time)."""
    total = 0.0
    for k in keys:
        value = np.asarray(reply.arrays[k], dtype=np.float64)
        if reference is not None:
            value = value - reference[k]
        total += float(np.dot(value.ravel(), value.ravel()))
    return math.sqrt(total)


@dataclass(frozen=True)
class PrivateMean(Combine):
    """``sum_i w_i clip_C(u_i)`` plus Gaussian noise (see the module doc).

    ``on_release(weights)`` runs before each release (the accountant);
    ``rng()`` gives the noise generator (fresh OS entropy by default).
    """

    inner: WeightedMean
    clipping_norm: float
    noise_multiplier: float
    on_release: Callable[[np.ndarray], None] | None = field(default=None, compare=False)
    rng: Callable[[], np.random.Generator] = field(
        default=np.random.default_rng, compare=False
    )

    def update(
        self,
        replies: Any,
        weights: np.ndarray,
        state: State,
        ctx: RoundContext,
    ) -> Updated:
        reference = ctx.arrays if self.inner.of == "models" else None
        keys = ctx.shared
        norms = [update_norm(r, keys, reference) for r in replies]
        factors = [min(1.0, self.clipping_norm / n) if n > 0 else 1.0 for n in norms]
        weights = np.asarray(weights, dtype=np.float64)
        arrays = [{k: r.arrays[k] for k in keys} for r in replies]
        ref = None if reference is None else {k: reference[k] for k in keys}
        # Clipping folds into the weights: sum_i (w_i f_i) u_i, no copies.
        delta = weighted_sum(arrays, weights * np.asarray(factors), ref)
        largest = float(np.abs(weights).max())
        stdev = self.noise_multiplier * self.clipping_norm * largest
        if self.on_release is not None:
            self.on_release(weights)
        if stdev > 0:
            rng = self.rng()
            for k in delta:
                delta[k] = delta[k] + rng.normal(0.0, stdev, size=delta[k].shape)
        log(
            INFO,
            "DP: %d update(s), %d clipped to %.4g; noise stdev %.4g",
            len(replies),
            sum(f < 1.0 for f in factors),
            self.clipping_norm,
            stdev,
        )
        return delta, state


class _FixedClipping(Strategy):
    """What both wrappers share: checks, the private combine piece, accounting.

    Arguments are Flower's. ``num_sampled_clients`` is checked and kept for
    that interface only: the noise follows the weights each release actually
    has (``sigma C max_i w_i``, Flower's ``sigma C / n`` for ``n`` equal ones).
    Wrapping changes the strategy it wraps (its combine piece and, for
    client-side clipping, its train config): wrap a fresh one.
    """

    clip_on_clients = False
    in_core = True
    """What the wrapper adds lives in the wrapped strategy (its combine piece),
    so the driver may run an asynchronous strategy's own schedule."""

    def __init__(
        self,
        strategy: Strategy,
        noise_multiplier: float,
        clipping_norm: float,
        num_sampled_clients: int,
        *,
        accountant: PrivacyAccountant | None = None,
    ) -> None:
        from bouquet.strategies.base import BouquetStrategy

        super().__init__()
        if not isinstance(strategy, BouquetStrategy):
            raise TypeError(
                f"{type(self).__name__} wraps a Bouquet strategy; for Flower's own "
                "strategies use Flower's wrapper of the same name."
            )
        if noise_multiplier < 0:
            raise ValueError("The noise multiplier should be a non-negative value.")
        if clipping_norm <= 0:
            raise ValueError("The clipping norm should be a positive value.")
        if num_sampled_clients <= 0:
            raise ValueError(
                "The number of sampled clients should be a positive value."
            )
        if problem := strategy.dp_problem():
            raise ValueError(
                f"Differential privacy cannot protect {strategy.name!r}: {problem}."
            )
        if accountant is not None:
            if noise_multiplier <= 0:
                raise ValueError(
                    "The noise multiplier must be positive when accounting is enabled."
                )
            if accountant.config.sampling_method is not SamplingMethod.NO_AMPLIFICATION:
                raise ValueError(
                    "Fixed-clipping accounting requires sampling_method="
                    "'no-amplification' (sampling is not private here)."
                )
        self.strategy = strategy
        self.noise_multiplier = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.num_sampled_clients = int(num_sampled_clients)
        self.accountant = accountant
        aggregator = strategy.aggregator
        strategy.aggregator = replace(
            aggregator,
            combine=PrivateMean(
                aggregator.combine,
                self.clipping_norm,
                self.noise_multiplier,
                on_release=self._account if accountant is not None else None,
            ),
        )
        if self.clip_on_clients:
            strategy.extra_config = {
                **strategy.extra_config,
                wire.DP_CLIPPING_NORM: self.clipping_norm,
            }
        if strategy.reply_records:
            log(
                WARNING,
                "%s: the reply records %s are used as clients send them; the "
                "privacy guarantee covers the model update only.",
                strategy.name,
                list(strategy.reply_records),
            )

    # The privatized strategy does the work; the wrapper is Flower's interface.
    def _account(self, weights: np.ndarray) -> None:
        accountant = self.accountant
        assert accountant is not None
        if np.ptp(weights) > 1e-12 * max(1.0, float(np.abs(weights).max())):
            raise ValueError(
                "Accounted aggregation requires equal client weights; this "
                f"release's range from {weights.min():.4g} to {weights.max():.4g} "
                "(use the strategy's uniform weighting)."
            )
        event = GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier,
            sample_size=len(weights),
            population_size=accountant.config.population_size,
        )
        if accountant.config.max_epsilon is not None and accountant.would_exceed(event):
            spent = accountant.get_privacy_spent()
            raise PrivacyBudgetExhausted(
                "The next private release would exceed max_epsilon "
                f"(current epsilon: {spent.epsilon}, delta: {spent.delta})."
            )
        accountant.compose(event)
        spent = accountant.get_privacy_spent()
        log(
            INFO,
            "Privacy spent: epsilon=%.6f at delta=%g after %d releases",
            spent.epsilon,
            spent.delta,
            spent.num_releases,
        )

    def privacy_spent(self) -> PrivacySpent | None:
        """Cumulative privacy expenditure, if accounting is enabled."""
        return None if self.accountant is None else self.accountant.get_privacy_spent()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's (it sends the clipping norm when clients clip)."""
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The wrapped strategy's, whose combine piece clips and adds the noise."""
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The wrapped strategy's."""
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the DP settings, then the wrapped strategy's summary."""
        log(INFO, "\t├──> DP settings (%s):", type(self).__name__)
        log(INFO, "\t│\t├── Noise multiplier: %s", self.noise_multiplier)
        log(INFO, "\t│\t└── Clipping norm: %s", self.clipping_norm)
        self.strategy.summary()

    def start(
        self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any
    ) -> Result:
        """Run with Bouquet's driver (Flower's ``start`` signature)."""
        from bouquet.strategies.driver import Driver

        return Driver().run(self, grid, initial_arrays, *args, **kwargs)


class DifferentialPrivacyServerSideFixedClipping(_FixedClipping):
    """Central DP, the server clips each update (see the module doc)."""

    def __repr__(self) -> str:
        return "Differential Privacy Strategy Wrapper (Server-Side Fixed Clipping)"


class DifferentialPrivacyClientSideFixedClipping(_FixedClipping):
    """Central DP, clients clip their update before sending it.

    The strategy's messages carry ``dp.clipping-norm``; Bouquet's
    ``train_client`` clips the update it sends (no client mod needed). The
    server clips again, which changes nothing for an honest client and bounds
    a dishonest one.
    """

    clip_on_clients = True

    def __repr__(self) -> str:
        return "Differential Privacy Strategy Wrapper (Client-Side Fixed Clipping)"


def private_training(
    strategy: Strategy,
    noise_multiplier: float = 0.0,
    *,
    epsilon: float = 0.0,
    delta: float = 1e-5,
    clip: float = 1.0,
) -> Strategy:
    """Make ``strategy``'s clients train with DP-SGD; returns ``strategy``.

    Local differential privacy at the example level: each client clips
    per-example gradients to ``clip``, adds Gaussian noise of standard
    deviation ``noise_multiplier * clip`` to each step's sum and accounts
    its own epsilon (:mod:`clientapps.privacy`). With ``epsilon`` > 0 the
    clients calibrate the multiplier to that budget themselves (their data
    sizes differ) and stop training once it is spent. Any Bouquet strategy
    works, whatever its aggregation (FedLD's principal directions, Krum,
    the median, ...), because the server only ever sees private outputs;
    the central wrappers above privatize a weighted mean instead.
    Neither zero: nothing changes.

    Raises
    ------
    TypeError
        ``strategy`` is not a Bouquet strategy.
    ValueError
        A negative multiplier or budget, ``delta`` outside (0, 1), or a
        non-positive ``clip``.

    """
    from bouquet.strategies.base import BouquetStrategy

    core = getattr(strategy, "strategy", strategy)
    if not isinstance(core, BouquetStrategy):
        raise TypeError(
            "private_training sets the config of a Bouquet strategy's messages; "
            f"got {type(strategy).__name__}."
        )
    if noise_multiplier < 0 or epsilon < 0:
        raise ValueError("dp-sgd: the noise multiplier and epsilon must be >= 0.")
    if not 0 < delta < 1:
        raise ValueError(f"dp-sgd: delta must be in (0, 1); got {delta}.")
    if clip <= 0:
        raise ValueError(f"dp-sgd: the clip must be > 0; got {clip}.")
    if noise_multiplier == 0 and epsilon == 0:
        return strategy
    core.extra_config = {
        **core.extra_config,
        wire.DP_SGD_NOISE_MULTIPLIER: float(noise_multiplier),
        wire.DP_SGD_EPSILON: float(epsilon),
        wire.DP_SGD_DELTA: float(delta),
        wire.DP_SGD_CLIP: float(clip),
    }
    return strategy
