"""FedHyper: hypergradient learning-rate schedulers for FL (global and local).

Paper: Wang, Wang, Li. "FedHyper: A Universal and Robust Learning Rate Scheduler
for Federated Learning with Hypergradient Descent", ICLR 2024.
https://arxiv.org/abs/2310.03156. Official code: github.com/ATP-1010/FedHyper
(``src/federated_main.py``: server schedulers; ``src/update.py``: client one).

The hypergradient of the loss with respect to a learning rate is (minus) the
dot product of consecutive updates: the rate grows while they agree and
shrinks when they oppose. With ``x_t`` the global model and
``Delta_t = mean_i(w_i) - x_t`` the FedAvg pseudo-update, ``h`` the
hypergradient step size (1 in the code) and ``a_0 = 0``, from round 2 on:

- ``g``: ``a_t = clip(a_{t-1} + h <Delta_t, Delta_{t-1}>, a-min-g, a-max)``,
  ``x_{t+1} = x_t + (1 + a_t) Delta_t`` (global lr ``1 + a_t``).
- ``gm`` (recommended): ``a_t = clip(a_{t-1} + h <Delta_t, m_{t-1}>, a-min-gm,
  a-max)``, ``x_{t+1} = x_t + (1 + a_t) Delta_t + mu a_t m_{t-1}`` and
  ``m_t = Delta_t + mu m_{t-1}`` (``m_1 = Delta_1``, ``mu = gm-momentum``;
  not textbook momentum, kept as in the code).
- ``sl``: ``a_t`` accumulates as in ``g`` without a clip; the global step is
  FedAvg and every client of the next round trains with
  ``lr = clip(eta_0 (1 + a_t), local-lr-min, local-lr-max)``.
- ``cl``: FedAvg on the server; clients rescale their step size after every
  step (recipe ``fedhyper``, see ``clientapps/recipes/fedhyper.py``).
- ``full``: ``gm`` on the server and ``cl`` on the clients.

Round 1 is plain FedAvg in every variant (there is no previous update yet).

Wire protocol: server sends ``arrays`` and ``config``. ``sl`` overrides the
shared ``lr`` key with the scheduled rate. ``cl``/``full`` add the record
``fedhyper.global-update`` (``Delta_{t-1}`` over the trainable entries, zeros in
round 1) and the config keys ``fedhyper.client-scheduler`` (True),
``fedhyper.num-sampled`` (clients sampled this round, the code's ``N * frac``),
``fedhyper.hypergrad-lr``, ``fedhyper.gamma-max``, ``fedhyper.beta-min``,
``fedhyper.beta-max``, ``fedhyper.global-weight``. Clients return their full
local ``arrays`` and ``metrics`` (``cl`` adds ``fedhyper.beta``, the final
multiplier). Server state: ``alpha`` (``a_t``), ``previous_update``
(``Delta_{t-1}``) and ``momentum_buffer`` (``m_{t-1}``, ``gm``/``full``).
Clients keep none: the multiplier restarts at 1 every round, as in the code.

Decisions where the spec was open:

- One registry name with a ``scheduler`` hyperparameter (``g``, ``gm``, ``sl``,
  ``cl``, ``full``; default ``gm``, the paper's recommendation): the variants
  share their state and wire protocol.
- ``hypergrad-lr`` (default 1, the code's implicit value) scales every dot
  product; at 0 every variant is exactly FedAvg (``sl`` when ``eta_0`` lies in
  the lr bounds).
- Dot products and the scaled step use the trainable entries only; BatchNorm
  running statistics (state-dict names ending in ``running_mean``,
  ``running_var``, ``num_batches_tracked``) and integer entries take the plain
  mean, as ``parameters_to_vector`` does in the code.
- The mean is Flower's FedAvg (weighted by ``num-examples``), so the reduction
  is to this pack's ``fedavg``; the code averages uniformly over equal shards.
- ``sl``: the code resets every client's lr to ``eta_0`` at the start of each
  round, which makes its scheduled rate dead code; we apply the intended rule
  (the rate from ``a_t`` is used in round ``t + 1``), and clip from round 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy

from strategies import keys
from strategies.aggregation import cast_like, to_numpy, to_record
from strategies.base import BouquetStrategy, with_records
from strategies.registry import AlgorithmEntry, register

NAME = "fedhyper"
SCHEDULERS = ("g", "gm", "sl", "cl", "full")
GLOBAL_UPDATE = keys.algorithm_key(NAME, "global-update")
"""ArrayRecord sent to ``cl`` clients: the previous FedAvg update."""
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

NDArrays = dict[str, np.ndarray]


def trainable_keys(arrays: Mapping[str, np.ndarray]) -> list[str]:
    """State-dict entries that are trainable parameters (not BN statistics)."""
    return [
        k
        for k, v in arrays.items()
        if v.dtype.kind == "f" and not k.endswith(BUFFER_SUFFIXES)
    ]


def dot(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """``<a, b>`` over the keys of ``a``, flattened, in float64."""
    return float(sum(np.dot(a[k].ravel().astype(np.float64), b[k].ravel()) for k in a))


class FedHyper(BouquetStrategy, flwr_strategy.FedAvg):
    """FedHyper's server (see the module docstring for the rules).

    Parameters
    ----------
    scheduler : str
        ``"g"``, ``"gm"``, ``"sl"``, ``"cl"`` or ``"full"``.
    hypergrad_lr : float
        Step size on the hypergradient (dot product); 0 gives FedAvg.
    a_min_g, a_min_gm, a_max : float
        Clip of ``a_t`` (global lr ``1 + a_t``) for ``g`` and ``gm``/``full``.
    gm_momentum : float
        ``mu`` of ``gm``.
    local_lr_min, local_lr_max : float
        Clip of the local lr scheduled by ``sl``.
    gamma_max, beta_min, beta_max, global_weight : float
        The client scheduler's constants (sent to ``cl``/``full`` clients).

    """

    state_attributes = ("alpha", "previous_update", "momentum_buffer")

    def __init__(
        self,
        *args: Any,
        scheduler: str = "gm",
        hypergrad_lr: float = 1.0,
        a_min_g: float = -0.8,
        a_min_gm: float = -0.2,
        a_max: float = 4.0,
        gm_momentum: float = 0.9,
        local_lr_min: float = 0.001,
        local_lr_max: float = 0.1,
        gamma_max: float = 1.1,
        beta_min: float = 0.1,
        beta_max: float = 10.0,
        global_weight: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if scheduler not in SCHEDULERS:
            raise ValueError(
                f"fedhyper.scheduler must be one of {SCHEDULERS}; got {scheduler!r}."
            )
        if hypergrad_lr < 0 or a_max < max(a_min_g, a_min_gm):
            raise ValueError("fedhyper: need hypergrad-lr >= 0 and a-max >= a-min.")
        if not 0 < local_lr_min <= local_lr_max or not 0 < beta_min <= beta_max:
            raise ValueError("fedhyper: lr and beta bounds must be 0 < min <= max.")
        self.scheduler = scheduler
        self.hypergrad_lr = float(hypergrad_lr)
        low = a_min_g if scheduler == "g" else a_min_gm
        self.a_bounds = (float(low), float(a_max))
        self.gm_momentum = float(gm_momentum)
        self.local_lr_bounds = (float(local_lr_min), float(local_lr_max))
        self.client_constants = {
            "gamma-max": float(gamma_max),
            "beta-min": float(beta_min),
            "beta-max": float(beta_max),
            "global-weight": float(global_weight),
        }
        self.eta_0 = 0.0  # the run's local lr, read from each round's config
        self.alpha = 0.0
        self.previous_update: NDArrays | None = None
        self.momentum_buffer: NDArrays | None = None

    @property
    def client_scheduler(self) -> bool:
        """Whether clients run the ``cl`` scheduler."""
        return self.scheduler in ("cl", "full")

    @property
    def global_lr(self) -> float:
        """The global learning rate ``1 + a_t`` (1 for ``sl``/``cl``)."""
        return 1.0 + self.alpha if self.scheduler in ("g", "gm", "full") else 1.0

    def local_lr(self, eta_0: float) -> float:
        """``sl``'s local rate for the next round, from the initial rate."""
        return float(np.clip(eta_0 * (1.0 + self.alpha), *self.local_lr_bounds))

    # ----------------------------------------------------------- to clients --
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Sample nodes; add the scheduled lr or the client scheduler's inputs."""
        # The caller passes the same record every round: copy it, so that the
        # initial lr eta_0 stays readable and our values never leak into it.
        config = ConfigRecord(dict(config))
        self.eta_0 = float(config.get(keys.LR, 0.0))
        if self.scheduler == "sl":
            config[keys.LR] = self.local_lr(self.eta_0)
        if self.client_scheduler:
            config[keys.algorithm_key(NAME, "client-scheduler")] = True
            config[keys.algorithm_key(NAME, "hypergrad-lr")] = self.hypergrad_lr
            for key, value in self.client_constants.items():
                config[keys.algorithm_key(NAME, key)] = value
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if not self.client_scheduler or not messages:
            return messages
        # Only known after sampling: the cohort size (the code's N * frac).
        config = ConfigRecord(dict(messages[0].content[keys.CONFIG]))
        config[keys.algorithm_key(NAME, "num-sampled")] = len(messages)
        extra = {keys.CONFIG: config, GLOBAL_UPDATE: self.global_update_record()}
        return [with_records(msg, extra) for msg in messages]

    def global_update_record(self) -> ArrayRecord:
        """``Delta_{t-1}`` over the trainable entries (zeros in round 1)."""
        sent = self.global_arrays
        previous = self.previous_update or {}
        return to_record(
            {
                k: cast_like(previous.get(k, np.zeros(sent[k].shape)), sent[k])
                for k in trainable_keys(sent)
            }
        )

    # ---------------------------------------------------------- aggregation --
    def aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean_record, metrics = super().aggregate_valid(server_round, replies)
        if mean_record is None:
            return None, metrics
        new = self.step(self.global_arrays, to_numpy(mean_record))
        if metrics is not None:
            metrics[keys.algorithm_key(NAME, "global-lr")] = self.global_lr
            metrics[keys.algorithm_key(NAME, "alpha")] = self.alpha
            if self.scheduler == "sl":  # the rate the next round will use
                metrics[keys.algorithm_key(NAME, "local-lr")] = self.local_lr(
                    self.eta_0
                )
        return to_record(new), metrics

    def step(self, reference: Mapping[str, np.ndarray], mean: NDArrays) -> NDArrays:
        """One server round from the FedAvg mean; updates the schedule's state.

        Parameters
        ----------
        reference : mapping
            The global arrays ``x_t`` sent this round.
        mean : dict
            The FedAvg mean of the replies.

        Returns
        -------
        dict
            ``x_{t+1}``; entries that are not trainable are the plain mean.

        """
        names = trainable_keys(reference)
        delta = {
            k: mean[k].astype(np.float64) - reference[k].astype(np.float64)
            for k in names
        }
        extra: NDArrays = {}
        previous, momentum = self.previous_update, self.momentum_buffer
        h = self.hypergrad_lr
        if self.scheduler in ("gm", "full"):
            if momentum is not None:
                self.alpha = float(
                    np.clip(self.alpha + h * dot(delta, momentum), *self.a_bounds)
                )
                a, mu = self.alpha, self.gm_momentum
                extra = {k: a * delta[k] + mu * a * momentum[k] for k in names}
                self.momentum_buffer = {k: delta[k] + mu * momentum[k] for k in names}
            else:
                self.momentum_buffer = delta
        elif previous is not None and self.scheduler in ("g", "sl"):
            self.alpha += h * dot(delta, previous)
            if self.scheduler == "g":
                self.alpha = float(np.clip(self.alpha, *self.a_bounds))
                extra = {k: self.alpha * delta[k] for k in names}
        self.previous_update = delta
        # x_t + (1 + a) Delta written as mean + a Delta (+ mu a m), as in the
        # code: exactly the FedAvg mean while a = 0.
        return {
            k: cast_like(mean[k].astype(np.float64) + extra[k], reference[k])
            if k in extra
            else cast_like(mean[k], reference[k])
            for k in mean
        }


def _build(common: Mapping[str, Any], hp: Mapping[str, Any]) -> FedHyper:
    return FedHyper(**common, **{k.replace("-", "_"): v for k, v in hp.items()})


HYPERPARAMETERS: dict[str, Any] = {
    "scheduler": "gm",
    "hypergrad-lr": 1.0,
    "a-min-g": -0.8,
    "a-min-gm": -0.2,
    "a-max": 4.0,
    "gm-momentum": 0.9,
    "local-lr-min": 0.001,
    "local-lr-max": 0.1,
    "gamma-max": 1.1,
    "beta-min": 0.1,
    "beta-max": 10.0,
    "global-weight": 0.1,
}

register(
    AlgorithmEntry(
        NAME,
        _build,
        client=NAME,
        hyperparameters=HYPERPARAMETERS,
        paper="Wang et al., ICLR 2024, https://arxiv.org/abs/2310.03156",
        summary="Hypergradient schedulers of the global and local learning rates",
        family="optimization",
    )
)
