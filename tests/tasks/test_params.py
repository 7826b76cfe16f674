import inspect
import math

import pytest

from bouquet.strategies.base import BouquetStrategy
from bouquet.tasks.params import Param, Range, defaults, parse_all, python_name


@pytest.mark.parametrize(
    ("text", "expected", "inside", "outside", "shown"),
    [
        ("(0, 1]", Range(0.0, 1.0, True, False), [1e-9, 0.5, 1.0], [0.0, 1.1], None),
        ("[0, 1)", Range(0.0, 1.0, False, True), [0.0, 0.5], [1.0, -1e-9], None),
        (">= 0", Range(low=0.0), [0.0, 1e300], [-1e-9], None),
        ("> 0", Range(low=0.0, low_open=True), [1e-9, 5.0], [0.0, -1.0], None),
        ("<= 1", Range(high=1.0), [1.0, -1e300], [1.0 + 1e-9], None),
        ("[1, inf)", Range(1.0, math.inf, False, True), [1.0, 1e300], [0.5], ">= 1"),
        ("", Range(), [-1e300, 0.0, 1e300], [], None),
    ],
)
def test_range_parse(text, expected, inside, outside, shown):
    got = Range.parse(text)
    assert got == expected
    for value in inside:
        assert value in got
    for value in outside:
        assert value not in got
    assert str(got) == (text if shown is None else shown)
    again = Range.parse(str(got))  # the docs' text reads back as the same set
    assert all(v in again for v in inside) and not any(v in again for v in outside)


@pytest.mark.parametrize("text", ["0..1", "[0; 1]", "between 0 and 1", "=> 0"])
def test_range_parse_rejects_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="Cannot read the range"):
        Range.parse(text)


@pytest.mark.parametrize(
    ("default", "value", "expected"),
    [
        (False, "true", True),
        (False, "True", True),
        (True, "FALSE", False),
        (True, False, False),
        (1, 2.0, 2),
        (1, "3", 3),
        (1, 4, 4),
        (1.0, 3, 3.0),
        (1.0, "0.5", 0.5),
        (1.0, "1e-3", 1e-3),
        ("x", 7, "7"),
    ],
)
def test_param_parse_coerces_to_the_default_type(default, value, expected):
    got = Param("k", default).parse(value)
    assert got == expected and type(got) is type(default)


@pytest.mark.parametrize(
    ("default", "value"),
    [
        (True, "yes"),
        (True, 1),
        (True, "1"),
        (False, None),
        (1, 2.5),
        (1, "2.5"),
        (1, True),
        (1, "oops"),
        (1.0, True),
        (1.0, False),
        (1.0, "oops"),
        (1.0, None),
    ],
)
def test_param_parse_rejects_and_names_the_key(default, value):
    name = type(default).__name__
    with pytest.raises(ValueError, match=rf"'algo\.k' must be {name}"):
        Param("k", default).parse(value, "algo.k")
    # without a name, the key itself is named
    with pytest.raises(ValueError, match=f"'k' must be {name}"):
        Param("k", default).parse(value)


def test_param_parse_checks_the_range_and_names_the_key():
    mu = Param("proximal-mu", 0.01, ">= 0")
    assert mu.parse(0.0) == 0.0
    with pytest.raises(ValueError, match=r"'fedprox\.proximal-mu' must be >= 0"):
        mu.parse(-0.5, "fedprox.proximal-mu")
    share = Param("k-proportion", 0.8, "(0, 1]")
    assert share.parse("1") == 1.0
    with pytest.raises(ValueError, match=r"'k-proportion' must be \(0, 1\]"):
        share.parse(0)
    with pytest.raises(ValueError, match="'k-proportion' must be"):
        share.parse(float("nan"))
    count = Param("k", 10, ">= 1")
    with pytest.raises(ValueError, match=r"'algo\.k' must be >= 1; got 0"):
        count.parse(0, "algo.k")


def test_param_choices():
    weighting = Param("weighting", "uniform", choices=("uniform", "num-examples"))
    assert weighting.parse("num-examples") == "num-examples"
    with pytest.raises(ValueError, match=r"'fedld\.weighting' must be one of") as err:
        weighting.parse("median", "fedld.weighting")
    assert "'median'" in str(err.value)
    with pytest.raises(ValueError, match="not in choices"):
        Param("mode", "other", choices=("full", "loss-only"))
    assert weighting.describe() == "'uniform' (uniform / num-examples)"
    assert Param("mu", 0.5, "[0, 1]").describe() == "0.5 ([0, 1])"
    assert Param("name", "x").describe() == "'x'"


