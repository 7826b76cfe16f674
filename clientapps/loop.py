"""The one local training loop (architecture rule 2).

``train_local`` runs epochs of mini-batch steps over in-memory tensors and
calls the recipe's hooks (:mod:`clientapps.hooks`) at fixed points. What it
optimises with comes from factories chosen by the message config: the
optimizer (``optimizer``: ``sgd``, the default, ``adam``, ``adamw``) and the
loss (``loss``: :mod:`clientapps.losses`). Before the first step, a phase
sees the whole local set (``before_training``: score, select); hooks that
declare ``needs_features`` see the classifier's input as ``run.features``.

The example order of every epoch comes from the seeded generator the caller
passes in, so a client's update is a pure function of (global arrays, data,
config, seed).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bouquet.clientapps import bounds
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.losses import LOSSES, Loss, make_loss
from bouquet.tasks import wire

OPTIMIZERS = bounds.OPTIMIZER.choices

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]
"""Builds the local optimizer over the trainable parameters."""


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation settings, read from the message config.

    ``local-steps`` > 0 caps the number of optimizer steps (the loop stops
    after that many, whatever ``local-epochs`` says); 0 is no cap.
    ``momentum`` applies to SGD only. The legal values are
    :mod:`clientapps.bounds`'.
    """

    epochs: int = bounds.LOCAL_EPOCHS.default
    batch_size: int = bounds.BATCH_SIZE.default
    lr: float = bounds.LR.default
    momentum: float = bounds.MOMENTUM.default
    weight_decay: float = bounds.WEIGHT_DECAY.default
    max_steps: int = bounds.LOCAL_STEPS.default
    optimizer: str = bounds.OPTIMIZER.default
    loss: str = "cross-entropy"

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], fallback: Mapping[str, Any] | None = None
    ) -> TrainSettings:
        """Build from a ConfigRecord, each value checked (:class:`ConfigError`).

        A key the record lacks is read from ``fallback`` (e.g. the run
        config), else keeps the documented default.
        """
        loss = bounds.Bound(wire.LOSS, cls.loss, choices=tuple(LOSSES))
        return cls(
            epochs=bounds.LOCAL_EPOCHS.read(config, fallback),
            batch_size=bounds.BATCH_SIZE.read(config, fallback),
            lr=bounds.LR.read(config, fallback),
            momentum=bounds.MOMENTUM.read(config, fallback),
            weight_decay=bounds.WEIGHT_DECAY.read(config, fallback),
            max_steps=bounds.LOCAL_STEPS.read(config, fallback),
            optimizer=bounds.OPTIMIZER.read(config, fallback),
            loss=loss.read(config, fallback),
        )


