"""The local data a client routine accepts: tensors, a Dataset, or batches.

Users hold their data in many shapes: ``(x, y)`` tensors or arrays, a
``torch.utils.data.Dataset`` (a ``TensorDataset``, a Hugging Face dataset in
torch format), or a ``DataLoader`` / any iterable of batches, each batch an
``(x, y)`` pair or a mapping such as ``{"img": ..., "label": ...}``.
:func:`as_tensors` reads any of them once into one ``(x, y)`` pair, which the
one training loop (:mod:`clientapps.loop`) then draws its own seeded
mini-batches of ``batch-size`` from: a client's update stays a pure function
of (global arrays, data, config, seed), and algorithms that look at the whole
local set (curriculum ordering, selection phases, full-batch anchors) work
with a loader too. A loader's random transforms are therefore applied once
per call, not once per epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

LABEL_KEYS = ("label", "labels", "y", "target", "targets", "fine_label", "character")
"""Names a mapping batch may give its labels, tried in this order."""

DataSource = Any
"""``(x, y)``, a ``Dataset``, a ``DataLoader`` or any iterable of batches."""


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} is not array-like ({type(value).__name__}).") from err


def _pair_of(batch: Any, batch_keys: Sequence[str] | None) -> tuple[Any, Any]:
    """The ``(x, y)`` of one batch (or one example of a Dataset)."""
    if isinstance(batch, Mapping):
        if batch_keys is not None:
            missing = [k for k in batch_keys if k not in batch]
            if missing:
                raise KeyError(
                    f"batch_keys {tuple(batch_keys)}: the batch has no {missing} "
                    f"(its keys: {sorted(batch)})."
                )
            return batch[batch_keys[0]], batch[batch_keys[1]]
        label = next((k for k in LABEL_KEYS if k in batch), None)
        others = [k for k in batch if k != label]
        if label is None or len(others) != 1:
            raise ValueError(
                f"Cannot tell inputs from labels in a batch with keys {sorted(batch)}: "
                "pass batch_keys=(input_key, label_key), e.g. ('img', 'label')."
            )
        return batch[others[0]], batch[label]
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "A batch must be an (x, y) pair or a mapping of inputs and labels; "
        f"got {type(batch).__name__}."
    )


def as_tensors(
    data: DataSource, batch_keys: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``data`` as one ``(x, y)`` pair of tensors (see the module doc).

    Parameters
    ----------
    data : (x, y), Dataset, DataLoader or iterable of batches
        The node's local data; a pair of tensors or NumPy arrays is ``(x, y)``,
        any other sequence a sequence of batches.
    batch_keys : (input_key, label_key), optional
        Which entries of a mapping batch are the inputs and the labels
        (default: the label is the first of :data:`LABEL_KEYS` present, the
        input the one other entry).

    Raises
    ------
    ValueError, TypeError, KeyError
        The data cannot be read as inputs and labels, x and y differ in
        length, or there is no example; the message says which.

    """
    if _is_pair(data):
        x, y = _tensor(data[0], "x"), _tensor(data[1], "y")
    else:
        xs, ys = [], []
        for batch in _batches(data):
            bx, by = _pair_of(batch, batch_keys)
            xs.append(_tensor(bx, "a batch's inputs"))
            ys.append(_tensor(by, "a batch's labels"))
        if not xs:
            raise ValueError("The local data hold no example.")
        x, y = torch.cat(xs), torch.cat(ys)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"Need matching, non-empty x and y; got {len(x)}, {len(y)}.")
    return x, y


def labels_of(
    data: DataSource, batch_keys: Sequence[str] | None = None
) -> torch.Tensor:
    """The labels of ``data`` (a tensor of them is returned as it is)."""
    if isinstance(data, torch.Tensor):
        return data
    return as_tensors(data, batch_keys)[1]


def _is_pair(data: Any) -> bool:
    """An ``(x, y)`` pair of arrays, not a list of two batches."""
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(e, torch.Tensor | np.ndarray) for e in data)
    )


def _is_map_style(data: Any) -> bool:
    """A dataset indexed by position: torch's, or one such as Hugging Face's."""
    if isinstance(data, torch.utils.data.Dataset):
        return True
    return (
        not isinstance(data, Sequence | Mapping)
        and hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
    )


def _batches(data: Any) -> Iterable[Any]:
    if _is_map_style(data):
        if not hasattr(data, "__len__"):
            raise TypeError("An iterable-style Dataset: pass a DataLoader over it.")
        # Read it in large batches rather than example by example.
        return torch.utils.data.DataLoader(data, batch_size=1024, shuffle=False)
    if isinstance(data, Iterable):
        return data
    raise TypeError(
        "data must be (x, y), a Dataset, a DataLoader or an iterable of batches; "
        f"got {type(data).__name__}."
    )
