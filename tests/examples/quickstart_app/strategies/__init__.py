"""The user's own strategy package (its name is Bouquet's on purpose).

It picks the server's strategy by the run config's ``algorithm``: Flower's
FedAvg, or one of Bouquet's, each imported from Bouquet's public table.
"""

from flwr.serverapp.strategy import FedAvg, Strategy

from bouquet.strategies import SCAFFOLD, FedAdam, FedBuff, FedLD

BOUQUET = {"fedld": FedLD, "scaffold": SCAFFOLD, "fedbuff": FedBuff, "fedadam": FedAdam}


def make_strategy(name: str, fraction_evaluate: float) -> Strategy:
    """The strategy ``name`` (``fedavg`` is Flower's own)."""
    if name == "fedavg":
        return FedAvg(fraction_evaluate=fraction_evaluate)
    return BOUQUET[name](fraction_evaluate=fraction_evaluate)
