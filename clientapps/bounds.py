"""What a client accepts from the server: bounds on config values and records.

The server's config may be wrong or hostile (architecture rule 8 seen from the
node): a NaN learning rate, ``local-epochs = 10**9`` or a control variate of
the wrong shape would otherwise train garbage, never return, or poison the
node's state for good. Every config value a client reads is a :class:`Bound`
(the shared training settings here, each recipe's own keys in its module's
``BOUNDS``), and every extra record a hook reads is checked against the model
(:func:`check_record`) before any hook runs. A refusal raises
:class:`ConfigError`, naming the key, the value and what is allowed; Flower
turns it into the call's error reply, and nothing has been stored by then.

Decisions where the spec was open
---------------------------------
- Types are strict: a bool is not a number, a string is not a number, a
  float is an integer only when it is integral (``2.0``, as the server's
  ``Param.parse`` accepts); NaN and infinities are refused everywhere.
- The upper limits guard against garbage, they are not tuning advice. Rates
  and coefficients (``lr``, ``weight-decay``, FedProx's mu, the lambdas,
  SAM's rho) stay <= :data:`RATE_MAX` = 1e3: every published value for these
  algorithms is below 10, and 1e3 keeps two orders of magnitude of headroom
  while refusing the 1e30-class values whose squares overflow float32.
  Gradient-clip norms stay <= :data:`NORM_MAX` = 1e6 (anything that large
  already means "no clip"; 0 is the documented off switch).
- Work is bounded so that a task always ends: ``local-epochs`` <= 10,000,
  ``local-steps`` <= 10,000,000 (0 keeps its meaning: no cap), ``batch-size``
  <= 1,000,000.
- ``momentum`` is in [0, 1): at 1 SGD's buffer never decays and diverges.
- ``seed`` and ``server-round`` are 63-bit non-negative integers, what
  :func:`tasks.wire.derive_seed` accepts.
- A record pairs with the model's state dict: every entry names a model
  entry and has its shape; every shared trainable parameter is present and a
  float array; every float entry is finite. Integer buffers may travel in
  their own dtype (the server casts records like the model).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from bouquet.tasks import compression, models, wire

Value = bool | int | float | str

RATE_MAX = 1e3
"""Largest learning rate, weight decay or loss coefficient a client accepts."""
NORM_MAX = 1e6
"""Largest gradient-clip norm a client accepts (0 = no clip)."""
EPOCHS_MAX = 10_000
STEPS_MAX = wire.MAX_LOCAL_STEPS
BATCH_MAX = 1_000_000
INT63_MAX = 2**63 - 1


class ConfigError(ValueError):
    """The server sent a config value or a record this client refuses.

    ``key`` names it (a config key, or ``record['entry']``), ``value`` is what
    arrived and ``allowed`` says what would have been accepted.
    """

    def __init__(
        self, key: str, value: Any, allowed: str, source: str = "config"
    ) -> None:
        self.key, self.value, self.allowed, self.source = key, value, allowed, source
        got = repr(value)
        got = got if len(got) <= 80 else f"{got[:77]}..."  # a hostile 1 MB string
        super().__init__(f"Refused {source}: {key} must be {allowed}; got {got}.")

    def __reduce__(self) -> tuple:
        return type(self), (self.key, self.value, self.allowed, self.source)


def _number(value: float, kind: type) -> str:
    return f"{int(value):d}" if kind is int and math.isfinite(value) else f"{value:g}"


@dataclass(frozen=True)
class Bound:
    """One config value a client reads: its key, default, type and legal values.

    The type is the default's (``bool``, ``int``, ``float`` or ``str``); a
    number's range is ``[low, high]``, ends made open by ``low_open`` /
    ``high_open``; a string may be restricted to ``choices``.
    """

    key: str
    default: Value
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    @property
    def allowed(self) -> str:
        """What this bound accepts, in words."""
        kind = type(self.default)
        if kind is bool:
            return "a bool"
        if kind is str:
            return f"one of {self.choices}" if self.choices else "a string"
        name = "an integer" if kind is int else "a finite number"
        low, high = _number(self.low, kind), _number(self.high, kind)
        if math.isinf(self.high):
            return f"{name} {'>' if self.low_open else '>='} {low}"
        if math.isinf(self.low):
            return f"{name} {'<' if self.high_open else '<='} {high}"
        name = "an integer" if kind is int else "a number"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{name} in {left}{low}, {high}{right}"

    def check(self, value: Any) -> Value:
        """``value`` in this bound's type, or :class:`ConfigError`."""
        kind = type(self.default)
        if kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(self.key, value, self.allowed)
            return value
        if kind is str:
            if not isinstance(value, str) or (
                self.choices and value not in self.choices
            ):
                raise ConfigError(self.key, value, self.allowed)
            return value
        number = isinstance(value, numbers.Real) and not isinstance(
            value, (bool, np.bool_)
        )
        if number and not isinstance(value, numbers.Integral):
            number = math.isfinite(value) and (kind is float or value.is_integer())
        if not number or not self._in_range(value):
            raise ConfigError(self.key, value, self.allowed)
        return kind(value)

    def _in_range(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def read(
        self, config: Mapping[str, Any], fallback: Mapping[str, Any] | None = None
    ) -> Value:
        """The checked value of ``config``, else of ``fallback``, else the default."""
        if self.key in config:
            return self.check(config[self.key])
        if fallback is not None and self.key in fallback:
            return self.check(fallback[self.key])
        return self.default


# The shared keys (serverapps/settings.py declares the server's side).
LOCAL_EPOCHS = Bound(wire.LOCAL_EPOCHS, 1, 0, EPOCHS_MAX)
LOCAL_STEPS = Bound(wire.LOCAL_STEPS, 0, 0, STEPS_MAX)
FINETUNE_STEPS = Bound(wire.FINETUNE_STEPS, 0, 0, STEPS_MAX)
"""> 0 caps the optimizer steps; 0: no cap (``local-epochs`` decides)."""
BATCH_SIZE = Bound(wire.BATCH_SIZE, 32, 1, BATCH_MAX)
LR = Bound(wire.LR, 0.05, 0.0, RATE_MAX)
MOMENTUM = Bound(wire.MOMENTUM, 0.0, 0.0, 1.0, high_open=True)
WEIGHT_DECAY = Bound(wire.WEIGHT_DECAY, 0.0, 0.0, RATE_MAX)
OPTIMIZER = Bound(wire.OPTIMIZER, "sgd", choices=("sgd", "adam", "adamw"))
SEED = Bound(wire.SEED, 0, 0, INT63_MAX)
SERVER_ROUND = Bound(wire.SERVER_ROUND, 0, 0, INT63_MAX)
NUM_ROUNDS = Bound(wire.NUM_ROUNDS, 1, 1, INT63_MAX)
"""The run's rounds (the driver sends it in every train config)."""
ROUTINE = Bound(wire.ROUTINE, wire.PLAIN_ROUTINE)
MODEL_WRAPPER = Bound(wire.MODEL_WRAPPER, "none", choices=models.WRAPPERS)
SPLIT_PHASE = Bound(
    wire.SPLIT_PHASE, "train", choices=("train", "begin", "tail", "step")
)
"""``train``: the round's own train message; the others: ``train.split`` ones."""
DP_CLIPPING_NORM = Bound(wire.DP_CLIPPING_NORM, 0.0, 0.0, RATE_MAX)
"""Client-side DP clipping of the reply's update; 0: none."""
UPLINK_COMPRESSOR = Bound(
    wire.UPLINK_COMPRESSOR, "none", choices=("none", *compression.NAMES)
)
UPLINK_K = Bound(wire.UPLINK_K, 1, 1, INT63_MAX)
UPLINK_LEVELS = Bound(wire.UPLINK_LEVELS, 16, 1, compression.MAX_LEVELS)
UPLINK_ERROR_FEEDBACK = Bound(wire.UPLINK_ERROR_FEEDBACK, False)
UPLINK_REPLY = Bound(wire.UPLINK_REPLY, "model", choices=("model", "update"))
UPLINK_RECORDS = Bound(wire.UPLINK_RECORDS, "")
"""The compressed uplink (``clientapps/uplink.py``); compressor ``"none"``: dense."""
DOWNLINK_COMPRESSOR = Bound(
    wire.DOWNLINK_COMPRESSOR, "none", choices=("none", *compression.NAMES)
)
DOWNLINK_K = Bound(wire.DOWNLINK_K, 1, 1, INT63_MAX)
DOWNLINK_LEVELS = Bound(wire.DOWNLINK_LEVELS, 16, 1, compression.MAX_LEVELS)
DOWNLINK_VERSION = Bound(wire.DOWNLINK_VERSION, 1, 1, INT63_MAX)
DOWNLINK_BASE = Bound(wire.DOWNLINK_BASE, 0, 0, INT63_MAX)
"""The compressed downlink (``clientapps/downlink.py``)."""


def patterns(config: Mapping[str, Any]) -> list[str]:
    """``personal-parameters``: one pattern or a list of them, all strings."""
    value = config.get(wire.PERSONAL, [])
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list | tuple) or not all(
        isinstance(v, str) for v in values
    ):
        raise ConfigError(wire.PERSONAL, value, "a string or a list of strings")
    return list(values)


