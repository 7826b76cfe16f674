"""EF21 client: local training, then a compressed step of its gradient estimate.

Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better,
and Practically Faster Error Feedback", NeurIPS 2021,
https://arxiv.org/abs/2106.05203 (as restated by Richtarik, Gasanov,
Burlachenko, "Error Feedback Reloaded", ICLR 2024,
https://arxiv.org/abs/2402.10774). See ``strategies/ef21.py`` for the rules.

After the loop's local training from ``x^t`` to ``y_i``, :class:`EF21Uplink`
takes the node's update ``v_i = y_i - x^t`` (one full-batch SGD step: exactly
``-lr grad f_i(x^t)``), and replies with ``c_i = C(v_i - g_i)``
*compressed* (the payload of :mod:`tasks.compression` is the reply's
``arrays`` record) while keeping ``g_i <- g_i + C(v_i - g_i)`` in
``Context.state`` (``ef21.g``, zero before the node's first round). Config
keys read: ``ef21.compressor``, ``ef21.k``, ``ef21.levels``,
``ef21.smoothness``.

EF21-W (Richtarik, Gasanov, Burlachenko, ICLR 2024,
https://arxiv.org/abs/2402.10774; ``ef21.smoothness`` other than ``none``):
the node tracks ``v_i / L_i`` instead of ``v_i`` (``c'_i = C(v_i / L_i -
h_i)``, ``h_i <- h_i + c'_i``) and reports ``L_i`` as the metric
``ef21.smoothness``; the server adds ``L_i c'_i / N`` (why ``1/L_i`` is the
paper's ``1/(n w_i)`` up to the common factor ``L_AM``: ``strategies/ef21.py``).
``L_i`` is ``1`` (``uniform``: EF21 exactly) or the logistic-loss bound
:func:`logistic_smoothness` of the node's whole local set (``logistic``),
computed once and kept in ``Context.state`` (``ef21.L``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from bouquet.clientapps.bounds import Bound
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.state import array_record, load_arrays, save_arrays
from bouquet.tasks import compression, wire

NAMESPACE = "ef21"
COMPRESSOR = Bound(
    wire.algorithm_key(NAMESPACE, "compressor"), "topk", choices=compression.NAMES
)
K = Bound(wire.algorithm_key(NAMESPACE, "k"), 1, 1, 2**62)
LEVELS = Bound(wire.algorithm_key(NAMESPACE, "levels"), 16, 1, compression.MAX_LEVELS)
SMOOTHNESS = Bound(
    wire.algorithm_key(NAMESPACE, "smoothness"),
    "none",
    choices=("none", "uniform", "logistic"),
)
BOUNDS = (COMPRESSOR, K, LEVELS, SMOOTHNESS)


def logistic_smoothness(x: torch.Tensor, weight_decay: float = 0.0) -> float:
    """``lambda_max(A^T A) / (4 m) + weight_decay``: logistic loss's ``L_i``.

    ``A`` is ``x`` flattened to ``(m, d)`` with a column of ones appended (the
    bias): the Hessian of the mean logistic loss of a linear model is at
    most ``A^T A / (4 m)`` (the sigmoid's derivative is at most 1/4), and L2
    regularisation adds its coefficient (Richtarik, Gasanov, Burlachenko,
    ICLR 2024, https://arxiv.org/abs/2402.10774, experiments; the spec's
    ``L_i``). The eigenvalue is taken of the smaller Gram matrix.
    """
    a = x.detach().reshape(len(x), -1).to(torch.float64).cpu().numpy()
    a = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    gram = a.T @ a if a.shape[1] <= a.shape[0] else a @ a.T
    top = float(np.linalg.eigvalsh(gram)[-1])
    return top / (4.0 * len(a)) + float(weight_decay)


def shared_entries(run: LocalRun) -> dict[str, np.ndarray]:
    """The model's entries that leave the node, as NumPy arrays.

    Not the personal ones, nor a fine-tuned model's frozen backbone.
    """
    return {
        k: v.detach().cpu().numpy()
        for k, v in run.model.state_dict().items()
        if k not in run.personal and k not in run.frozen
    }


class LocalUpdate(Hook):
    """A hook whose reply is built from the local update ``v = y - x``, flat.

    ``setup`` copies the shared entries before training;
    :meth:`local_update` gives ``v`` over the compressed keys (EF21, EControl,
    FedZip encode it, each its own way, in ``finish``).
    """

    def setup(self, run: LocalRun) -> None:
        self._start = {
            k: np.array(v, copy=True) for k, v in shared_entries(run).items()
        }

    def local_update(self, run: LocalRun) -> np.ndarray:
        """``y - x`` over :func:`tasks.compression.compressed_keys`, flattened."""
        end = shared_entries(run)
        keys = compression.compressed_keys(end)
        return compression.flatten(end, keys) - compression.flatten(self._start, keys)


class EF21Uplink(LocalUpdate):
    """Reply with ``C(v_i - g_i)`` (compressed); keep ``g_i`` in client state.

    Parameters
    ----------
    compressor : tasks.compression.Compressor
        A contractive compressor; the server decodes with the same one.
    smoothness : str
        ``none`` (EF21), ``uniform`` (EF21-W with ``L_i = 1``) or ``logistic``
        (EF21-W with :func:`logistic_smoothness` of the local set).

    """

    def __init__(
        self, compressor: compression.Compressor, smoothness: str = "none"
    ) -> None:
        self.compressor = compressor
        self.smoothness = smoothness

    def smoothness_of(self, run: LocalRun) -> float:
        """This node's ``L_i`` (computed once, then read from its state)."""
        if self.smoothness == "uniform":
            return 1.0
        saved = (load_arrays(run.state, NAMESPACE, "L") or {}).get("L")
        if saved is not None and saved.shape == (1,):
            return float(saved[0])
        value = logistic_smoothness(run.data[0], run.settings.weight_decay)
        save_arrays(run.state, NAMESPACE, "L", {"L": np.array([value])})
        return value

    def finish(self, run: LocalRun) -> None:
        v = self.local_update(run)
        if self.smoothness != "none":  # EF21-W: track v_i / L_i, report L_i
            smoothness = self.smoothness_of(run)
            v = v / smoothness
            run.metrics[SMOOTHNESS.key] = smoothness
        saved = (load_arrays(run.state, NAMESPACE, "g") or {}).get("g")
        g = saved if saved is not None and saved.shape == v.shape else np.zeros_like(v)
        # The node's stream (seeded by seed, round, partition) draws Rand-k / QSGD.
        seed = int(torch.randint(0, 2**62, (1,), generator=run.generator))
        payload = self.compressor.encode(v - g, np.random.default_rng(seed))
        g = g + self.compressor.decode(payload, v.size)
        save_arrays(run.state, NAMESPACE, "g", {"g": g})
        run.reply_records[wire.ARRAYS] = array_record(payload)


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the compressed error-feedback reply."""
    made = compression.make_compressor(
        COMPRESSOR.read(config), K.read(config), LEVELS.read(config)
    )
    return [EF21Uplink(compression.contractive(made), SMOOTHNESS.read(config))]
