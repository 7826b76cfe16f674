"""AFA-CD and AFA-CS: Anarchic Federated Averaging (simulated anarchy).

Paper: Yang, Zhang, Khanduri, Liu. "Anarchic Federated Learning", ICML 2022.
https://arxiv.org/abs/2108.09875 (no public code).

Workers choose when to take part and how many local steps to run, so updates
arrive computed on stale models with unequal work. Both servers use two-sided
learning rates (server ``eta``, worker ``eta_L`` = the shared ``lr`` key):

- **Worker** (recipe ``afa``): from the model ``x_{t-tau}`` it received, run
  ``K_i`` SGD steps (``K_i`` drawn by the worker, uniform in ``[k-min, k]``,
  from its own seed) and return ``G_i = (1/K_i) sum_k g_i(y_k; xi_k)``.
- **AFA-CD** (cross-device): ``x_{t+1} = x_t - eta * mean_{i in M_t} G_i``.
- **AFA-CS** (cross-silo): keep every worker's latest ``G_i``; the arrivals
  overwrite theirs; ``x_{t+1} = x_t - eta * mean_i G_i`` over the table
  (stale entries for absent workers, SAG/MIFA-like).

Anarchy is simulated in the strategy (DESIGN rule 6: deterministic by seed):
the server keeps the last ``tau-max + 1`` global models and sends each of the
m sampled nodes (m = ``fraction-train`` x N) the model of an age ``tau`` drawn
from ``(seed, round)``. ``arrival = "uniform"``: the base's uniform sample,
``tau ~ U{0..tau-max}``. ``arrival = "biased"``: the upper half of the sorted
node ids are slow: they arrive 4x less often and always with ``tau = tau-max``.

Wire protocol: ``arrays`` (the stale model), ``config`` with ``afa.k``,
``afa.k-min``, ``afa.normalize``, ``afa.version`` (the model's round), and
``local-steps = local-epochs = k`` (room for any ``K_i``). The reply's
``arrays`` is ``G_i`` (zeros for buffers); ``metrics`` add ``afa.local-steps``
(``K_i``); the round's train metrics add ``afa.staleness`` (mean age of the
models the replies were computed on). Server state: ``models`` (version ->
arrays, at most tau-max + 1 of them) and, for AFA-CS, ``table``
(partition-id -> G_i, M x |model|).

Decisions where the spec was open (the algorithms are recalled, not checked
against the paper's Algorithms 1-2):

- The server step is ``x - eta * G``; any printed ``eta * eta_L`` product is
  folded into ``eta``. With ``tau-max = 0``, ``k-min = k`` and
  ``eta = lr * k``, AFA-CD is FedAvg's unweighted mean of the local models.
- ``G_i`` is the mean of the raw loss gradients the worker stepped with (exact
  for momentum 0 and weight decay 0, the paper's setting; with momentum it is
  still the mean gradient, not the model change).
- ``normalize = false`` is the spec's baseline "FedAvg on stale models": the
  worker returns ``x_{t-tau} - y_K`` (no division by ``K_i``); with ``eta = 1``
  the server averages the deltas.
- AFA-CS averages over the workers that have reported at least once (not over
  all M with zeros), so early rounds are not shrunk toward zero.
- Tables are keyed by the reported ``partition-id`` (stable across runners).
- BatchNorm layers stay in eval mode (a gradient says nothing about running
  statistics); use ``model-norm = "group"`` or ``"none"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy

from strategies import keys
from strategies.aggregation import apply_delta, mean64, to_numpy, to_record
from strategies.base import BouquetStrategy, derive_seed, with_records
from strategies.registry import AlgorithmEntry, register

ARRIVALS = ("uniform", "biased")
SLOW_WEIGHT = 0.25  # relative arrival rate of a slow node under "biased"


def _key(name: str) -> str:
    return keys.algorithm_key("afa", name)


class AFA(BouquetStrategy, flwr_strategy.FedAvg):
    """Common server of AFA-CD and AFA-CS: stale models out, ``G_i`` back.

    Parameters
    ----------
    eta : float
        Server learning rate (``G_i`` is a gradient: a true step size).
    k, k_min : int
        Workers draw ``K_i`` uniformly in ``[k_min, k]``.
    tau_max : int
        Largest model age sent.
    arrival : str
        ``"uniform"`` or ``"biased"`` (see the module docstring).
    normalize : bool
        Workers divide by ``K_i`` (AFA) or return raw deltas (the baseline).

    """

    state_attributes: tuple[str, ...] = ("models",)

    def __init__(
        self,
        *args: Any,
        eta: float = 1.0,
        k: int = 10,
        k_min: int = 1,
        tau_max: int = 5,
        arrival: str = "uniform",
        normalize: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not 1 <= k_min <= k:
            raise ValueError(f"AFA needs 1 <= k-min <= k; got {k_min}, {k}.")
        if tau_max < 0 or arrival not in ARRIVALS:
            raise ValueError(
                f"AFA needs tau-max >= 0 and arrival in {ARRIVALS}; "
                f"got {tau_max}, {arrival!r}."
            )
        self.eta, self.k, self.k_min = float(eta), int(k), int(k_min)
        self.tau_max, self.arrival, self.normalize = int(tau_max), arrival, normalize
        self.models: dict[str, dict[str, np.ndarray]] = {}
        self.versions: dict[int, int] = {}
        """Model version (round) sent to each node this round, by node id."""

    def round_config(self, server_round: int) -> dict[str, Any]:
        return {
            _key("k"): self.k,
            _key("k-min"): self.k_min,
            _key("normalize"): self.normalize,
            keys.LOCAL_STEPS: self.k,
            keys.LOCAL_EPOCHS: self.k,
        }

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample m nodes, then send each a model of a random age."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.models[str(server_round)] = dict(self.global_arrays)
        oldest = server_round - self.tau_max
        self.models = {v: a for v, a in self.models.items() if int(v) >= oldest}
        rng = np.random.default_rng(derive_seed(self.seed, server_round, "afa"))
        nodes = sorted(m.metadata.dst_node_id for m in messages)
        slow: set[int] = set()
        if self.arrival == "biased" and messages:
            everyone = sorted(grid.get_node_ids())
            slow = set(everyone[len(everyone) // 2 :])
            weights = np.array([SLOW_WEIGHT if n in slow else 1.0 for n in everyone])
            nodes = sorted(
                int(n)
                for n in rng.choice(
                    everyone, len(messages), replace=False, p=weights / weights.sum()
                )
            )
        available = min(self.tau_max, len(self.models) - 1)
        self.versions, tailored = {}, []
        for node, template in zip(nodes, messages, strict=True):
            tau = available if node in slow else int(rng.integers(0, available + 1))
            version = server_round - tau
            self.versions[node] = version
            cfg = ConfigRecord(dict(template.content[keys.CONFIG]))
            cfg[_key("version")] = version
            records = {
                keys.CONFIG: cfg,
                keys.ARRAYS: to_record(self.models[str(version)]),
            }
            tailored.append(with_records(template, records, dst_node_id=node))
        return tailored

    def aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        gradients = {_client_key(r): to_numpy(r.content[keys.ARRAYS]) for r in replies}
        direction = self.direction(gradients)
        metrics = self.train_metrics_aggr_fn(
            [r.content for r in replies], self.weighted_by_key
        )
        ages = [
            server_round - self.versions[r.metadata.src_node_id]
            for r in replies
            if r.metadata.src_node_id in self.versions
        ]
        if ages:
            metrics[_key("staleness")] = float(np.mean(ages))
        return to_record(apply_delta(self.global_arrays, direction, -self.eta)), metrics

    def direction(
        self, gradients: Mapping[str, Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """``G_t`` from this round's ``G_i`` (by client key), float64."""
        raise NotImplementedError


