"""Resuming restores the saved run config and refuses overrides that change it."""

import json

import pytest
from flwr.app import Message

from bouquet.serverapps.resume import (
    RESULT_NEUTRAL_KEYS,
    ResumeConfigError,
    RunConfigGrid,
    merge_resumed,
    restored_values,
    resumed_config,
)
from bouquet.tasks import wire

SAVED = {
    "algorithm": "fedavgm",
    "num-server-rounds": 4,
    "fraction-evaluate": 0.0,
    "seed": 5,
    "round-timeout": 65.0,
    "output-dir": "/runs",
    "resume": "",
    "fedavgm.server-momentum": 0.9,
}
DEFAULTS = {
    **SAVED,
    "num-server-rounds": 10,
    "fraction-evaluate": 1.0,
    "seed": 42,
    "round-timeout": 3600.0,
    "output-dir": "",
}


def _current(**overrides):
    return {**DEFAULTS, **overrides}


def test_resume_alone_restores_the_saved_config():
    overrides = {"resume": "/runs/a"}
    merged = merge_resumed(SAVED, _current(**overrides), overrides)
    assert merged == {**SAVED, "resume": "/runs/a"}


def test_changed_keys_are_refused_with_both_values():
    overrides = {"resume": "/runs/a", "seed": 6, "fraction-evaluate": 1.0}
    with pytest.raises(ResumeConfigError) as err:
        merge_resumed(SAVED, _current(**overrides), overrides, "/runs/a")
    message = str(err.value)
    assert "fraction-evaluate: 0.0 in the run, 1.0 now" in message
    assert "seed: 5 in the run, 6 now" in message
    assert "/runs/a" in message


def test_same_values_and_neutral_keys_are_allowed():
    overrides = {
        "resume": "/runs/a",
        "seed": 5,
        "num-server-rounds": 4.0,  # equal as numbers
        "fedavgm.server-momentum": 0.9,
        "round-timeout": 10.0,
        "node-wait-timeout": 0.0,
        "plot": False,
        "output-dir": "/elsewhere",
    }
    merged = merge_resumed(SAVED, _current(**overrides), overrides)
    assert merged["seed"] == 5 and merged["fraction-evaluate"] == 0.0
    for key in RESULT_NEUTRAL_KEYS:
        assert merged[key] == overrides[key]


def test_rounds_may_be_raised_not_lowered():
    raised = {"resume": "/runs/a", "num-server-rounds": 6}
    assert merge_resumed(SAVED, _current(**raised), raised)["num-server-rounds"] == 6
    lowered = {"resume": "/runs/a", "num-server-rounds": 3}
    with pytest.raises(ResumeConfigError, match="num-server-rounds: 4 in the run, 3"):
        merge_resumed(SAVED, _current(**lowered), lowered)


def test_a_key_the_saved_config_lacks_takes_the_new_value():
    current = {**DEFAULTS, "new-key": "a"}
    assert merge_resumed(SAVED, current, {})["new-key"] == "a"
    overridden = {**current, "new-key": "b"}
    assert merge_resumed(SAVED, overridden, {"new-key": "b"})["new-key"] == "b"


def test_resumed_config_reads_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SAVED))
    overrides = {"resume": str(tmp_path)}
    current = _current(**overrides)
    merged = resumed_config(tmp_path, current, overrides)
    assert merged["num-server-rounds"] == 4
    assert restored_values(current, merged) == {
        "fraction-evaluate": 0.0,
        "num-server-rounds": 4,
        "output-dir": "/runs",
        "round-timeout": 65.0,
        "seed": 5,
    }
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        resumed_config(tmp_path / "missing", DEFAULTS, overrides)


class _Grid:
    def __init__(self):
        self.pushed = []

    def push_messages(self, messages):
        self.pushed += messages
        return ["id"] * len(messages)


def test_clients_get_the_restored_values_and_let_them_win():
    from flwr.app import Context, RecordDict

    from bouquet.clientapps.app import run_config_of
    from bouquet.simulations.inprocess import ensure_task_identity

    ensure_task_identity()
    grid = _Grid()
    messages = [
        Message(RecordDict(), dst_node_id=n, message_type="train") for n in (1, 2)
    ]
    RunConfigGrid(grid, {"seed": 5, "num-server-rounds": 4}).push_messages(messages)
    assert all(
        dict(m.content[wire.RUN_CONFIG]) == {"seed": 5, "num-server-rounds": 4}
        for m in grid.pushed
    )
    context = Context(1, 1, {}, RecordDict(), DEFAULTS)
    assert run_config_of(grid.pushed[0], context) == {
        **DEFAULTS,
        "seed": 5,
        "num-server-rounds": 4,
    }
    plain = Message(RecordDict(), dst_node_id=1, message_type="train")
    assert run_config_of(plain, context) == DEFAULTS
