from statistics import NormalDist

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from bouquet.clientapps.attacks import (
    Attack,
    LabelFlip,
    StepSpread,
    alie_z,
    attack_for_node,
    attacker_partitions,
)
from bouquet.clientapps.hooks import Hook
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.state import load_arrays, save_arrays
from bouquet.serverapps.run import build_strategy
from bouquet.serverapps.settings import TRAIN_CONFIG_KEYS, setting
from bouquet.simulations.inprocess import (
    InProcessGrid,
    app_defaults,
    ensure_task_identity,
)
from bouquet.strategies.aggregation import to_numpy, to_record

GLOBAL = {"w": np.array([1.0, 1.0], np.float32), "n": np.array(7, np.int64)}
LOCAL = {"w": np.array([2.0, 0.0], np.float32), "n": np.array(9, np.int64)}


def _pair(local=LOCAL, global_=GLOBAL):
    ensure_task_identity()
    msg = Message(
        RecordDict({"arrays": to_record(global_), "config": ConfigRecord()}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    msg.metadata.__dict__["_message_id"] = "m1"
    reply = Message(RecordDict({"arrays": to_record(local)}), reply_to=msg)
    return msg, reply


def _poisoned(attack, state=None, seed=0, local=LOCAL, global_=GLOBAL):
    msg, reply = _pair(local, global_)
    attack.poison(reply, msg, {} if state is None else state, seed)
    return to_numpy(reply.content["arrays"])


def test_attacker_choice_is_a_seeded_fraction():
    chosen = attacker_partitions(10, 0.2, seed=5)
    assert len(chosen) == 2 and chosen <= set(range(10))
    assert attacker_partitions(10, 0.2, seed=5) == chosen
    assert len({frozenset(attacker_partitions(10, 0.2, s)) for s in range(8)}) > 1
    assert attacker_partitions(10, 0.0, seed=5) == set()
    assert len(attacker_partitions(7, 0.5, seed=1)) == 4  # round(3.5)


def test_attack_for_node_checks_and_selects():
    run_config = {"attack": "sign-flip", "attack-fraction": 0.5, "seed": 3}
    chosen = attacker_partitions(4, 0.5, 3)
    for pid in range(4):
        node = {"partition-id": pid, "num-partitions": 4}
        attack = attack_for_node(run_config, node, 1, 10)
        assert (attack is not None) == (pid in chosen)
    assert attack_for_node({"attack": "none"}, {"partition-id": 0}, 1, 10) is None
    attack = attack_for_node(run_config | {"attack-fraction": 1.0}, {}, 1, 10)
    assert attack == Attack("sign-flip", 4.0, 10)  # kind default scale
    with pytest.raises(ValueError, match="attack must be one of"):
        attack_for_node({"attack": "flip", "attack-fraction": 0.1}, {}, 1, 10)
    with pytest.raises(ValueError, match=r"attack-fraction must be in \[0, 1\]"):
        attack_for_node({"attack": "random", "attack-fraction": 2.0}, {}, 1, 10)


def test_sign_flip_golden_and_integer_buffers_untouched():
    out = _poisoned(Attack("sign-flip", 2.0, 10))
    # w_g - 2 (w - w_g) = [1 - 2*1, 1 - 2*(-1)]
    np.testing.assert_array_equal(out["w"], [-1.0, 3.0])
    assert out["w"].dtype == np.float32 and out["n"] == 9


def test_noise_attacks_have_their_scale_and_replay_by_seed():
    big_g = {"w": np.zeros(20000, np.float32)}
    big_l = {"w": np.full(20000, 5.0, np.float32)}
    gauss = _poisoned(Attack("gaussian", 0.5, 10), local=big_l, global_=big_g)["w"]
    assert abs(gauss.mean() - 5.0) < 0.02 and abs(gauss.std() - 0.5) < 0.02
    rand = _poisoned(Attack("random", 2.0, 10), local=big_l, global_=big_g)["w"]
    assert abs(rand.mean()) < 0.05 and abs(rand.std() - 2.0) < 0.05
    again = _poisoned(Attack("random", 2.0, 10), local=big_l, global_=big_g)["w"]
    other = _poisoned(Attack("random", 2.0, 10), seed=1, local=big_l, global_=big_g)
    np.testing.assert_array_equal(rand, again)
    assert not np.array_equal(rand, other["w"])


def test_unreliable_is_honest_first_then_stale_or_noisy():
    attack, state = Attack("unreliable", 1.0, 10), {}
    first = _poisoned(attack, state, seed=0)
    np.testing.assert_array_equal(first["w"], LOCAL["w"])  # nothing stale yet
    kinds = set()
    newer = {"w": np.array([3.0, 3.0], np.float32), "n": np.array(9, np.int64)}
    for seed in range(1, 12):
        state_copy = dict(state)
        out = _poisoned(attack, state_copy, seed=seed, local=newer)["w"]
        kinds.add("stale" if np.array_equal(out, LOCAL["w"]) else "noisy")
        assert not np.array_equal(out, newer["w"])
    assert kinds == {"stale", "noisy"}


def test_label_flip_hook():
    x, y = torch.zeros(3, 2), torch.tensor([0, 4, 9])
    _, flipped = LabelFlip(10).transform_batch(None, x, y)
    assert flipped.tolist() == [9, 5, 0]
    assert Attack("label-flip", 1.0, 10).hooks()[0].num_classes == 10
    assert Attack("gaussian", 1.0, 10).hooks() == []


def _round_replies(run_config):
    from bouquet.clientapps.app import app

    grid = InProcessGrid(app, 4, run_config)
    strategy = build_strategy(run_config)
    model_arrays = _initial_arrays(run_config)
    config = ConfigRecord({k: setting(run_config, k) for k in TRAIN_CONFIG_KEYS})
    messages = list(strategy.configure_train(1, model_arrays, config, grid))
    replies = grid.send_and_receive(messages)
    by_node = {r.metadata.src_node_id: to_numpy(r.content["arrays"]) for r in replies}
    return to_numpy(model_arrays), by_node


def _initial_arrays(run_config):
    from bouquet.tasks import DataSpec, build_model, dataset_info

    spec = DataSpec.from_run_config(run_config, num_partitions=4)
    model = build_model("mlp", dataset_info(spec), seed=int(run_config["seed"]))
    return ArrayRecord(model.state_dict())


def test_attackers_poison_through_the_real_clientapp():
    base = {**app_defaults(), "seed": 3, "local-steps": 3, "fraction-train": 1.0}
    sent, honest = _round_replies(base)
    _, attacked = _round_replies(base | {"attack": "sign-flip", "attack-fraction": 0.5})
    chosen = {1000 + p for p in attacker_partitions(4, 0.5, 3)}
    assert len(chosen) == 2
    for node, arrays in attacked.items():
        for key, value in arrays.items():
            if node in chosen and value.dtype.kind == "f":
                flipped = sent[key] - 4.0 * (honest[node][key] - sent[key])
                np.testing.assert_allclose(value, flipped, rtol=1e-6, atol=1e-6)
            else:
                np.testing.assert_array_equal(value, honest[node][key])


def test_alie_z_is_the_papers_z_max():
    # n = 10, f = 2: s = floor(10/2 + 1) - 2 = 4, z = Phi^-1(6/10) = 0.2533.
    assert alie_z(10, 0.2) == pytest.approx(0.2533471, abs=1e-6)
    assert alie_z(50, 0.2) == pytest.approx(NormalDist().inv_cdf(34 / 50))
    assert alie_z(10, 0.1) == 0.0  # s = n/2: the formula gives no shift
    node = {"partition-id": 0, "num-partitions": 10}
    attack = attack_for_node({"attack": "alie", "attack-fraction": 1.0}, node, 1, 10)
    assert attack == Attack("alie", NormalDist().inv_cdf(0.9999999990), 10)
    assert [type(h).__name__ for h in attack.hooks()] == ["StepSpread"]


def test_alie_spread_of_the_steps_and_the_shifted_update():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    y = torch.tensor([[1.0], [0.5], [-1.0]])
    state = {}
    steps = []

    class Record(Hook):
        def after_step(self, run):
            steps.append(model.weight.detach().clone().numpy().ravel())

    train_local(
        model,
        (x, y),
        TrainSettings(batch_size=1, lr=0.1),
        [StepSpread(), Record()],
        generator=torch.Generator().manual_seed(0),
        state=state,
        loss=torch.nn.functional.mse_loss,
    )
    changes = np.diff(np.vstack([np.zeros(2), *steps]), axis=0)
    expected = changes.std(axis=0) * np.sqrt(len(changes))
    spread = load_arrays(state, "attack", "spread")["weight"].ravel()
    np.testing.assert_allclose(spread, expected, rtol=1e-5, atol=1e-7)
    # The reply: w - z sigma per coordinate (w = w_g + mu).
    sigma = {"w": np.array([0.5, 2.0], np.float32)}
    save_arrays(state, "attack", "spread", sigma)
    out = _poisoned(Attack("alie", 1.5, 10), state=state)
    np.testing.assert_allclose(out["w"], [2.0 - 0.75, 0.0 - 3.0])
    assert out["n"] == 9


def test_rank_reversal_reverses_frl_rankings_only():
    msg, reply = _pair()
    ranks = {"w": np.array([[0, 3], [1, 2]], np.float32), "b": np.zeros(2, np.float32)}
    reply.content["frl.ranks"] = to_record(ranks)
    Attack("rank-reversal", 1.0, 10).poison(reply, msg, {}, 0)
    out = to_numpy(reply.content["frl.ranks"])
    np.testing.assert_array_equal(out["w"], [[3, 0], [2, 1]])
    np.testing.assert_array_equal(out["b"], [0, 0])
    np.testing.assert_array_equal(to_numpy(reply.content["arrays"])["w"], LOCAL["w"])
    # Without rankings (any other algorithm) the attacker is honest.
    assert _poisoned(Attack("rank-reversal", 1.0, 10))["w"].tolist() == [2.0, 0.0]
