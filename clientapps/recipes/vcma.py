"""VCMA client: gossip averaging with variance correction, then plain local SGD.

Tian, Al-Ars, Kitsak, Hofstee, "Vanishing Variance Problem in Fully
Decentralized Neural-Network Systems", 2024, https://arxiv.org/abs/2404.04616.
:class:`VarianceCorrectedMix` is :class:`~clientapps.recipes.dpsgd.GossipMix`
(the relay's row ``gossip.weights = [c, (1 - c)/n, ...]`` gives the
conservative average ``c theta_s + (1 - c)/n sum_j theta_j``) whose post-mix
step rescales every parameter tensor with more than one element to the target
variance, keeping its mean:
``theta_l <- (theta_avg,l - mu) sqrt((sigma_l^2 + eps)/(v + eps)) + mu``.
A node without a model and with ``vcma.init-seed`` first draws its own initial
model (the paper's independently initialised nodes).
Config keys read: ``gossip.weights``, ``gossip.train``,
``vcma.variance-correction``, ``vcma.target``, ``vcma.epsilon``,
``vcma.init-seed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from bouquet.clientapps.bounds import INT63_MAX, RATE_MAX, Bound
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun
from bouquet.clientapps.recipes.dpsgd import GossipMix, read_train, read_weights
from bouquet.clientapps.routine import PERSONAL_STATE
from bouquet.clientapps.state import has_arrays
from bouquet.tasks.models import seeded_rng
from bouquet.tasks.wire import algorithm_key

TARGETS = ("follow-others", "follow-conservative", "follow-self")

CORRECTION = Bound(algorithm_key("vcma", "variance-correction"), True)
TARGET = Bound(algorithm_key("vcma", "target"), "follow-others", choices=TARGETS)
EPSILON = Bound(algorithm_key("vcma", "epsilon"), 1e-4, 0.0, RATE_MAX)
INIT_SEED = Bound(algorithm_key("vcma", "init-seed"), -1, -1, INT63_MAX)
"""-1 (the default): keep the model the server sent."""
BOUNDS = (CORRECTION, TARGET, EPSILON, INIT_SEED)


def variance(tensor: torch.Tensor) -> float:
    """``torch.var`` (unbiased) over all elements, in float64."""
    return float(torch.var(tensor.double()))


def target_variance(
    own: float, received: Iterable[float], target: str, own_weight: float
) -> float:
    """``sigma_l^2`` of one layer: follow-others / -conservative / -self.

    ``own`` is ``Var(theta_s,l)``, ``received`` the ``Var(theta_j,l)``,
    ``own_weight`` is ``c``.
    """
    others = float(np.mean(list(received)))
    if target == "follow-others":
        return others
    if target == "follow-conservative":
        return own_weight * own + (1.0 - own_weight) * others
    if target == "follow-self":
        return own
    raise ValueError(f"Unknown VCMA target {target!r}; choose one of {TARGETS}.")


def rescale(tensor: torch.Tensor, target: float, eps: float) -> torch.Tensor:
    """``(x - mu) sqrt((target + eps)/(v + eps)) + mu`` (``x`` when ``v + eps = 0``)."""
    mu, v = tensor.mean(), variance(tensor)
    if v + eps <= 0.0:
        return tensor
    return (tensor - mu) * float(np.sqrt((target + eps) / (v + eps))) + mu


class VarianceCorrectedMix(GossipMix):
    """Gossip averaging, then VCMA's per-layer variance correction.

    Parameters
    ----------
    weights : sequence of float
        ``gossip.weights``: ``[c, (1 - c)/n, ...]`` from the VCMA relay.
    train : bool
        False: mix only.
    correct : bool
        Apply the variance correction (False: plain conservative averaging).
    target : str
        ``follow-others``, ``follow-conservative`` or ``follow-self``.
    eps : float
        ``eps`` of the rescaling factor.
    init_seed : int
        >= 0: a node without a model draws its parameters from this seed.

    """

    def __init__(
        self,
        weights: list[float],
        train: bool = True,
        correct: bool = True,
        target: str = "follow-others",
        eps: float = 1e-4,
        init_seed: int = -1,
    ) -> None:
        super().__init__(weights, train)
        if target not in TARGETS:
            raise ValueError(
                f"Unknown VCMA target {target!r}; choose one of {TARGETS}."
            )
        self.correct, self.target, self.eps = bool(correct), target, float(eps)
        self.init_seed = int(init_seed)

    def setup(self, run: LocalRun) -> None:
        held = has_arrays(run.state, *PERSONAL_STATE)
        if self.init_seed >= 0 and not held:
            with seeded_rng(self.init_seed):
                for module in run.model.modules():
                    reset = getattr(module, "reset_parameters", None)
                    if callable(reset):
                        reset()
        super().setup(run)

    def after_mix(
        self,
        run: LocalRun,
        mixed: dict[str, torch.Tensor],
        neighbors: list[dict[str, np.ndarray]],
        own_weight: float,
    ) -> dict[str, torch.Tensor]:
        """Rescale each parameter tensor (> 1 element) to its target variance."""
        if not self.correct:
            return mixed
        target = self.target if own_weight > 0 else "follow-others"
        own = run.model.state_dict()
        names = [n for n, p in run.model.named_parameters() if p.numel() > 1]
        out = dict(mixed)
        for name in names:
            received = [
                variance(torch.from_numpy(np.asarray(m[name]))) for m in neighbors
            ]
            sigma2 = target_variance(variance(own[name]), received, target, own_weight)
            out[name] = rescale(mixed[name], sigma2, self.eps)
        return out


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """Gossip averaging with variance correction, then plain local SGD."""
    return [
        VarianceCorrectedMix(
            read_weights(config),
            read_train(config),
            correct=CORRECTION.read(config),
            target=TARGET.read(config),
            eps=EPSILON.read(config),
            init_seed=INIT_SEED.read(config),
        )
    ]
