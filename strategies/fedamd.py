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

Miners' models are aggregated by the chain (uniform weights, mean of
``y_K^i - x_t``, a step of ``eta_g``); anchors only refresh the table.

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

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord

from bouquet.strategies.aggregation import to_record, weighted_mean
from bouquet.strategies.base import BouquetStrategy, Record
from bouquet.strategies.context import NDArrays, RoundContext
from bouquet.strategies.pieces import Aggregator, ServerSGD, Uniform, WeightedMean
from bouquet.strategies.registry import register
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire
from bouquet.tasks.params import Param

ROLE = "fedamd.role"
DIRECTION = "fedamd.direction"
ANCHOR, MINER = "anchor", "miner"


def draw_roles(
    num: int, p: float, server_round: int, rng: np.random.Generator
) -> list[str]:
    """Roles of ``num`` participants in ``server_round`` (1-based, after init)."""
    if p >= 1.0:
        every = (server_round - 1) % int(p) == 0
        return [ANCHOR if every else MINER] * num
    return [ANCHOR if u < p else MINER for u in rng.random(num)]


def client_key(reply: ClientReply) -> str:
    """A table key that is the same in every engine: the partition id."""
    return str(reply.partition) if reply.partition is not None else f"node-{reply.node}"


@register
class FedAMD(BouquetStrategy):
    """FedAMD's server: anchor table, miner averaging (see the module docstring)."""

    name = "fedamd"
    routine = "fedamd"
    paper = "Wu et al., ICML 2023, https://arxiv.org/abs/2206.05891"
    tagline = "Anchor clients refresh full-batch gradients; miners run SARAH steps"
    family = "participation"
    params = (
        Param("p", 0.2, ">= 0", "anchor probability, or an integer period >= 2"),
        Param("k", 10, ">= 1", "miner local steps K"),
        Param("eta-g", 1.0, "> 0", "global learning rate"),
    )

    def validate(self) -> None:
        """``p`` is a probability below 1 or an integer period."""
        if not (self.p < 1.0 or (self.p >= 2 and float(self.p).is_integer())):
            raise ValueError(
                f"fedamd.p must be in [0, 1) or an integer >= 2; got {self.p}."
            )

    def init_state(self) -> dict[str, Any]:
        return {"table": {}}

    def make_aggregator(self) -> Aggregator:
        """The miners' uniform mean, a step of eta_g."""
        return Aggregator(Uniform(), WeightedMean(), ServerSGD(self.eta_g))

    def direction(self) -> NDArrays:
        """``v_t``: the mean of the stored anchor gradients."""
        table = self.state["table"]
        return weighted_mean([table[key] for key in sorted(table)])

    def recipients(self, ctx: RoundContext) -> dict[int, dict[str, Record]]:
        """Sample (all nodes while the table is empty), then assign roles."""
        init = not self.state["table"]
        fraction = 1.0 if init else self.fraction_train
        nodes = sorted(self.sample(ctx, fraction, self.min_train_nodes))
        rng = np.random.default_rng(
            wire.derive_seed(self.seed, ctx.server_round, "fedamd")
        )
        roles = (
            [ANCHOR] * len(nodes)
            if init
            else draw_roles(len(nodes), self.p, ctx.server_round, rng)
        )
        direction = None if init or MINER not in roles else to_record(self.direction())
        plan: dict[int, dict[str, Record]] = {}
        for node, role in zip(nodes, roles, strict=True):
            ctx.per_node[node] = {"role": role}
            config = ConfigRecord({**ctx.config, ROLE: role})
            records: dict[str, Record] = {wire.CONFIG: config}
            if role == ANCHOR:
                config[wire.LOCAL_EPOCHS], config[wire.LOCAL_STEPS] = 1, 0
            else:
                config[wire.LOCAL_EPOCHS] = config[wire.LOCAL_STEPS] = self.k
                records[DIRECTION] = direction
            plan[node] = records
        return plan

    def dp_problem(self) -> str:
        """The anchors' table holds raw gradients, sent back to every miner."""
        return "its table of anchor gradients holds the raw replies"

    def aggregate(self, replies: Sequence[ClientReply], ctx: RoundContext) -> NDArrays:
        """Anchors refresh the table; ``x - eta_g mean_i (x - y_i)`` over the miners."""
        miners = []
        for reply in replies:
            if ctx.per_node.get(reply.node, {}).get("role") == ANCHOR:
                self.state["table"] = {
                    **self.state["table"],
                    client_key(reply): reply.arrays,
                }
            else:
                miners.append(reply)
        if not miners:
            return dict(ctx.arrays)
        return super().aggregate(miners, ctx)
