"""Hooks: the only way an algorithm changes local training (architecture rule 2).

A hook is a small object with no-op defaults; an algorithm's recipe is a list
of hooks that :func:`clientapps.loop.train_local` calls at fixed points:

======================  ==========================================================
``setup(run)``          before the first step: read client state / extra records
``before_training``     ``(run)``: a phase over the whole local set (``run.data``):
                        score or select examples (``run.select(indices)``)
``order(run, n)``       the example order of an epoch (curriculum); None = shuffle
``transform_batch``     ``(run, x, y) -> (x, y)`` (augmentation, label noise)
``loss``                ``(run, loss, logits, x, y) -> loss``: add a term
``before_step(run)``    gradients are ready: correct them (SCAFFOLD, clipping)
``step``                ``(run, closure, default_step) -> loss``: take over the
                        step when it must re-evaluate the loss (SAM, FedSpeed),
                        or train on other inputs, ``closure(x, y)``, built from
                        the batch in ``run.batch`` (adversarial training, FAL);
                        at most one hook of a recipe may do this
``after_step(run)``     after the optimizer step
``finish(run)``         after the last step: write client state, add reply records
======================  ==========================================================

Hooks read their hyperparameters from the message config (``run.config``), never
from the run config, so the server can schedule them per round; recipes read
them through bounds (:mod:`clientapps.bounds`), and a hook names the records it
reads in ``reads`` so that the loop checks them before training. A hook that
sets ``needs_features = True`` finds the classifier's input of the batch in
``run.features`` (models expose features as well as logits). A hook ends
local training early by setting ``run.stop``; it replaces the reply's model by
putting an ArrayRecord under ``"arrays"`` in ``run.reply_records`` (e.g. a
gradient instead of weights, shaped like the model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord

from bouquet.clientapps.state import array_record
from bouquet.tasks import wire

if TYPE_CHECKING:
    from bouquet.clientapps.loop import LocalRun


def parameter_names(run: LocalRun) -> list[str]:
    """State-dict names of ``run.parameters``, aligned with them."""
    ids = {id(p): name for name, p in run.model.named_parameters()}
    return [ids[id(p)] for p in run.parameters]


def model_shaped_record(
    run: LocalRun, values: Mapping[str, torch.Tensor | np.ndarray]
) -> ArrayRecord:
    """Every shared state-dict entry: ``values`` where given, zeros elsewhere.

    Each entry keeps the model's dtype; personal entries and the frozen ones
    the message left out (a fine-tuned backbone) are left out. For
    replies that are not the model (a gradient, a control-variate change) but
    must validate against the arrays the server sent.
    """
    arrays = {}
    for name, entry in run.model.state_dict().items():
        if name in run.personal or name in run.frozen:
            continue
        like = entry.detach().cpu().numpy()
        value = values.get(name)
        if value is None:
            arrays[name] = np.zeros_like(like)
        else:
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            arrays[name] = np.asarray(value).astype(like.dtype, copy=False)
    return array_record(arrays)


class Hook:
    """Base class: every method is a no-op, override what you need."""

    needs_features: bool = False
    """Set to True to find the classifier's input in ``run.features``."""
    fixed_optimizer: bool = False
    """Set to True where the hook's math assumes the optimizer the config names
    (its ``lr`` and ``momentum``): a user's optimizer factory is then refused."""
    reads: tuple[str, ...] = ()
    """Records of the message this hook reads from ``run.incoming``: each one
    present is checked against the model before any hook runs."""

    def setup(self, run: LocalRun) -> None:
        """Prepare before the first step."""

    def before_training(self, run: LocalRun) -> None:
        """A phase over the whole local set, after ``setup`` (score, select)."""

    def order(self, run: LocalRun, num_examples: int) -> torch.Tensor | None:
        """Example order for ``run.epoch``; ``None`` leaves the seeded shuffle."""
        return None

    def epoch_batches(
        self, run: LocalRun, num_examples: int
    ) -> list[torch.Tensor] | None:
        """The epoch's batches as index tensors (of any size, empty included).

        ``None`` leaves the ``order`` cut into ``batch-size`` pieces; a hook
        that samples its own batches (DP-SGD's Poisson sampling) returns them.
        """
        return None

    def transform_batch(
        self, run: LocalRun, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Change a batch before the forward pass."""
        return x, y

    def loss(
        self,
        run: LocalRun,
        loss: torch.Tensor,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        """Return the loss to minimise (add a term to ``loss``)."""
        return loss

    def before_step(self, run: LocalRun) -> None:
        """Gradients are in ``p.grad``; modify them in place."""

    def step(
        self,
        run: LocalRun,
        closure: Callable[[], torch.Tensor],
        default_step: Callable[[], None],
    ) -> torch.Tensor | None:
        """Take over the step; return the loss, or None to leave it to the loop."""
        return None

    def after_step(self, run: LocalRun) -> None:
        """After the optimizer step."""

    def finish(self, run: LocalRun) -> None:
        """After the last step."""


class ProximalTerm(Hook):
    """FedProx's proximal term ``mu/2 * ||w - w_global||^2`` (Li et al. 2020, eq. 2).

    Parameters
    ----------
    mu : float
        The paper's mu; 0 leaves the loss unchanged.

    """

    def __init__(self, mu: float) -> None:
        self.mu = float(mu)

    def loss(
        self,
        run: LocalRun,
        loss: torch.Tensor,
        logits: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        if self.mu == 0.0:
            return loss
        squared = sum(
            (p - g).pow(2).sum()
            for p, g in zip(run.parameters, run.global_parameters, strict=True)
        )
        return loss + 0.5 * self.mu * squared


class FreezeBatchNorm(Hook):
    """Keeps BatchNorm layers in eval mode: running statistics are not updated.

    The layers' affine weights still train; normalisation uses the statistics
    the client received. For algorithms whose replies are gradients (FedAMD,
    AFA), which have nothing to say about running statistics.
    """

    def setup(self, run: LocalRun) -> None:
        for module in run.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


class SharpnessAwareStep(Hook):
    """A SAM-style step: the gradient at the point one ascent step away.

    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021, https://arxiv.org/abs/2010.01412. On the same
    batch: ``g1 = grad f(w)``, ``e = rho * g1 / (||g1|| + 1e-7)``,
    ``g2 = grad f(w + e)``; the step then uses ``(1 - alpha) g1 + alpha g2``
    (FedSpeed's merged gradient; ``alpha = 1`` is plain SAM) through the loop's
    default step, so the ``before_step`` hooks still see (and may correct) it.

    Parameters
    ----------
    rho : float
        Perturbation radius; 0 takes the plain step with one forward/backward.
    alpha : float
        Weight of the perturbed gradient.

    Notes
    -----
    Both passes run in train mode, so BatchNorm running statistics are updated
    twice per step (as in the reference implementations); prefer GroupNorm.
    The reported loss is the first pass's (at the unperturbed weights).

    """

    def __init__(self, rho: float, alpha: float = 1.0) -> None:
        if rho < 0:
            raise ValueError(f"SAM radius rho must be >= 0; got {rho}.")
        self.rho = float(rho)
        self.alpha = float(alpha)

    def step(
        self,
        run: LocalRun,
        closure: Callable[[], torch.Tensor],
        default_step: Callable[[], None],
    ) -> torch.Tensor | None:
        loss = closure()
        if self.rho == 0.0:
            default_step()
            return loss
        params = [p for p in run.parameters if p.grad is not None]
        first = [p.grad.detach().clone() for p in params] if self.alpha != 1 else []
        with torch.no_grad():
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
            )
            scale = self.rho / (norm + 1e-7)
            ascent = [p.grad * scale for p in params]
            for p, e in zip(params, ascent, strict=True):
                p.add_(e)
        closure()
        with torch.no_grad():
            for p, e in zip(params, ascent, strict=True):
                p.sub_(e)
            if first:
                for p, g1 in zip(params, first, strict=True):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.mul_(self.alpha).add_(g1, alpha=1.0 - self.alpha)
        default_step()
        return loss


class ClipGradNorm(Hook):
    """Clip the global gradient norm at ``max_norm`` (0 or less: no clipping).

    Put it after the hooks whose ``before_step`` adds to the gradient, when the
    clip must cover those terms too (hooks run in recipe order).
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm = float(max_norm)

    def before_step(self, run: LocalRun) -> None:
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(run.parameters, self.max_norm)


class ReturnDelta(Hook):
    """Reply with the update ``Delta = theta_local - theta_received`` (every entry).

    For servers that apply updates to a model that may have moved on since
    this client received its copy (asynchronous FL): with the delta the server
    never needs to keep old models. Integer buffers (BatchNorm's
    ``num_batches_tracked``) are differenced in their own dtype.
    """

    def setup(self, run: LocalRun) -> None:
        self._start = {k: v.detach().clone() for k, v in run.model.state_dict().items()}

    def finish(self, run: LocalRun) -> None:
        run.reply_records[wire.ARRAYS] = array_record(
            {
                k: v.detach() - self._start[k]
                for k, v in run.model.state_dict().items()
                if k not in run.personal
            }
        )
