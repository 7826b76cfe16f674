"""The one local training loop (DESIGN rule 2).

``train_local`` runs epochs of mini-batch SGD over in-memory tensors and calls
the recipe's hooks (see :mod:`clientapps.hooks`) at fixed points. The example
order of every epoch comes from the seeded generator the caller passes in, so
a client's update is a pure function of (global arrays, data, config, seed).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clientapps.hooks import Hook
from strategies import keys


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation settings, read from the message config.

    ``local-steps`` > 0 caps the number of optimizer steps (the loop stops
    after that many, whatever ``local-epochs`` says).
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_steps: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainSettings:
        """Build from a ConfigRecord (missing keys keep the defaults)."""
        default = cls()
        settings = cls(
            epochs=int(config.get(keys.LOCAL_EPOCHS, default.epochs)),
            batch_size=int(config.get(keys.BATCH_SIZE, default.batch_size)),
            lr=float(config.get(keys.LR, default.lr)),
            momentum=float(config.get(keys.MOMENTUM, default.momentum)),
            weight_decay=float(config.get(keys.WEIGHT_DECAY, default.weight_decay)),
            max_steps=int(config.get(keys.LOCAL_STEPS, default.max_steps)),
        )
        if settings.batch_size < 1 or settings.epochs < 0 or settings.lr < 0:
            raise ValueError(f"Invalid local training settings: {settings}")
        return settings


@dataclass
class LocalRun:
    """What hooks see: the model, the optimizer and the round's context.

    Attributes
    ----------
    parameters, global_parameters : list[torch.Tensor]
        Trainable parameters and a frozen copy of their values at the start
        (the global model), aligned. The copy is made only when the run has
        hooks (nothing else reads it).
    config : Mapping[str, Any]
        The message's config record (the round's hyperparameters).
    state : MutableMapping
        The node's persistent ``Context.state``; namespace your keys.
    incoming : Mapping
        The message's content (extra records sent by the server).
    data : (torch.Tensor, torch.Tensor) or None
        The whole local training set ``(x, y)``, for hooks that look at every
        example (e.g. scoring examples for a curriculum). Read-only.
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
    global_parameters: list[torch.Tensor]
    data: tuple[torch.Tensor, torch.Tensor] | None = None
    reply_records: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    epoch: int = 0
    steps: int = 0
    num_examples: int = 0
    stop: bool = False


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
) -> TrainResult:
    """Train ``model`` in place on ``data = (x, y)`` with ``hooks``.

    Returns the number of examples seen per epoch, the step count, the loss
    of the first step and the mean loss over all steps.
    """
    x_all, y_all = data
    if len(x_all) != len(y_all) or len(x_all) == 0:
        raise ValueError(
            f"Need matching, non-empty x and y; got {len(x_all)}, {len(y_all)}."
        )
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    run = LocalRun(
        model=model,
        optimizer=optimizer,
        settings=settings,
        config=config or {},
        state=state if state is not None else {},
        incoming=incoming or {},
        generator=generator,
        parameters=params,
        # Only hooks read the start values: a plain run skips the model-sized copy.
        global_parameters=[p.detach().clone() for p in params] if hooks else [],
        num_examples=len(x_all),
        data=(x_all, y_all),
    )
    stepper = _stepper(hooks)
    criterion = nn.CrossEntropyLoss()
    model.train()
    for hook in hooks:
        hook.setup(run)

    def default_step() -> None:
        for hook in hooks:
            hook.before_step(run)
        optimizer.step()

    losses: list[float] = []
    for epoch in range(settings.epochs):
        if run.stop or (settings.max_steps and run.steps >= settings.max_steps):
            break
        run.epoch = epoch
        order = next(
            (o for h in hooks if (o := h.order(run, len(x_all))) is not None), None
        )
        if order is None:
            order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            if run.stop or (settings.max_steps and run.steps >= settings.max_steps):
                break
            idx = order[start : start + settings.batch_size]
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            for hook in hooks:
                x, y = hook.transform_batch(run, x, y)

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                logits = model(x)
                loss = criterion(logits, y)
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
    for hook in hooks:
        hook.finish(run)
    return TrainResult(
        num_examples=len(x_all),
        steps=run.steps,
        loss_first=losses[0] if losses else float("nan"),
        loss_mean=sum(losses) / len(losses) if losses else float("nan"),
        run=run,
    )
