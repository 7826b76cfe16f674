"""The client refuses out-of-bounds config values and records, storing nothing.

Each case first runs a legal call of the routine (so the node has state: the
personal head, SCAFFOLD's c_i, FedSpeed's h, curriculum scores), then the
refused one: it raises ``ConfigError`` naming the key, and ``Context.state``
is exactly what the legal call left.
"""

import importlib
import math

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp import ClientApp

from bouquet.clientapps.bounds import LR, Bound, ConfigError, check_record
from bouquet.clientapps.recipes import list_recipes
from bouquet.clientapps.routine import train_client
from bouquet.serverapps.settings import SETTINGS
from bouquet.simulations.inprocess import InProcessGrid, ensure_task_identity
from bouquet.strategies.registry import get_algorithm, list_algorithms
from bouquet.tasks import wire

GEN = torch.Generator().manual_seed(0)
DATA = (torch.randn(8, 3, generator=GEN), torch.arange(8) % 2)
SHARED = {
    wire.SERVER_ROUND: 1,
    wire.SEED: 5,
    wire.LOCAL_EPOCHS: 1,
    wire.LOCAL_STEPS: 0,
    wire.BATCH_SIZE: 4,
    wire.LR: 0.05,
    wire.MOMENTUM: 0.5,
    wire.WEIGHT_DECAY: 0.0,
    wire.OPTIMIZER: "sgd",
    wire.LOSS: "cross-entropy",
    wire.PERSONAL: ["head"],
}
C, G, X_PREV = "momentum.c", "momentum.g", "momentum.x-prev"
GUIDANCE, DIRECTION, UPDATE = (
    "fedlex.guidance",
    "fedamd.direction",
    "fedhyper.global-update",
)


def _model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )


def _like(value: float) -> dict[str, np.ndarray]:
    """A record shaped like the model, every entry in its dtype (as servers send)."""
    return {
        k: np.full(tuple(v.shape), value).astype(v.numpy().dtype)
        for k, v in _model().state_dict().items()
    }


LEGAL = {
    "plain": ({}, {}),
    "fedprox": ({"proximal-mu": 0.1}, {}),
    "fedld": ({"fedld.lambda": 0.1}, {}),
    "fedspeed": (
        {
            "fedspeed.rho": 0.1,
            "fedspeed.lambda": 0.1,
            "fedspeed.alpha": 0.5,
            "fedspeed.max-grad-norm": 10.0,
            "fedspeed.server-rule": "all-clients",
        },
        {},
    ),
    "momentum": (
        {"momentum.beta": 0.5, "momentum.scaffold": True, "momentum.vr": True},
        {C: _like(0.01), G: _like(0.02), X_PREV: _like(0.1)},
    ),
    "afa": ({"afa.k": 3, "afa.k-min": 1, "afa.normalize": True}, {}),
    "curriculum": (
        {
            "curriculum.ordering": "anti",
            "curriculum.fraction": 0.5,
            "curriculum.rescore-every": 2,
        },
        {},
    ),
    "fedamd": ({"fedamd.role": "miner"}, {DIRECTION: _like(0.01)}),
    "fedhyper": (
        {
            "fedhyper.client-scheduler": True,
            "fedhyper.num-sampled": 2,
            "fedhyper.hypergrad-lr": 1.0,
            "fedhyper.global-weight": 0.1,
            "fedhyper.gamma-max": 1.1,
            "fedhyper.beta-min": 0.1,
            "fedhyper.beta-max": 10.0,
        },
        {UPDATE: _like(0.01)},
    ),
    "fedlex": (
        {"fedlex.phase": "train", "fedlex.patience": 2, "fedlex.max-grad-norm": 1.0},
        {GUIDANCE: _like(0.5)},
    ),
}


