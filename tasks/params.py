"""Hyperparameter declarations: name, default, type and valid range, once.

An algorithm declares its hyperparameters as a tuple of :class:`Param` on its
strategy class (``docs/architecture.md``, "One declaration"). Everything else
derives from that tuple: the constructor's keyword arguments and defaults,
the run-config parsing with its range checks, the ``pyproject.toml`` table
(checked by a test), the README table and the keys sent to clients. The
ServerApp's shared settings (``serverapps/settings.py``) are declared the same
way.

Flower does not type-check ``--run-config`` values (``lr='oops'`` arrives as a
string), so :meth:`Param.parse` coerces every value to the type of its default
and checks its range, with an error that names the key.
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Value = bool | int | float | str

_INTERVAL = re.compile(
    r"^\s*([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(-?inf|[-+0-9.e]+)\s*([\])])\s*$"
)
_BOUND = re.compile(r"^\s*(>=|<=|>|<)\s*([-+0-9.e]+)\s*$")


@dataclass(frozen=True)
class Range:
    """A closed, open or half-open interval; parsed from ``"(0, 1]"``, ``">= 0"``."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, text: str) -> Range:
        """Read ``"[a, b]"``, ``"(a, b)"``, ``"> a"``, ``">= a"``, ``"< b"``..."""
        if not text:
            return cls()
        if match := _INTERVAL.match(text):
            left, low, high, right = match.groups()
            return cls(float(low), float(high), left == "(", right == ")")
        if match := _BOUND.match(text):
            op, number = match.group(1), float(match.group(2))
            if op.startswith(">"):
                return cls(low=number, low_open=op == ">")
            return cls(high=number, high_open=op == "<")
        raise ValueError(f"Cannot read the range {text!r}.")

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if math.isinf(self.low) and math.isinf(self.high):
            return ""
        if math.isinf(self.high):
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if math.isinf(self.low):
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{left}{self.low:g}, {self.high:g}{right}"


def python_name(key: str) -> str:
    """The keyword argument for run-config ``key`` (``k-proportion``: ``k_proportion``).

    Python keywords get a trailing underscore (``lambda`` -> ``lambda_``).
    """
    name = key.replace("-", "_")
    return f"{name}_" if keyword.iskeyword(name) else name


@dataclass(frozen=True)
class Param:
    """One hyperparameter.

    Attributes
    ----------
    key : str
        Run-config key, kebab-case, the paper's name where it has one; the run
        config spells it ``"<algorithm>.<key>"``.
    default : bool, int, float or str
        Default (the paper's value); its type is the parameter's type.
    bounds : str
        Valid range of a number: ``">= 0"``, ``"(0, 1]"``, ... ("" = any).
    help : str
        One line for the docs (what the paper calls it, equation number).
    choices : tuple of str
        The valid values of a string parameter (empty = any string).
    send : bool or str
        Sent to clients in every train message's config: ``True`` under
        ``"<algorithm>.<key>"``, a string under that key (e.g. Flower's
        ``"proximal-mu"``).

    """

    key: str
    default: Value
    bounds: str = ""
    help: str = ""
    choices: tuple[str, ...] = ()
    send: bool | str = False
    range: Range = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "range", Range.parse(self.bounds))
        if self.choices and self.default not in self.choices:
            raise ValueError(f"{self.key}: default {self.default!r} not in choices.")

    @property
    def arg(self) -> str:
        """The constructor's keyword argument for this parameter."""
        return python_name(self.key)

    def wire_key(self, namespace: str) -> str | None:
        """The config key it is sent under, or None if it stays on the server."""
        if self.send is True:
            return f"{namespace}.{self.key}"
        return self.send or None

    def parse(self, value: Any, name: str | None = None) -> Value:
        """``value`` coerced to the default's type and checked; ValueError naming it."""
        name = name or self.key
        kind = type(self.default)
        try:
            if value is None:
                raise ValueError
            if kind is bool:
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    value = value.lower() == "true"
                elif not isinstance(value, bool):
                    raise ValueError
            elif kind is int:
                if isinstance(value, bool) or (
                    isinstance(value, float) and not value.is_integer()
                ):
                    raise ValueError
                value = int(value)
            elif kind is float:
                if isinstance(value, bool):
                    raise ValueError
                value = float(value)
            else:
                value = kind(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"'{name}' must be {kind.__name__} (like {self.default!r}); "
                f"got {value!r}."
            ) from None
        if self.choices and value not in self.choices:
            raise ValueError(f"'{name}' must be one of {self.choices}; got {value!r}.")
        if kind in (int, float) and (
            not math.isfinite(value) or value not in self.range
        ):
            raise ValueError(f"'{name}' must be {self.range}; got {value!r}.")
        return value

    def describe(self) -> str:
        """``default`` plus its range or choices, for tables."""
        if self.choices:
            return f"{self.default!r} ({' / '.join(self.choices)})"
        bounds = str(self.range)
        return f"{self.default!r}" + (f" ({bounds})" if bounds else "")


def parse_all(
    params: Iterable[Param],
    values: Mapping[str, Any],
    prefix: str = "",
) -> dict[str, Value]:
    """``key -> parsed value`` for every param, from ``values[prefix + key]``."""
    return {
        p.key: p.parse(values.get(prefix + p.key, p.default), prefix + p.key)
        for p in params
    }


def defaults(params: Iterable[Param]) -> dict[str, Value]:
    """``key -> default`` (the shape of a ``pyproject.toml`` table)."""
    return {p.key: p.default for p in params}
