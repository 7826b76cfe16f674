import subprocess
import sys
import tomllib

import pytest

import bouquet.strategies.registry as registry
from bouquet.simulations.inprocess import app_defaults
from bouquet.strategies.base import BouquetStrategy
from bouquet.strategies.registry import (
    UnknownAlgorithmError,
    broken_modules,
    get_algorithm,
    list_algorithms,
    pyproject_tables,
    register,
)
from bouquet.tasks.params import Param


def test_baselines_registered_and_wildcards():
    names = list_algorithms()
    assert {"fedavg", "fedprox", "fedavgm", "fedadam", "krum", "fedmedian"} <= set(
        names
    )
    assert "krum" not in list_algorithms("fed*")
    assert list_algorithms("fedav?") == ["fedavg"]


def test_get_algorithm_returns_the_class():
    from bouquet.strategies.fedavg import FedAvg
    from bouquet.strategies.krum import Krum

    assert get_algorithm("fedavg") is FedAvg
    assert get_algorithm("krum") is Krum
    for name in list_algorithms():
        cls = get_algorithm(name)
        assert isinstance(cls, type) and issubclass(cls, BouquetStrategy)
        assert cls.name == name


def test_every_module_imports():
    assert broken_modules() == {}


def test_unknown_name_lists_known_and_suggests():
    with pytest.raises(UnknownAlgorithmError) as err:
        get_algorithm("fedprx")
    assert isinstance(err.value, KeyError)
    message = str(err.value)
    assert "Did you mean 'fedprox'" in message
    for name in list_algorithms():
        assert name in message


def test_unknown_name_reports_broken_modules(monkeypatch):
    monkeypatch.setitem(registry._BROKEN, "oops", "SyntaxError: invalid syntax")
    with pytest.raises(UnknownAlgorithmError, match="failed to import: oops"):
        get_algorithm("not-an-algorithm")
    assert broken_modules()["oops"] == "SyntaxError: invalid syntax"


def test_duplicate_registration_raises():
    cls = get_algorithm("fedavg")
    assert register(cls) is cls  # re-registering the same class is harmless
    impostor = type("Impostor", (BouquetStrategy,), {"name": "fedavg"})
    with pytest.raises(ValueError, match="already registered"):
        register(impostor)
    assert get_algorithm("fedavg") is cls


@pytest.mark.parametrize(
    ("attributes", "fragment"),
    [
        ({"name": "Bad_Name"}, "kebab-case"),
        ({"name": ""}, "kebab-case"),
        ({"name": "no-routine", "routine": ""}, "routine must name a recipe"),
    ],
)
def test_register_checks_the_declaration(attributes, fragment, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    cls = type("Bad", (BouquetStrategy,), attributes)
    with pytest.raises(ValueError, match=fragment):
        register(cls)
    assert attributes["name"] not in registry._REGISTRY


def test_pyproject_tables_match_pyproject_and_the_declarations():
    tables = tomllib.loads(pyproject_tables())["tool"]["flwr"]["app"]["config"]
    assert sorted(tables) == list_algorithms()
    declared = app_defaults()
    for name, table in tables.items():
        assert table == {p.key: p.default for p in get_algorithm(name).params}
        assert {
            k.split(".", 1)[1]: v
            for k, v in declared.items()
            if k.startswith(f"{name}.")
        } == table


@pytest.mark.parametrize("key", ["a", "seed"])
def test_a_hyperparameter_declared_twice_is_refused(key, monkeypatch):
    # Twice, or as one of the arguments every strategy takes: the class
    # statement (its constructor signature) or register() refuses it.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    params = (Param(key, 1), Param(key, 2)) if key == "a" else (Param(key, 1),)
    with pytest.raises(ValueError, match=f"'{key}'"):
        register(type("Twice", (BouquetStrategy,), {"name": "twice", "params": params}))
    assert "twice" not in registry._REGISTRY


def test_importing_one_module_first_breaks_no_other():
    # `from bouquet.strategies import pieces` inside ef21 once made the package
    # discover every algorithm while ef21 was half-imported (EControl failed).
    done = subprocess.run(
        [sys.executable, "-c", "import bouquet.strategies.ef21"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "failed to import" not in done.stderr + done.stdout
