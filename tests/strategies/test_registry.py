import pytest

from strategies.registry import (
    AlgorithmEntry,
    UnknownAlgorithmError,
    get_algorithm,
    list_algorithms,
    register,
)


def test_baselines_registered_and_wildcards():
    names = list_algorithms()
    assert {"fedavg", "fedprox", "fedavgm", "fedadam", "krum", "fedmedian"} <= set(
        names
    )
    assert "krum" not in list_algorithms("fed*")
    assert list_algorithms("fedav?") == ["fedavg"]


def test_unknown_name_lists_known_and_suggests():
    with pytest.raises(UnknownAlgorithmError) as err:
        get_algorithm("fedprx")
    message = str(err.value)
    assert "Did you mean 'fedprox'" in message
    for name in list_algorithms():
        assert name in message


def test_duplicate_registration_raises():
    entry = get_algorithm("fedavg")
    assert register(entry) is entry  # re-registering the same entry is harmless
    with pytest.raises(ValueError, match="already registered"):
        register(AlgorithmEntry("fedavg", entry.build))
