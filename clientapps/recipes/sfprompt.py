"""SFPrompt client: local-loss update, EL2N pruning, then split training.

Cao, Zhu, Gong, "SFPrompt: Communication-Efficient Split Federated
Fine-Tuning for Large Pre-Trained Models over Resource-Limited Devices",
arXiv 2024, https://arxiv.org/abs/2407.17533 (see :mod:`strategies.sfprompt`).

The model is split U-shaped (:func:`tasks.foundation.split_blocks`): the
client's head (embeddings, prompts, ``sfprompt.head-blocks`` blocks), the
server's frozen body, the client's tail (``sfprompt.tail-blocks`` blocks and
the classifier). ``sfprompt.split`` says where the body runs:

- ``simulated``: on the node, which holds the frozen body too; the math is
  the split's exactly, and the bytes that would cross the network are
  measured on the body's input and output and reported;
- ``messages``: on the server. The round's ``train.split`` messages drive
  the node step by step (:func:`split_step`, below), and the round's own
  train message comes last and replies the trained entries.

One ``before_training`` phase, then the loop:

1. local-loss update: ``sfprompt.local-loss-epochs`` epochs of the loop's
   own training (the run's optimizer settings, a fresh optimizer) on
   ``tail(head(x))``, the body skipped (:func:`tasks.foundation.without_body`);
2. pruning: EL2N ``||softmax(tail(head(x))) - onehot(y)||_2`` of every
   local example with the updated local path (eval mode), the
   ``ceil(sfprompt.keep-fraction * n)`` highest kept (ties by index);
3. split training: the loop trains ``tail(body(head(x)))`` on the kept
   examples; per batch, ``s = head(x)`` goes up, ``h = body(s)`` down,
   ``dL/dh`` up, and ``dL/ds`` down when the head has trainable entries
   (prompts). The element counts are measured on the body's input and
   output, times the activations' element size.

With ``split = "messages"`` the node keeps the run between messages in its
``Context.state`` (``sfprompt.split-*``: the trainable entries, the
optimizer's state, the batch plan, the last ``h``, the counters), since in
deployment every message is a new process. It recomputes the head's
forward pass instead of keeping an autograd graph, which cannot be stored:

- ``begin`` (the round's arrays and config): phases 1 and 2 as above, then
  the batch plan (the loop's own draws from the same generator), then
  ``s = head(x)`` of the first batch goes up;
- ``tail`` (``h``): ``tail(h)``, the loss and its backward pass; ``dL/dh``
  goes up (asked only where something before the body trains);
- ``step`` (``dL/ds``, or ``h`` where nothing before the body trains): one
  step of the one loop (:func:`clientapps.loop.train_local`, one batch) with
  the body replaced by :class:`tasks.foundation.RemoteBody`, which returns
  ``h`` forward and ``dL/ds`` backward: the same gradients as the simulated
  step; then the next batch's ``s`` goes up, or "done";
- the round's train message: the trained entries, the counts (the bytes of
  the tensors the node sent and received) and the mean loss.

The two modes give the same model where the model has no dropout (the
per-message seeds differ from the one simulated run's).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from torch import nn

from bouquet.clientapps import bounds
from bouquet.clientapps.bounds import EPOCHS_MAX, INT63_MAX, Bound, ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import LocalRun, TrainSettings, train_local
from bouquet.clientapps.losses import make_loss
from bouquet.clientapps.state import load_arrays, load_values, save_arrays, save_values
from bouquet.tasks import wire
from bouquet.tasks.arrays import array_record, array_view
from bouquet.tasks.foundation import (
    RemoteBody,
    remote_body,
    smashed,
    split_blocks,
    without_body,
)

NAMESPACE = "sfprompt"
KEEP_FRACTION = Bound(f"{NAMESPACE}.keep-fraction", 0.5, 0.0, 1.0, low_open=True)
LOCAL_LOSS_EPOCHS = Bound(f"{NAMESPACE}.local-loss-epochs", 1, 0, EPOCHS_MAX)
HEAD_BLOCKS = Bound(f"{NAMESPACE}.head-blocks", 1, 0, INT63_MAX)
TAIL_BLOCKS = Bound(f"{NAMESPACE}.tail-blocks", 1, 0, INT63_MAX)
SPLIT = Bound(f"{NAMESPACE}.split", "simulated", choices=("simulated", "messages"))
BOUNDS = (KEEP_FRACTION, LOCAL_LOSS_EPOCHS, HEAD_BLOCKS, TAIL_BLOCKS, SPLIT)

UPLINK_BYTES = f"{NAMESPACE}.split-uplink-bytes"
"""Reply metric: bytes of ``s`` and ``dL/dh`` the client sent the server."""
DOWNLINK_BYTES = f"{NAMESPACE}.split-downlink-bytes"
"""Reply metric: bytes of ``h`` and ``dL/ds`` the server sent the client."""
KEPT = f"{NAMESPACE}.kept-examples"
"""Reply metric: examples left after pruning (those of the split phase)."""
SCORING_BATCH = 1024


def el2n_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """EL2N per example, ``||softmax(f(x)) - onehot(y)||_2`` (eval mode, no grad).

    For sequence outputs (``logits`` of shape ``(n, C, T)``, targets
    ``(n, T)``) the per-token norms are averaged over the tokens.
    """
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    scores = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), SCORING_BATCH):
                logits = model(x[i : i + SCORING_BATCH].to(device))
                labels = y[i : i + SCORING_BATCH].to(device)
                # Classes are dim 1 (a sequence model's logits are (n, C, T)).
                error = torch.softmax(logits.double(), dim=1).movedim(1, -1)
                error -= nn.functional.one_hot(labels, logits.shape[1]).double()
                norms = error.norm(dim=-1)
                scores.append(norms.reshape(len(norms), -1).mean(dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores)


def kept_indices(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ``ceil(fraction * n)`` highest-scored indices, ascending (stable ties)."""
    keep = max(1, math.ceil(fraction * len(scores)))
    return torch.sort(torch.argsort(-scores, stable=True)[:keep]).values


