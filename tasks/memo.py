"""Per-process memory of what every ClientApp call would otherwise rebuild.

One worker process (a Ray actor, the in-process runner, a SuperNode's app
process) serves many calls, often for many nodes. Two things are the same on
every call and cost more than small clients' training (``docs/benchmarks.md``):

- a node's **partition**, read from the on-disk cache (:mod:`tasks.cache`)
  with ``torch.load``: :class:`TensorMemo` keeps the tensors, keyed by the
  cache file's path (itself a hash of everything that shapes the data) and
  its size and modification time, bounded in bytes (least recently used
  first out; ``BOUQUET_MEMO_MB``, default 512; 0 turns it off);
- the **model object**: :class:`ModelPool` lends a built model for the
  length of one call and takes it back, keyed by the run and every model
  setting. A call loads the global arrays into every parameter and buffer
  (strict), so nothing of an earlier call's values survives; a borrowed model
  is reset to the ``requires_grad`` it was built with, no gradients, training
  mode. (A fine-tuned model, :mod:`tasks.finetune`, is built once per process
  with its frozen backbone; calls load its trainable entries only.)

Nothing of a client's *state* is kept here: that stays in ``Context.state``.
Shared tensors are read-only by contract (the training loop indexes copies).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch import nn

MEMO_MB_DEFAULT = 512
IDLE_MODELS_PER_KEY = 4
"""Idle models kept per key: enough for the threads of one process."""
MAX_MODEL_KEYS = 8
"""Model settings remembered at once (a process serves one run at a time)."""


def memo_bytes() -> int:
    """The partition memory's bound, from ``BOUQUET_MEMO_MB`` (read each call)."""
    value = os.environ.get("BOUQUET_MEMO_MB", "")
    return int(float(value) * 2**20) if value else MEMO_MB_DEFAULT * 2**20


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors in ``value`` (a tensor, mapping or dataclass)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    fields = value if isinstance(value, dict) else getattr(value, "__dict__", {})
    return sum(tensor_bytes(v) for v in fields.values())


class TensorMemo:
    """A bounded, thread-safe, least-recently-used memory of loaded tensors."""

    def __init__(self) -> None:
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The value for ``key``, loaded by ``load()`` on a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        value = load()
        if value is None:  # nothing to remember (e.g. no cache file)
            return None
        size, bound = tensor_bytes(value), memo_bytes()
        if size > bound:
            return value
        with self._lock:
            if key not in self._items:
                self._items[key] = (value, size)
                self._bytes += size
            while self._bytes > bound and self._items:
                _, (_, freed) = self._items.popitem(last=False)
                self._bytes -= freed
        return value

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes


class ModelPool:
    """Built models lent for one call at a time, by key (thread-safe)."""

    def __init__(self) -> None:
        self._idle: OrderedDict[Hashable, list[tuple[nn.Module, list[bool]]]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def borrow(
        self, key: Hashable, build: Callable[[], nn.Module]
    ) -> Iterator[nn.Module]:
        """A model for ``key`` (built on a miss), returned to the pool after use."""
        with self._lock:
            idle = self._idle.get(key)
            entry = idle.pop() if idle else None
        if entry is None:
            model = build()
            trainable = [p.requires_grad for p in model.parameters()]
        else:
            model, trainable = entry
            for p, flag in zip(model.parameters(), trainable, strict=True):
                p.requires_grad_(flag)
                p.grad = None
            model.train()
        try:
            yield model
        finally:
            with self._lock:
                idle = self._idle.setdefault(key, [])
                self._idle.move_to_end(key)
                if len(idle) < IDLE_MODELS_PER_KEY:
                    idle.append((model, trainable))
                while len(self._idle) > MAX_MODEL_KEYS:
                    self._idle.popitem(last=False)

    def clear(self) -> None:
        """Drop every idle model."""
        with self._lock:
            self._idle.clear()


PARTITIONS = TensorMemo()
"""This process's partitions (used by :func:`tasks.data.load_client_data`)."""
MODELS = ModelPool()
"""This process's models (used by the ClientApp)."""