def _message(config: dict, records: dict, node: int = 1) -> Message:
    """A train message: the model, ``config``, ``records`` (None: left out)."""
    ensure_task_identity()
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(_model().state_dict()),
            wire.CONFIG: ConfigRecord(config),
        }
    )
    for name, arrays in records.items():
        if arrays is not None:
            content[name] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    msg = Message(content, dst_node_id=node, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def _call(context: Context, routine: str, config: dict, records: dict) -> Message:
    config = {**SHARED, wire.ROUTINE: routine, **config}
    config = {k: v for k, v in config.items() if v is not None}  # None: drop key
    return train_client(_message(config, records), context, _model(), DATA)


def _snapshot(state: RecordDict) -> dict:
    return {
        name: (
            {k: v.numpy().copy() for k, v in record.items()}
            if isinstance(record, ArrayRecord)
            else dict(record)
        )
        for name, record in state.items()
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        _same(a[k], b[k])
        if isinstance(a[k], dict)
        else np.array_equal(a[k], b[k], equal_nan=True)
        for k in a
    )


def _assert_refused(routine: str, config: dict, records: dict, key: str) -> None:
    context = Context(1, 1, {wire.PARTITION_ID: 0}, RecordDict(), {})
    base_config, base_records = LEGAL[routine]
    _call(context, routine, base_config, base_records)  # state of a legal round
    before = _snapshot(context.state)
    assert before  # at least the personal head
    with pytest.raises(ConfigError) as refused:
        _call(
            context,
            routine,
            {**base_config, **config},
            {**base_records, **records},
        )
    assert key in refused.value.key and key in str(refused.value)
    assert _same(_snapshot(context.state), before)


SHARED_CASES = [
    (wire.LR, math.nan),
    (wire.LR, math.inf),
    (wire.LR, 1e30),
    (wire.LR, -0.1),
    (wire.LR, True),
    (wire.LR, "0.1"),
    (wire.MOMENTUM, math.nan),
    (wire.MOMENTUM, 1.0),
    (wire.WEIGHT_DECAY, math.nan),
    (wire.WEIGHT_DECAY, 1e30),
    (wire.LOCAL_STEPS, -1),
    (wire.LOCAL_STEPS, 10**12),
    (wire.LOCAL_EPOCHS, 10**9),
    (wire.LOCAL_EPOCHS, -1),
    (wire.LOCAL_EPOCHS, 2.5),
    (wire.LOCAL_EPOCHS, True),
    (wire.LOCAL_EPOCHS, "2"),
    (wire.BATCH_SIZE, 0),
    (wire.BATCH_SIZE, 10**7),
    (wire.BATCH_SIZE, math.nan),
    (wire.OPTIMIZER, "lion"),
    (wire.LOSS, "hinge"),
    (wire.SEED, -1),
    (wire.SEED, 1.5),
    (wire.SERVER_ROUND, "1"),
    (wire.PERSONAL, 3),
    (wire.PERSONAL, [1, 2]),
]


@pytest.mark.parametrize(("key", "value"), SHARED_CASES, ids=repr)
def test_shared_settings_are_bounded(key, value):
    _assert_refused("plain", {key: value}, {}, key)


def test_unknown_or_mistyped_routine_is_refused():
    _assert_refused("plain", {wire.ROUTINE: "nope"}, {}, wire.ROUTINE)
    context = Context(1, 1, {}, RecordDict(), {})
    with pytest.raises(ConfigError, match=wire.ROUTINE):
        _call(context, 3, {}, {})  # type: ignore[arg-type]
    assert not context.state


RECIPE_CASES = [
    ("fedprox", "proximal-mu", math.nan),
    ("fedprox", "proximal-mu", 1e30),
    ("fedprox", "proximal-mu", "0.1"),
    ("fedld", "fedld.lambda", math.inf),
    ("fedspeed", "fedspeed.rho", math.nan),
    ("fedspeed", "fedspeed.lambda", -1.0),
    ("fedspeed", "fedspeed.alpha", 2.0),
    ("fedspeed", "fedspeed.max-grad-norm", math.inf),
    ("fedspeed", "fedspeed.server-rule", "some"),
    ("momentum", "momentum.beta", math.nan),
    ("momentum", "momentum.beta", 0.0),
    ("momentum", "momentum.scaffold", "false"),
    ("momentum", "momentum.vr", 1),
    ("afa", "afa.k", 0),
    ("afa", "afa.k-min", 4),  # > afa.k
    ("afa", "afa.normalize", "true"),
    ("curriculum", "curriculum.fraction", math.nan),
    ("curriculum", "curriculum.ordering", "hardest"),
    ("curriculum", "curriculum.rescore-every", 0),
    ("fedamd", "fedamd.role", "boss"),
    ("fedhyper", "fedhyper.client-scheduler", "yes"),
    ("fedhyper", "fedhyper.gamma-max", math.nan),
    ("fedhyper", "fedhyper.beta-max", 1e30),
    ("fedhyper", "fedhyper.num-sampled", True),
    ("fedlex", "fedlex.phase", "exploit"),
    ("fedlex", "fedlex.patience", 0),
    ("fedlex", "fedlex.max-grad-norm", math.inf),
]


@pytest.mark.parametrize(("routine", "key", "value"), RECIPE_CASES, ids=repr)
def test_recipe_hyperparameters_are_bounded(routine, key, value):
    _assert_refused(routine, {key: value}, {}, key)


def _changed(record: str, entry: str, value: np.ndarray) -> dict:
    arrays = dict(LEGAL_RECORDS[record])
    if value is None:
        del arrays[entry]
    else:
        arrays[entry] = value
    return {record: arrays}


LEGAL_RECORDS = {
    name: r for _, records in LEGAL.values() for name, r in records.items()
}
NAN_WEIGHT = np.full((4, 3), np.nan, np.float32)
RECORD_CASES = [
    ("momentum", C, "0.weight", np.zeros((3, 4), np.float32)),  # transposed
    ("momentum", C, "0.weight", NAN_WEIGHT),
    ("momentum", C, "0.bias", np.array([0, np.inf, 0, 0], np.float32)),
    ("momentum", C, "0.weight", np.zeros((4, 3), np.int64)),
    ("momentum", C, "0.bias", None),  # a trainable parameter missing
    ("momentum", C, "extra", np.zeros(2, np.float32)),  # no such entry
    ("momentum", C, "1.running_mean", np.full(4, np.nan, np.float32)),
    ("momentum", G, "2.weight", np.full((2, 4), np.nan, np.float32)),
    ("momentum", X_PREV, "2.bias", np.zeros(3, np.float32)),
    ("fedlex", GUIDANCE, "0.weight", np.ones(3, np.float32)),  # would broadcast
    ("fedlex", GUIDANCE, "0.weight", NAN_WEIGHT),
    ("fedamd", DIRECTION, "0.weight", np.ones((4, 1), np.float32)),
    ("fedamd", DIRECTION, "0.bias", np.full(4, -np.inf, np.float32)),
    ("fedhyper", UPDATE, "0.weight", NAN_WEIGHT),
]


@pytest.mark.parametrize(("routine", "record", "entry", "value"), RECORD_CASES)
def test_records_are_checked_against_the_model(routine, record, entry, value):
    where = f"{record}[{entry!r}]"
    _assert_refused(routine, {}, _changed(record, entry, value), where)


def test_a_record_that_is_not_arrays_is_refused():
    context = Context(1, 1, {}, RecordDict(), {})
    msg = _message({**SHARED, wire.ROUTINE: "fedlex"}, {})
    msg.content[GUIDANCE] = ConfigRecord({"0.weight": 1.0})
    with pytest.raises(ConfigError, match=GUIDANCE):
        train_client(msg, context, _model(), DATA)
    assert not context.state


def test_a_missing_required_record_is_refused():
    _assert_refused("fedamd", {}, {DIRECTION: None}, DIRECTION)
    _assert_refused("fedhyper", {}, {UPDATE: None}, UPDATE)


def test_nan_control_variate_never_reaches_c_i():
    context = Context(1, 1, {}, RecordDict(), {})
    config = {"momentum.beta": 1.0, "momentum.scaffold": True}
    _call(context, "momentum", config, {C: _like(0.01)})
    c_i = _snapshot(context.state)["momentum.c-i"]
    assert all(np.isfinite(v).all() for v in c_i.values())
    with pytest.raises(ConfigError, match=r"momentum\.c\['0\.weight'\]"):
        _call(context, "momentum", config, _changed(C, "0.weight", NAN_WEIGHT))
    assert _same(_snapshot(context.state)["momentum.c-i"], c_i)


def test_legal_edges_and_exact_types_are_accepted():
    assert LR.check(1000) == 1000.0 and type(LR.check(1000)) is float
    assert LR.check(np.float64(0.5)) == 0.5
    epochs = Bound("local-epochs", 1, 0, 10)
    assert epochs.check(2.0) == 2 and type(epochs.check(2.0)) is int
    assert epochs.read({}, {"local-epochs": 3}) == 3 and epochs.read({}) == 1
    for bad in (np.bool_(True), [1], None, 10**400, -(10**400)):
        with pytest.raises(ConfigError):
            LR.check(bad)
    # Integer buffers may travel in their own dtype; a float record is fine too.
    check_record("r", ArrayRecord({k: Array(v) for k, v in _like(0).items()}), _model())
    floats = {k: v.astype(np.float64) for k, v in _like(0).items()}
    check_record("r", ArrayRecord({k: Array(v) for k, v in floats.items()}), _model())
    message = str(ConfigError("lr", math.nan, LR.allowed))
    assert message == "Refused config: lr must be a number in [0, 1000]; got nan."
    assert Bound("k", 1, low=1).allowed == "an integer >= 1"
    assert len(str(ConfigError("loss", "x" * 10**6, "a loss"))) < 200


def test_the_error_reply_names_the_key_value_and_range():
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_client(msg, context, _model(), DATA)

    grid = InProcessGrid(app, 1, run_config={})
    node = next(iter(grid.get_node_ids()))
    msg = _message({**SHARED, wire.LR: math.nan}, {}, node)
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error()
    assert "lr must be a number in [0, 1000]; got nan" in reply.error.reason
    assert not grid.contexts[node].state


def test_every_value_a_server_sends_is_bounded_on_the_client():
    """The server's declarations (sent params, shared settings) vs the client's."""
    shared = {
        b.key: b
        for b in vars(importlib.import_module("bouquet.clientapps.bounds")).values()
        if isinstance(b, Bound)
    }
    for param in SETTINGS:
        if param.key in shared:
            shared[param.key].check(param.default)
    for name in list_algorithms():
        cls = get_algorithm(name)
        assert cls.routine in list_recipes(), name
        module = importlib.import_module(f"bouquet.clientapps.recipes.{cls.routine}")
        bounds = {b.key: b for b in getattr(module, "BOUNDS", ())}
        for param in cls.params:
            key = param.wire_key(name)
            if key is None:
                continue
            assert key in bounds, f"{name} sends {key!r}; recipe has no Bound"
            assert bounds[key].check(param.default) == param.default