def test_wire_key_arg_defaults_and_parse_all():
    assert Param("beta", 0.1, send=True).wire_key("fedavg-m") == "fedavg-m.beta"
    assert Param("mu", 0.1, send="proximal-mu").wire_key("fedprox") == "proximal-mu"
    assert Param("mu", 0.1).wire_key("fedprox") is None
    assert Param("lambda", 0.1).arg == "lambda_"
    params = (Param("lambda", 0.1, ">= 0"), Param("k", 10, ">= 1"))
    assert defaults(params) == {"lambda": 0.1, "k": 10}
    assert parse_all(params, {"fedld.k": "3"}, "fedld.") == {"lambda": 0.1, "k": 3}
    with pytest.raises(ValueError, match=r"'fedld\.lambda' must be >= 0"):
        parse_all(params, {"fedld.lambda": -1}, "fedld.")


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("lambda", "lambda_"),
        ("k-proportion", "k_proportion"),
        ("eta-g", "eta_g"),
        ("global", "global_"),
        ("beta", "beta"),
    ],
)
def test_python_name(key, name):
    assert python_name(key) == name


class Toy(BouquetStrategy):
    """A strategy with two declared hyperparameters (not registered)."""

    name = "toy"
    params = (
        Param("lambda", 0.1, ">= 0"),
        Param("k-proportion", 0.8, "(0, 1]"),
        Param("mode", "full", choices=("full", "loss-only")),
    )


def test_strategy_hyperparameters_are_typed_attributes():
    toy = Toy(lambda_=1, k_proportion="0.5", min_train_nodes=1)
    assert toy.lambda_ == 1.0 and type(toy.lambda_) is float
    assert toy.k_proportion == 0.5 and toy.mode == "full"
    assert toy.hyperparameters() == {"lambda": 1.0, "k-proportion": 0.5, "mode": "full"}
    assert Toy().hyperparameters() == {
        "lambda": 0.1,
        "k-proportion": 0.8,
        "mode": "full",
    }
    signature = inspect.signature(Toy)
    assert signature.parameters["lambda_"].default == 0.1
    assert signature.parameters["k_proportion"].default == 0.8
    assert "seed" in signature.parameters


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"lambda_": -0.1}, "'toy.lambda' must be >= 0"),
        ({"k_proportion": 0.0}, "'toy.k-proportion' must be (0, 1]"),
        ({"k_proportion": 1.5}, "'toy.k-proportion' must be (0, 1]"),
        ({"k_proportion": "oops"}, "'toy.k-proportion' must be float"),
        ({"mode": "half"}, "'toy.mode' must be one of"),
    ],
)
def test_strategy_out_of_range_keyword_is_named(kwargs, fragment):
    with pytest.raises(ValueError) as err:
        Toy(**kwargs)
    assert fragment in str(err.value)


@pytest.mark.parametrize("kwargs", [{"lambda": 0.1}, {"k-proportion": 0.5}, {"eta": 1}])
def test_strategy_unknown_keyword_is_named(kwargs):
    with pytest.raises(TypeError) as err:
        Toy(**kwargs)
    message = str(err.value)
    assert repr(next(iter(kwargs))) in message
    assert "lambda_, k_proportion, mode" in message


def test_registered_strategy_checks_its_keywords():
    from bouquet.strategies.krum import Krum

    assert Krum(num_malicious_nodes=2).num_malicious_nodes == 2
    with pytest.raises(ValueError, match=r"'krum\.num-malicious-nodes' must be >= 0"):
        Krum(num_malicious_nodes=-1)
    with pytest.raises(ValueError, match=r"'krum\.num-malicious-nodes' must be int"):
        Krum(num_malicious_nodes=1.5)
    with pytest.raises(TypeError, match="num_malicious"):
        Krum(num_malicious=1)


def test_from_run_config_reads_prefixed_keys():
    toy = Toy.from_run_config(
        {"min_train_nodes": 1}, {"toy.lambda": "0.3", "lambda": 9.0, "mode": "x"}
    )
    assert (toy.lambda_, toy.k_proportion, toy.mode) == (0.3, 0.8, "full")
    assert toy.min_train_nodes == 1
    with pytest.raises(ValueError, match=r"'toy\.k-proportion' must be"):
        Toy.from_run_config({}, {"toy.k-proportion": 2})
