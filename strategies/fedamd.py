"""FedAMD: anchor sampling with anchor (large-batch) and miner (SARAH) clients.

Paper: Wu, Guo, Qu, He, Liu, Gao. "Anchor Sampling for Federated Learning with
Partial Client Participation", ICML 2023. https://arxiv.org/abs/2206.05891
Official code: github.com/HarliWu/FedAMD (``algo/fedamd.py``, ``main_fmnist.py``).

- **Server.** It keeps a table ``g_i`` of every client's latest large-batch
  gradient. Round t sends the sampled clients ``x_t``; each participant is an
  anchor with probability ``p`` (or, for an integer ``p >= 2``, every
  participant is an anchor in rounds with ``(t - 1) mod p == 0``), else a miner.
  Anchors overwrite their ``g_i``. If any miner replied,
  ``x_{t+1} = x_t - eta_g * mean_miners (x_t - y_K^i)`` (unweighted), else
  ``x_{t+1} = x_t``.
- **Client** (recipe ``fedamd``). Anchor: ``g_i = grad f_i(x_t)`` over the
  whole local training set, no step. Miner: ``y_0 = x_t``, ``d_0 = v_t =
  mean_i g_i``; for each step k with batch ``B_k``:
  ``d_k = d_{k-1} + grad f_i(y_k; B_k) - grad f_i(y_{k-1}; B_k)`` (same batch,
  ``y_{-1} = y_0``), ``y_{k+1} = y_k - eta d_k``; K steps.

Wire protocol: every train message carries ``arrays`` (x_t) and ``config`` with
``fedamd.role`` (``"anchor"`` | ``"miner"``). Anchors get ``local-epochs = 1``,
``local-steps = 0`` and reply with ``arrays`` = their gradient (zeros for
buffers). Miners get ``local-steps = local-epochs = K`` and the extra
ArrayRecord ``fedamd.direction`` (v_t, shaped like the model) and reply with
their local model y_K. Both report ``num-examples`` and ``train-loss``. Server
state: ``table`` (partition-id -> gradient arrays), i.e. N x |model| memory:
fine for N <= 100 small models. Clients keep no state.

Decisions where the spec was open:

- Round 1 initialises the table: every node is an anchor (the official code's
  pass over all clients before training), so ``num-server-rounds`` includes it.
- ``v_t`` averages the entries present (all N after round 1; a node whose
  first gradient was dropped is absent until it reports).
- The table is keyed by the ``partition-id`` clients report (stable across the
  in-process runner, Ray and deployment), falling back to the node id.
- BatchNorm layers stay in eval mode on both roles (official code), so running
  statistics never change; prefer ``model-norm = "group"`` or ``"none"``.
- Miners update ``y`` directly (``y -= eta d``): the recursion is the optimizer,
  so the shared ``momentum`` / ``weight-decay`` keys do not apply to them.
- The anchor's large batch is the full local set (official ``fullbsz = 0``),
  accumulated batch by batch (exact mean gradient, bounded memory). The
  official ``lr_global_divided`` option (Delta / K) is not offered.
- Roles are drawn by a stream derived from ``(seed, round)`` over the sampled
  nodes in sorted order, so runs replay.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy

from strategies import keys
from strategies.aggregation import (
    apply_delta,
    mean64,
    to_numpy,
    to_record,
    weighted_mean,
)
from strategies.base import BouquetStrategy, derive_seed, with_records
from strategies.registry import AlgorithmEntry, register

ROLE = keys.algorithm_key("fedamd", "role")
DIRECTION = keys.algorithm_key("fedamd", "direction")
ANCHOR, MINER = "anchor", "miner"


def draw_roles(
    num: int, p: float, server_round: int, rng: np.random.Generator
) -> list[str]:
    """Roles of ``num`` participants in ``server_round`` (1-based, after init)."""
    if p >= 1.0:
        every = (server_round - 1) % int(p) == 0
        return [ANCHOR if every else MINER] * num
    return [ANCHOR if u < p else MINER for u in rng.random(num)]


class FedAMD(BouquetStrategy, flwr_strategy.FedAvg):
    """FedAMD's server: anchor table, miner averaging (see the module docstring).

    Parameters
    ----------
    p : float
        Anchor probability in [0, 1), or an integer period >= 2.
    k : int
        Local steps of a miner (the paper's K).
    eta_g : float
        Global learning rate on the mean miner update.

    """

    state_attributes = ("table",)

    def __init__(
        self, *args: Any, p: float = 0.2, k: int = 10, eta_g: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        if not (0.0 <= p < 1.0 or (p >= 2 and float(p).is_integer())):
            raise ValueError(f"fedamd.p must be in [0, 1) or an integer >= 2; got {p}.")
        if k < 1:
            raise ValueError(f"fedamd.k must be >= 1; got {k}.")
        self.p, self.k, self.eta_g = float(p), int(k), float(eta_g)
        self.table: dict[str, dict[str, np.ndarray]] = {}
        self.roles: dict[int, str] = {}
        """Role of each node sampled this round (by node id)."""

    def direction(self) -> dict[str, np.ndarray]:
        """``v_t``: the mean of the stored anchor gradients."""
        return weighted_mean([self.table[key] for key in sorted(self.table)])

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample (all nodes while the table is empty), then assign roles."""
        init = not self.table
        fraction = self.fraction_train
        if init:
            self.fraction_train = 1.0  # every node fills its table entry first
        try:
            messages = list(super().configure_train(server_round, arrays, config, grid))
        finally:
            self.fraction_train = fraction
        messages.sort(key=lambda m: m.metadata.dst_node_id)
        rng = np.random.default_rng(derive_seed(self.seed, server_round, "fedamd"))
        roles = (
            [ANCHOR] * len(messages)
            if init
            else draw_roles(len(messages), self.p, server_round, rng)
        )
        direction = None if init or MINER not in roles else to_record(self.direction())
        self.roles, tailored = {}, []
        for msg, role in zip(messages, roles, strict=True):
            self.roles[msg.metadata.dst_node_id] = role
            cfg = ConfigRecord(dict(msg.content[keys.CONFIG]))
            cfg[ROLE] = role
            records: dict[str, Any] = {keys.CONFIG: cfg}
            if role == ANCHOR:
                cfg[keys.LOCAL_EPOCHS], cfg[keys.LOCAL_STEPS] = 1, 0
            else:
                cfg[keys.LOCAL_EPOCHS] = cfg[keys.LOCAL_STEPS] = self.k
                records[DIRECTION] = direction
            tailored.append(with_records(msg, records))
        return tailored

    def aggregate_valid(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        miners = []
        for reply in replies:
            arrays = to_numpy(reply.content[keys.ARRAYS])
            node = reply.metadata.src_node_id
            if self.roles.get(node) == ANCHOR:
                self.table[_client_key(reply)] = arrays
            else:
                miners.append(arrays)
        metrics = self.train_metrics_aggr_fn(
            [r.content for r in replies], self.weighted_by_key
        )
        return to_record(self.server_update(self.global_arrays, miners)), metrics

    def server_update(
        self, x: Mapping[str, np.ndarray], miners: list[Mapping[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """``x - eta_g * mean_i (x - y_i)`` over the miners; ``x`` if there are none."""
        if not miners:
            return dict(x)
        step = mean64(miners, reference=x)  # mean (y_i - x) in float64
        return apply_delta(x, step, self.eta_g)


def _client_key(reply: Message) -> str:
    pid = reply.content[keys.METRICS].get(keys.PARTITION_ID)
    return str(int(pid)) if pid is not None else f"node-{reply.metadata.src_node_id}"


def _build(common: Mapping[str, Any], hp: Mapping[str, Any]) -> FedAMD:
    return FedAMD(**common, p=hp["p"], k=hp["k"], eta_g=hp["eta-g"])


register(
    AlgorithmEntry(
        "fedamd",
        _build,
        client="fedamd",
        hyperparameters={"p": 0.2, "k": 10, "eta-g": 1.0},
        paper="Wu et al., ICML 2023, https://arxiv.org/abs/2206.05891",
        summary="Anchor clients refresh full-batch gradients; miners run SARAH steps",
        family="participation",
    )
)
