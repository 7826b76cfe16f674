import pytest

from serverapps.settings import DEFAULTS, coerce, hyperparameters, setting
from simulations.inprocess import app_defaults
from strategies.registry import get_algorithm


def test_pyproject_and_settings_declare_the_same_shared_keys():
    declared = {k: v for k, v in app_defaults().items() if "." not in k}
    assert declared == DEFAULTS


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
def test_coerce_good_values(value, default, expected):
    assert coerce("k", value, default) == expected


@pytest.mark.parametrize(("value", "default"), [("oops", 1.0), (2.5, 1), ("yes", True)])
def test_coerce_bad_values_name_the_key(value, default):
    with pytest.raises(ValueError, match="Run config 'k' must be"):
        coerce("k", value, default)


def test_setting_and_hyperparameters_fall_back_to_defaults():
    assert setting({}, "lr") == DEFAULTS["lr"]
    entry = get_algorithm("fedprox")
    assert hyperparameters(entry, {}) == {"proximal-mu": 0.01}
    assert hyperparameters(entry, {"fedprox.proximal-mu": "0.5"}) == {
        "proximal-mu": 0.5
    }