def _arrays(name: str, record: Any) -> dict[str, np.ndarray]:
    """The record's arrays, decoded; anything else is refused."""
    if not isinstance(record, Mapping):
        raise ConfigError(name, type(record).__name__, "an ArrayRecord", "record")
    arrays = {}
    for key, value in record.items():
        if isinstance(value, np.ndarray):
            arrays[key] = value
            continue
        try:
            arrays[key] = np.asarray(value.numpy())
        except Exception:  # not an Array, or bytes that do not decode
            where = f"{name}[{key!r}]"
            raise ConfigError(
                where, type(value).__name__, "an array", "record"
            ) from None
    return arrays


def check_record(
    name: str, record: Any, model: nn.Module, personal: Iterable[str] = ()
) -> None:
    """Refuse (:class:`ConfigError`) a record that does not pair with ``model``.

    See the module docstring for the rule.
    """
    arrays = _arrays(name, record)
    entries = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    skipped = set(personal)
    for key in entries:
        if key in trainable and key not in skipped and key not in arrays:
            raise ConfigError(f"{name}[{key!r}]", None, "present", "record")
    for key, array in arrays.items():
        where = f"{name}[{key!r}]"
        if key not in entries:
            raise ConfigError(where, key, "absent (no such model entry)", "record")
        like = entries[key]
        if tuple(array.shape) != tuple(like.shape):
            shape = f"shaped {tuple(like.shape)} like the model"
            raise ConfigError(where, tuple(array.shape), shape, "record")
        floating = array.dtype.kind == "f"
        own = str(array.dtype) == str(like.dtype).removeprefix("torch.")
        if not floating and (key in trainable or not own):
            raise ConfigError(where, str(array.dtype), "a float array", "record")
        if floating and not np.isfinite(array).all():
            bad = array[~np.isfinite(array)].flat[0].item()
            raise ConfigError(where, bad, "finite everywhere", "record")