def make_optimizer(
    params: Sequence[torch.Tensor], settings: TrainSettings
) -> torch.optim.Optimizer:
    """The optimizer ``settings.optimizer`` names, over ``params``."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )
    kind = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=settings.lr, weight_decay=settings.weight_decay)


def head_module(model: nn.Module) -> nn.Module:
    """The classifier: the module that owns the last entry of the state dict.

    The same rule as the ``"head"`` of personal parameters
    (:func:`tasks.wire.resolve_personal`).
    """
    last = next(reversed(model.state_dict()), None)
    if last is None:
        raise ValueError("The model has no parameters.")
    prefix = last.rpartition(".")[0]
    return model.get_submodule(prefix) if prefix else model


@dataclass
class LocalRun:
    """What hooks see: the model, the optimizer and the round's context.

    Attributes
    ----------
    parameters, global_parameters : list[torch.Tensor]
        Trainable parameters and their values at the start (the global model,
        with the node's personal entries), aligned. The start values are read
        from ``start_values`` when a hook first asks for them (a plain run
        never copies the model), else copied before the first step.
    config : Mapping[str, Any]
        The message's config record (the round's hyperparameters).
    state : MutableMapping
        The node's persistent ``Context.state``; namespace your keys.
    incoming : Mapping
        The message's content (extra records sent by the server).
    data : (torch.Tensor, torch.Tensor)
        The whole local training set ``(x, y)``. Read-only.
    selected : torch.Tensor or None
        Indices of the examples training uses; a ``before_training`` hook
        sets it through :meth:`select` (None: all of them).
    personal : tuple of str
        State-dict entries that never leave the node (kept in its state).
    frozen : tuple of str
        State-dict entries of a fine-tuned model's frozen backbone that the
        message left out (:mod:`tasks.finetune`): never sent, never stored.
    features : torch.Tensor or None
        The classifier's input for the current batch, when a hook declares
        ``needs_features``.
    batch : (torch.Tensor, torch.Tensor) or None
        The current batch ``(x, y)`` after every ``transform_batch`` hook: what
        the step's closure trains on by default (a ``step`` hook that
        perturbs the inputs, such as adversarial training, starts from it).
    reply_records : dict
        Extra records to send back, by record name.
    metrics : dict[str, float]
        Extra metrics to report.
    stop : bool
        Set by a hook to end local training before the next batch (e.g. a
        client that chooses its own number of steps).

    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    settings: TrainSettings
    config: Mapping[str, Any]
    state: MutableMapping[str, Any]
    incoming: Mapping[str, Any]
    generator: torch.Generator
    parameters: list[torch.Tensor]
    data: tuple[torch.Tensor, torch.Tensor]
    loss_fn: Loss
    selected: torch.Tensor | None = None
    personal: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()
    features: torch.Tensor | None = None
    batch: tuple[torch.Tensor, torch.Tensor] | None = None
    reply_records: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    epoch: int = 0
    steps: int = 0
    num_examples: int = 0
    stop: bool = False
    start_values: Callable[[], Mapping[str, Any]] | None = field(
        default=None, repr=False
    )

    @functools.cached_property
    def global_parameters(self) -> list[torch.Tensor]:
        """The trainable parameters' values at the start, aligned with them."""
        if self.start_values is None:
            raise RuntimeError("No start values: train_local copies them first.")
        values = self.start_values()
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        return [
            torch.tensor(values[n], dtype=p.dtype, device=p.device)
            for n, p in zip(names, self.parameters, strict=True)
        ]

    def select(self, indices: torch.Tensor) -> None:
        """Train on these examples of :attr:`data` only (a selection phase)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.numel() == 0:
            raise ValueError("A selection must keep at least one example.")
        self.selected = indices


@dataclass(frozen=True)
class TrainResult:
    """Summary of a local run."""

    num_examples: int
    steps: int
    loss_first: float
    loss_mean: float
    run: LocalRun


def _stepper(hooks: Sequence[Hook]) -> Hook | None:
    owners = [h for h in hooks if type(h).step is not Hook.step]
    if len(owners) > 1:
        names = ", ".join(type(h).__name__ for h in owners)
        raise ValueError(f"At most one hook may take over the step; got {names}.")
    return owners[0] if owners else None


def train_local(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    settings: TrainSettings,
    hooks: Sequence[Hook] = (),
    *,
    generator: torch.Generator,
    config: Mapping[str, Any] | None = None,
    state: MutableMapping[str, Any] | None = None,
    incoming: Mapping[str, Any] | None = None,
    personal: Sequence[str] = (),
    frozen: Sequence[str] = (),
    start_values: Callable[[], Mapping[str, Any]] | None = None,
    optimizer: OptimizerFactory | None = None,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data = (x, y)`` with ``hooks``.

    ``start_values``: a callable giving the model's values before training,
    by state-dict name (the arrays received); without it the start values
    are copied from the model. The records of ``incoming`` that the hooks
    read (``Hook.reads``) are checked against the model first
    (:func:`clientapps.bounds.check_record`).

    ``optimizer`` (a factory over the trainable parameters) and ``loss``
    (``(logits, y) -> scalar``) replace the ones ``settings`` name; the
    hooks' own terms are still added to the loss. A recipe whose math
    assumes the settings' optimizer (``Hook.fixed_optimizer``) refuses a
    factory with a ``ValueError``.

    Returns the number of examples trained on, the step count, the loss of
    the first step and the mean loss over all steps.
    """
    x_all, y_all = data
    if len(x_all) != len(y_all) or len(x_all) == 0:
        raise ValueError(
            f"Need matching, non-empty x and y; got {len(x_all)}, {len(y_all)}."
        )
    if optimizer is not None and (fixed := [h for h in hooks if h.fixed_optimizer]):
        raise ValueError(
            f"{type(fixed[0]).__name__} derives its update from the optimizer the "
            "config names (optimizer, lr, momentum): pass no optimizer factory, "
            "and set those keys in the run config or in defaults instead."
        )
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    run = LocalRun(
        model=model,
        optimizer=(optimizer or functools.partial(make_optimizer, settings=settings))(
            params
        ),
        settings=settings,
        config=config or {},
        state=state if state is not None else {},
        incoming=incoming or {},
        generator=generator,
        parameters=params,
        data=(x_all, y_all),
        loss_fn=make_loss(settings.loss) if loss is None else _user_loss(loss),
        personal=tuple(personal),
        frozen=tuple(frozen),
        num_examples=len(x_all),
        start_values=start_values,
    )
    if start_values is None:
        run.__dict__["global_parameters"] = [p.detach().clone() for p in params]
    stepper = _stepper(hooks)
    # Validate first: a refused record stops the call before any hook runs
    # (and so before any hook writes the node's state).
    for name in dict.fromkeys(name for hook in hooks for name in hook.reads):
        if name in run.incoming:
            bounds.check_record(name, run.incoming[name], model, run.personal)
    model.train()
    for hook in hooks:
        hook.setup(run)
    for hook in hooks:
        hook.before_training(run)
    if run.selected is not None:
        x_all, y_all = x_all[run.selected], y_all[run.selected]
        run.num_examples = len(x_all)
    capture = _capture_features(run) if any(h.needs_features for h in hooks) else None
    optimizer = run.optimizer

    def default_step() -> None:
        for hook in hooks:
            hook.before_step(run)
        optimizer.step()

    losses: list[float] = []
    try:
        for epoch in range(settings.epochs):
            if run.stop or (settings.max_steps and run.steps >= settings.max_steps):
                break
            run.epoch = epoch
            for idx in _epoch_batches(run, hooks, len(x_all), generator):
                if run.stop or (settings.max_steps and run.steps >= settings.max_steps):
                    break
                x, y = x_all[idx].to(device), y_all[idx].to(device)
                for hook in hooks:
                    x, y = hook.transform_batch(run, x, y)
                run.batch = (x, y)

                def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                    optimizer.zero_grad(set_to_none=True)
                    logits = model(x)
                    loss = run.loss_fn(logits, y, run)
                    for hook in hooks:
                        loss = hook.loss(run, loss, logits, x, y)
                    loss.backward()
                    return loss

                loss = stepper.step(run, closure, default_step) if stepper else None
                if loss is None:
                    loss = closure()
                    default_step()
                for hook in hooks:
                    hook.after_step(run)
                run.steps += 1
                losses.append(float(loss.detach()))
    finally:
        if capture is not None:
            capture.remove()
    for hook in hooks:
        hook.finish(run)
    return TrainResult(
        num_examples=run.num_examples,
        steps=run.steps,
        loss_first=losses[0] if losses else float("nan"),
        loss_mean=sum(losses) / len(losses) if losses else float("nan"),
        run=run,
    )


def _epoch_batches(
    run: LocalRun, hooks: Sequence[Hook], num_examples: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """A hook's batches, else its order (or the seeded shuffle) in batch-size cuts."""
    for hook in hooks:
        if (batches := hook.epoch_batches(run, num_examples)) is not None:
            return batches
    order = next(
        (o for h in hooks if (o := h.order(run, num_examples)) is not None), None
    )
    if order is None:
        order = torch.randperm(num_examples, generator=generator)
    size = run.settings.batch_size
    return [order[start : start + size] for start in range(0, len(order), size)]


def _user_loss(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Loss:
    def base_term(logits: torch.Tensor, y: torch.Tensor, run: LocalRun) -> torch.Tensor:
        return loss(logits, y)

    return base_term


def _capture_features(run: LocalRun) -> torch.utils.hooks.RemovableHandle:
    """Store the classifier's input in ``run.features`` on every forward pass."""

    def keep(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
        run.features = inputs[0]

    hook: Callable = keep
    return head_module(run.model).register_forward_hook(hook)
