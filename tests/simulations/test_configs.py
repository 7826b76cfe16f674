"""Every reproduction config names declared keys with valid values."""

from pathlib import Path

import pytest

from bouquet.serverapps.run import build_strategy
from bouquet.serverapps.settings import check_settings
from bouquet.simulations.inprocess import app_defaults
from bouquet.simulations.sweep import load_override_file

CONFIGS = sorted(
    (Path(__file__).resolve().parents[2] / "simulations" / "configs").rglob("*.toml")
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_reproduction_config_is_valid(path):
    overrides, _ = load_override_file(path)
    defaults = app_defaults()
    assert set(overrides) <= set(defaults), sorted(set(overrides) - set(defaults))
    run_config = {**defaults, **overrides}
    check_settings(run_config)
    build_strategy(run_config)


def test_there_are_configs():
    assert len(CONFIGS) > 20
