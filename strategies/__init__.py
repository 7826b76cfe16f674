"""Server side of Bouquet: the registry, the base strategy and one module per algorithm.

Import a strategy class from its module (``from strategies.fedprox import
FedProx``) or look one up by name (``get_algorithm("fedprox")``); see
``docs/architecture.md`` for the shape of the package.
"""

from strategies.registry import (
    UnknownAlgorithmError,
    get_algorithm,
    list_algorithms,
    register,
)

__all__ = [
    "UnknownAlgorithmError",
    "get_algorithm",
    "list_algorithms",
    "register",
]
