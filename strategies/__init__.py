"""Server side of Bouquet: the registry, the base strategy and one module per algorithm.

Every algorithm's strategy class is importable from here by its class name,
the one stable import (the README's algorithm table lists them)::

    from bouquet.strategies import SCAFFOLD, FedAdam, FedBuff, FedLD

or looked up by its registered name (``get_algorithm("scaffold")``). Classes
load on first use (PEP 562); see ``docs/architecture.md`` for the shape of
the package.
"""

from __future__ import annotations

from typing import Any

from bouquet.strategies.registry import (
    UnknownAlgorithmError,
    get_algorithm,
    list_algorithms,
    register,
    strategy_classes,
)

__all__ = [
    "UnknownAlgorithmError",
    "get_algorithm",
    "list_algorithms",
    "register",
    "strategy_classes",
]


def __getattr__(name: str) -> Any:
    if name == "BouquetStrategy":
        from bouquet.strategies.base import BouquetStrategy

        return BouquetStrategy
    if name == "Driver":
        from bouquet.strategies.driver import Driver

        return Driver
    if not name[:1].isupper():
        # A submodule not imported yet (``from bouquet.strategies import
        # pieces``): Python asks here first. Discovering every algorithm now
        # would import modules that are still half-initialised.
        raise AttributeError(f"module 'bouquet.strategies' has no attribute {name!r}")
    classes = strategy_classes()
    if name not in classes:
        raise AttributeError(
            f"module 'bouquet.strategies' has no attribute {name!r}; its strategy "
            f"classes are: {', '.join(sorted(strategy_classes()))}."
        )
    globals()[name] = classes[name]
    return classes[name]


def __dir__() -> list[str]:
    return sorted([*globals(), *strategy_classes(), "BouquetStrategy", "Driver"])
