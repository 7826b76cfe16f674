import pytest

from bouquet.serverapps.settings import (
    DEFAULTS,
    SETTINGS,
    check_settings,
    personal_patterns,
    setting,
    strategy_common,
)
from bouquet.simulations.inprocess import app_defaults
from bouquet.strategies.registry import get_algorithm
from bouquet.tasks.params import Param


def test_pyproject_and_settings_declare_the_same_shared_keys():
    declared = {k: v for k, v in app_defaults().items() if "." not in k}
    assert declared == DEFAULTS
    assert DEFAULTS == {p.key: p.default for p in SETTINGS}
    check_settings(app_defaults())  # the shipped defaults are all valid


@pytest.mark.parametrize(
    ("value", "default", "expected"),
    [
        ("0.5", 1.0, 0.5),
        (3, 1.0, 3.0),
        (2.0, 1, 2),
        ("true", False, True),
        (False, True, False),
        (7, "x", "7"),
    ],
)
def test_parse_good_values(value, default, expected):
    got = Param("k", default).parse(value, "k")
    assert got == expected
    assert type(got) is type(default)


@pytest.mark.parametrize(("value", "default"), [("oops", 1.0), (2.5, 1), ("yes", True)])
def test_parse_bad_values_name_the_key(value, default):
    with pytest.raises(ValueError, match="'k' must be"):
        Param("k", default).parse(value, "k")


def test_setting_and_hyperparameters_fall_back_to_defaults():
    assert setting({}, "lr") == DEFAULTS["lr"]
    assert setting({"lr": "0.5"}, "lr") == 0.5
    cls = get_algorithm("fedprox")
    common = strategy_common({})
    assert cls.from_run_config(common, {}).hyperparameters() == {"proximal-mu": 0.01}
    strategy = cls.from_run_config(common, {"fedprox.proximal-mu": "0.5"})
    assert strategy.hyperparameters() == {"proximal-mu": 0.5}
    assert strategy.proximal_mu == 0.5


def test_bad_algorithm_value_names_its_key():
    cls = get_algorithm("fedprox")
    with pytest.raises(ValueError, match=r"'fedprox\.proximal-mu' must be >= 0"):
        cls.from_run_config(strategy_common({}), {"fedprox.proximal-mu": -1.0})
    with pytest.raises(ValueError, match=r"'fedprox\.proximal-mu' must be float"):
        cls.from_run_config(strategy_common({}), {"fedprox.proximal-mu": "oops"})


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("lr", "oops", "'lr' must be float"),
        ("lr", -0.1, "'lr' must be >= 0"),
        ("fraction-train", 1.5, "'fraction-train' must be [0, 1]"),
        ("num-server-rounds", 0, "'num-server-rounds' must be >= 1"),
        ("num-server-rounds", 2.5, "'num-server-rounds' must be int"),
        ("test-fraction", 1.0, "'test-fraction' must be (0, 1)"),
        ("optimizer", "rmsprop", "'optimizer' must be one of"),
        ("plot", "yes", "'plot' must be bool"),
    ],
)
def test_check_settings_fails_on_a_bad_value_naming_it(key, value, fragment):
    with pytest.raises(ValueError) as err:
        setting({key: value}, key)
    assert fragment in str(err.value)
    with pytest.raises(ValueError) as err:
        check_settings({**app_defaults(), key: value})
    assert fragment in str(err.value)


def test_strategy_common_is_typed():
    common = strategy_common(
        {"fraction-train": "0.5", "min-train-nodes": 3.0, "seed": "7"}
    )
    assert common["fraction_train"] == 0.5
    assert common["min_train_nodes"] == 3 and type(common["min_train_nodes"]) is int
    assert common["seed"] == 7 and common["personal"] == ()
    assert personal_patterns({"personal-parameters": " head, fc.* ,"}) == (
        "head",
        "fc.*",
    )


def test_every_config_mistake_is_one_run_config_error_before_any_node():
    from bouquet.serverapps.run import checked_strategy
    from bouquet.serverapps.settings import DEFAULTS, RunConfigError

    for bad, says in (
        ({"algorithm": "fedlx"}, "Did you mean 'fedlex', 'fedld'"),
        ({"algorithm": "fedld", "fedld.lambda": -1.0}, "'fedld.lambda' must be >= 0"),
        ({"num-server-rounds": 0}, "'num-server-rounds' must be >= 1"),
        ({"momentum": 1.0}, "'momentum' must be"),  # the clients refuse it
        ({"loss": "hinge"}, "loss must be one of"),
        ({"dataset": "nope"}, "nope"),
    ):
        with pytest.raises(RunConfigError, match=says):
            checked_strategy({**DEFAULTS, **bad})