STALE_HANDLES = "_bouquet_sfprompt_handles"
"""Model attribute holding the byte counters' hook handles until finish()."""

# The node's state between a round's split messages (``Context.state``).
PARAMS, OPTIMIZER, PLAN, LAST_H, PROGRESS = (
    "split-params",
    "split-optimizer",
    "split-plan",
    "split-h",
    "split-progress",
)


class SplitPhases(Hook):
    """SFPrompt's three phases on the one loop (see the module docstring).

    With ``split="messages"``, the round's ``begin`` message runs phases 1
    and 2 and plans the batches (no step), and the round's train message
    replies what the split steps trained; a model without a body trains as
    with ``simulated`` (there is nothing to split).
    """

    def __init__(
        self,
        keep_fraction: float,
        local_loss_epochs: int,
        head_blocks: int,
        tail_blocks: int,
        split: str = "simulated",
        phase: str = "train",
    ) -> None:
        self.keep_fraction = float(keep_fraction)
        self.local_loss_epochs = int(local_loss_epochs)
        self.head_blocks = int(head_blocks)
        self.tail_blocks = int(tail_blocks)
        self.split = split
        self.phase = phase
        self.uplink = 0
        self.downlink = 0
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.progress: dict[str, Any] = {}

    def _messages(self, run: LocalRun) -> bool:
        _, body, _ = split_blocks(run.model, self.head_blocks, self.tail_blocks)
        return self.split == "messages" and bool(body)

    def setup(self, run: LocalRun) -> None:
        if not self._messages(run):
            return
        if self.phase == "begin":  # a new round: nothing of an older one stays
            for name in (PARAMS, OPTIMIZER, PLAN, LAST_H, PROGRESS):
                run.state.pop(f"{NAMESPACE}.{name}", None)
            return
        # The round's train message, after the split steps: reply their result.
        self.progress = _progress(run.state, run.config, "train")
        if self.progress["step"] != self.progress["steps"]:
            raise ConfigError(
                wire.SPLIT_PHASE,
                "train",
                f"sent after the split's {self.progress['steps']} steps "
                f"(this node did {self.progress['step']})",
            )
        _load_trainable(run.model, run.state)

    def before_training(self, run: LocalRun) -> None:
        model, split = run.model, (self.head_blocks, self.tail_blocks)
        if self.progress:  # the train message after the split steps: no training
            run.select(torch.as_tensor(load_arrays(run.state, NAMESPACE, PLAN)["kept"]))
            run.stop = True
            return
        if self.local_loss_epochs:
            settings = dataclasses.replace(run.settings, epochs=self.local_loss_epochs)
            with without_body(model, *split):
                train_local(model, run.data, settings, generator=run.generator)
        if self.keep_fraction < 1.0:
            with without_body(model, *split):
                scores = el2n_scores(model, *run.data)
            run.select(kept_indices(scores, self.keep_fraction))
        if self._messages(run):
            return  # the server runs the body: nothing to measure here
        # A run that raised never reached finish(): its counters must not stay
        # on the pooled model.
        for stale in getattr(model, STALE_HANDLES, ()):
            stale.remove()
        _, body, _ = split_blocks(model, *split)
        if body:
            self.handles = [
                body[0].register_forward_pre_hook(self._smashed),
                body[-1].register_forward_hook(self._returned),
            ]
        setattr(model, STALE_HANDLES, self.handles)

    def order(self, run: LocalRun, n: int) -> torch.Tensor | None:
        if not (self._messages(run) and self.phase == "begin"):
            return None
        # Plan every batch the loop would train on, drawing the epochs'
        # permutations from the same generator in the same order; then stop.
        kept = run.selected if run.selected is not None else torch.arange(n)
        settings, batches = run.settings, []
        cap = settings.max_steps
        first = None
        for _ in range(settings.epochs):
            if cap and len(batches) >= cap:
                break
            order = torch.randperm(n, generator=run.generator)
            first = order if first is None else first
            for start in range(0, n, settings.batch_size):
                if cap and len(batches) >= cap:
                    break
                batches.append(kept[order[start : start + settings.batch_size]])
        flat = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.long)
        ends = torch.tensor([len(b) for b in batches], dtype=torch.long).cumsum(0)
        save_arrays(
            run.state,
            NAMESPACE,
            PLAN,
            {"batches": flat.numpy(), "ends": ends.numpy(), "kept": kept.numpy()},
        )
        run.stop = True
        return first

    def _smashed(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        s = args[0]
        if torch.is_grad_enabled():
            # s up; dL/ds down only if something before the body trains.
            self.uplink += s.numel() * s.element_size()
            if s.requires_grad:
                self.downlink += s.numel() * s.element_size()

    def _returned(self, _module: nn.Module, _args: Any, out: Any) -> None:
        h = out[0] if isinstance(out, tuple) else out
        if torch.is_grad_enabled():
            self.downlink += h.numel() * h.element_size()  # h down
            if h.requires_grad:
                self.uplink += h.numel() * h.element_size()  # dL/dh up

    def finish(self, run: LocalRun) -> None:
        for handle in self.handles:
            handle.remove()
        setattr(run.model, STALE_HANDLES, ())
        if self._messages(run) and self.phase == "begin":
            self._begin_split(run)
            return
        if self.progress:
            progress = self.progress
            self.uplink, self.downlink = progress["uplink"], progress["downlink"]
            if progress["steps"]:
                run.metrics[wire.TRAIN_LOSS] = progress["loss-sum"] / progress["steps"]
                run.metrics[wire.TRAIN_LOSS_FIRST] = progress["loss-first"]
            for name in (PARAMS, OPTIMIZER, PLAN, LAST_H, PROGRESS):
                run.state.pop(f"{NAMESPACE}.{name}", None)
        run.metrics[UPLINK_BYTES] = float(self.uplink)
        run.metrics[DOWNLINK_BYTES] = float(self.downlink)
        run.metrics[KEPT] = float(run.num_examples)

    def _begin_split(self, run: LocalRun) -> None:
        """Keep the run for the split steps; the first batch's ``s`` goes up."""
        _save_trainable(run.model, run.state)
        plan = load_arrays(run.state, NAMESPACE, PLAN)
        if plan is None:  # no epoch to plan (local-epochs = 0)
            kept = run.selected if run.selected is not None else torch.arange(0)
            plan = {"batches": np.zeros(0, np.int64), "ends": np.zeros(0, np.int64)}
            save_arrays(run.state, NAMESPACE, PLAN, {**plan, "kept": kept.numpy()})
        progress = {
            "round": bounds.SERVER_ROUND.read(run.config),
            "step": 0,
            "steps": len(plan["ends"]),
            "uplink": 0,
            "downlink": 0,
            "loss-sum": 0.0,
            "loss-first": 0.0,
        }
        split = (self.head_blocks, self.tail_blocks)
        run.reply_records.update(
            _next_smashed(run.model, run.data, plan, progress, split)
        )
        _save_progress(run.state, progress)


def _progress(state: Any, config: Any, phase: str) -> dict[str, Any]:
    """This round's split progress, or a refusal (a message out of order)."""
    progress = load_values(state, NAMESPACE, PROGRESS)
    if progress is None or progress["round"] != bounds.SERVER_ROUND.read(config):
        raise ConfigError(wire.SPLIT_PHASE, phase, "sent after this round's begin")
    return progress


def _save_progress(state: Any, progress: dict[str, Any]) -> None:
    save_values(state, NAMESPACE, PROGRESS, progress, metrics=False)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_trainable(model: nn.Module, state: Any) -> None:
    arrays = {n: p.detach().cpu().numpy() for n, p in _trainable(model).items()}
    save_arrays(state, NAMESPACE, PARAMS, arrays)


def _load_trainable(model: nn.Module, state: Any) -> None:
    saved = load_arrays(state, NAMESPACE, PARAMS)
    with torch.no_grad():
        for name, param in _trainable(model).items():
            param.copy_(torch.from_numpy(np.asarray(saved[name])))


def _batch(plan: dict[str, np.ndarray], step: int) -> torch.Tensor:
    ends = plan["ends"]
    start = int(ends[step - 1]) if step else 0
    return torch.from_numpy(np.asarray(plan["batches"][start : int(ends[step])]))


def _next_smashed(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    plan: dict[str, np.ndarray],
    progress: dict[str, Any],
    split: tuple[int, int],
) -> dict[str, Any]:
    """The reply's records: the next batch's ``s``, or "done"."""
    step = progress["step"]
    if step >= progress["steps"]:
        return {wire.SPLIT_INFO: ConfigRecord({"done": True})}
    device = next(model.parameters()).device
    model.train()
    with torch.enable_grad():
        s = smashed(model, *split, data[0][_batch(plan, step)].to(device))
    progress["uplink"] += s.numel() * s.element_size()
    progress["shape"] = list(s.shape)
    return {
        wire.SPLIT_TENSORS: array_record({"s": s.detach().cpu().numpy()}),
        # dL/ds is worth sending only where something before the body trains.
        wire.SPLIT_INFO: ConfigRecord({"done": False, "wants-grad": s.requires_grad}),
    }


def _incoming(msg: Message, name: str, shape: list[int]) -> torch.Tensor:
    """The server's tensor ``name`` of the split record, checked against ``s``."""
    record = msg.content.get(wire.SPLIT_TENSORS)
    key = f"{wire.SPLIT_TENSORS}[{name!r}]"
    if not isinstance(record, ArrayRecord) or name not in record:
        raise ConfigError(key, None, "present", "record")
    value = record[name]
    array = array_view(value) if isinstance(value, Array) else None
    if array is None or array.dtype != np.float32 or list(array.shape) != shape:
        got = None if array is None else (str(array.dtype), list(array.shape))
        raise ConfigError(key, got, f"float32 shaped {shape} like s", "record")
    if not np.isfinite(array).all():
        raise ConfigError(key, "non-finite", "finite everywhere", "record")
    return torch.from_numpy(array.copy())


def _optimizer_arrays(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    return {
        f"{i}.{name}": torch.as_tensor(value).detach().cpu().numpy()
        for i, entry in optimizer.state_dict()["state"].items()
        for name, value in entry.items()
        if value is not None
    }


class SplitStep(Hook):
    """One step of the one loop on a planned batch, the body the server's."""

    def __init__(
        self,
        batch: torch.Tensor,
        stand_in: RemoteBody,
        split: tuple[int, int],
        optimizer_state: dict[str, np.ndarray] | None,
    ) -> None:
        self.batch = batch
        self.stand_in = stand_in
        self.split = split
        self.optimizer_state = optimizer_state or {}

    def setup(self, run: LocalRun) -> None:
        if self.optimizer_state:  # momentum buffers, Adam's moments
            saved = run.optimizer.state_dict()
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in self.optimizer_state.items():
                index, name = key.split(".", 1)
                state.setdefault(int(index), {})[name] = torch.tensor(value)
            saved["state"] = state
            run.optimizer.load_state_dict(saved)

    def order(self, run: LocalRun, n: int) -> torch.Tensor:
        return self.batch

    def step(self, run: LocalRun, closure: Any, default_step: Any) -> torch.Tensor:
        with remote_body(run.model, *self.split, self.stand_in):
            loss = closure()
        default_step()
        return loss


def split_step(
    msg: Message,
    context: Context,
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    settings: TrainSettings,
    seed: int,
) -> RecordDict:
    """Answer a ``tail`` or ``step`` message of the split (module docstring)."""
    config = dict(msg.content[wire.CONFIG])
    phase = bounds.SPLIT_PHASE.read(config)
    if phase not in ("tail", "step"):
        raise ConfigError(wire.SPLIT_PHASE, phase, "tail or step")
    split = (HEAD_BLOCKS.read(config), TAIL_BLOCKS.read(config))
    state = context.state
    progress = _progress(state, config, phase)
    step = progress["step"]
    if step >= progress["steps"]:
        raise ConfigError(wire.SPLIT_PHASE, phase, "sent before the split is done")
    plan = load_arrays(state, NAMESPACE, PLAN)
    batch = _batch(plan, step)
    shape = list(progress["shape"])
    _load_trainable(model, state)
    device = next(model.parameters()).device
    model.train()
    if phase == "tail":
        h = _incoming(msg, "h", shape)
        stand_in = RemoteBody(h.to(device))
        x, y = data[0][batch].to(device), data[1][batch].to(device)
        with remote_body(model, *split, stand_in):
            logits = model(x)
        make_loss(settings.loss)(logits, y, None).backward()
        model.zero_grad(set_to_none=True)
        grad_h = stand_in.grad_h
        assert grad_h is not None
        save_arrays(state, NAMESPACE, LAST_H, {"h": h.numpy()})
        progress["downlink"] += h.numel() * h.element_size()
        progress["uplink"] += grad_h.numel() * grad_h.element_size()
        _save_progress(state, progress)
        return RecordDict(
            {wire.SPLIT_TENSORS: array_record({"grad-h": grad_h.cpu().numpy()})}
        )
    # step: dL/ds after a tail exchange, else h itself (nothing before the body trains)
    record = msg.content.get(wire.SPLIT_TENSORS)
    if isinstance(record, ArrayRecord) and "h" in record:
        h, grad_s = _incoming(msg, "h", shape), None
        progress["downlink"] += h.numel() * h.element_size()
    else:
        grad_s = _incoming(msg, "grad-s", shape)
        saved_h = load_arrays(state, NAMESPACE, LAST_H)
        if saved_h is None:
            raise ConfigError(wire.SPLIT_PHASE, phase, "sent after a tail message")
        h = torch.from_numpy(np.array(saved_h["h"]))
        progress["downlink"] += grad_s.numel() * grad_s.element_size()
    stand_in = RemoteBody(h.to(device), None if grad_s is None else grad_s.to(device))
    hook = SplitStep(batch, stand_in, split, load_arrays(state, NAMESPACE, OPTIMIZER))
    one = dataclasses.replace(settings, epochs=1, max_steps=1)
    result = train_local(
        model,
        data,
        one,
        [hook],
        generator=torch.Generator().manual_seed(seed),
        config=config,
        state=state,
        incoming=msg.content,
    )
    _save_trainable(model, state)
    save_arrays(state, NAMESPACE, OPTIMIZER, _optimizer_arrays(result.run.optimizer))
    state.pop(f"{NAMESPACE}.{LAST_H}", None)
    if step == 0:
        progress["loss-first"] = result.loss_first
    progress["loss-sum"] += result.loss_mean
    progress["step"] = step + 1
    content = RecordDict(_next_smashed(model, data, plan, progress, split))
    _save_progress(state, progress)
    return content


def make_hooks(config: Mapping[str, Any]) -> list[Hook]:
    """One hook: the local-loss update, pruning and the split's byte count."""
    return [
        SplitPhases(
            keep_fraction=KEEP_FRACTION.read(config),
            local_loss_epochs=LOCAL_LOSS_EPOCHS.read(config),
            head_blocks=HEAD_BLOCKS.read(config),
            tail_blocks=TAIL_BLOCKS.read(config),
            split=SPLIT.read(config),
            phase=bounds.SPLIT_PHASE.read(config),
        )
    ]
