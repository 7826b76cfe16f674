"""Server side of Bouquet: the registry, the base strategy and one module per algorithm.

Import a strategy class directly (``from strategies.baselines import FedProx``)
or build one by name (``get_algorithm("fedprox").build(common, hyperparameters)``).
"""

from strategies.registry import (
    AlgorithmEntry,
    UnknownAlgorithmError,
    get_algorithm,
    list_algorithms,
    register,
)

__all__ = [
    "AlgorithmEntry",
    "UnknownAlgorithmError",
    "get_algorithm",
    "list_algorithms",
    "register",
]
