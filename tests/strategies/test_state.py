import numpy as np
import pytest

from bouquet.strategies.state import ServerState, load_state, save_state


def test_state_roundtrip(tmp_path):
    state = ServerState(
        round=3,
        arrays={"b": np.arange(3, dtype=np.float32), "a": np.eye(2)},
        strategy={
            "m_t": {"b": np.ones(3)},
            "history": [np.zeros(2), None, 1.5],
            "flag": True,
            "name": "x",
        },
    )
    save_state(state, tmp_path / "ckpt")
    loaded = load_state(tmp_path / "ckpt")
    assert loaded.round == 3
    assert list(loaded.arrays) == ["b", "a"]  # state-dict order kept
    np.testing.assert_array_equal(loaded.arrays["a"], np.eye(2))
    assert loaded.arrays["b"].dtype == np.float32
    np.testing.assert_array_equal(loaded.strategy["m_t"]["b"], np.ones(3))
    assert loaded.strategy["history"][1:] == [None, 1.5]
    assert loaded.strategy["flag"] is True and loaded.strategy["name"] == "x"
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_checkpoint_and_bad_values(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "nope")
    with pytest.raises(TypeError):
        save_state(ServerState(1, {}, {"x": object()}), tmp_path / "c")