class AFACD(AFA):
    """AFA-CD: the mean of the ``G_i`` that arrived this round."""

    def direction(
        self, gradients: Mapping[str, Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        return mean64(list(gradients.values()))


class AFACS(AFA):
    """AFA-CS: the mean over the table of every worker's latest ``G_i``."""

    state_attributes = ("models", "table")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.table: dict[str, dict[str, np.ndarray]] = {}

    def direction(
        self, gradients: Mapping[str, Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        self.table.update({k: dict(v) for k, v in gradients.items()})
        return mean64([self.table[k] for k in sorted(self.table)])


def _client_key(reply: Message) -> str:
    pid = reply.content[keys.METRICS].get(keys.PARTITION_ID)
    return str(int(pid)) if pid is not None else f"node-{reply.metadata.src_node_id}"


def _builder(cls: type[AFA]) -> Any:
    def build(common: Mapping[str, Any], hp: Mapping[str, Any]) -> AFA:
        return cls(
            **common,
            eta=hp["eta"],
            k=hp["k"],
            k_min=hp["k-min"],
            tau_max=hp["tau-max"],
            arrival=hp["arrival"],
            normalize=hp["normalize"],
        )

    return build


HYPERPARAMETERS = {
    "eta": 1.0,
    "k": 10,
    "k-min": 1,
    "tau-max": 5,
    "arrival": "uniform",
    "normalize": True,
}
PAPER = "Yang et al., ICML 2022, https://arxiv.org/abs/2108.09875"

register(
    AlgorithmEntry(
        "afa-cd",
        _builder(AFACD),
        client="afa",
        hyperparameters=HYPERPARAMETERS,
        paper=PAPER,
        summary="Stale, self-paced workers; server steps on the mean K-normalised G_i",
        family="participation",
    )
)
register(
    AlgorithmEntry(
        "afa-cs",
        _builder(AFACS),
        client="afa",
        hyperparameters=HYPERPARAMETERS,
        paper=PAPER,
        summary="AFA with a table of every worker's latest G_i (cross-silo)",
        family="participation",
    )
)
