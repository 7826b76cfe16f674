"""Conformance over the registry: every algorithm gets these tests the day it lands.

What can fail on what matters (docs/architecture.md, "Conformance"):

- its declaration is complete and ``pyproject.toml`` declares its table;
- a 2-round run moves the model, every reply of the algorithm's own client is
  accepted, each names the routine it ran and carries the declared records
  and metrics, the state round-trips and the run replays exactly;
- a strategy with a client half refuses a client that did not run it, and
  fails the run saying so;
- every reduction the algorithm declares holds numerically;
- a decentralized algorithm (no global model) returns the average of its node
  models and reports their consensus distance every round.
"""

import json

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from bouquet.serverapps.run import build_strategy, effective_run_config
from bouquet.serverapps.settings import DEFAULTS
from bouquet.simulations.inprocess import app_defaults, run_inprocess
from bouquet.strategies.gossip import GossipStrategy
from bouquet.strategies.registry import get_algorithm, list_algorithms
from bouquet.strategies.state import load_state
from bouquet.strategies.validation import RoutineMissingError
from bouquet.tasks import wire

ALGORITHMS = list_algorithms()
REDUCTIONS = [
    (name, i) for name in ALGORITHMS for i in range(len(get_algorithm(name).reductions))
]


def _equal(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, list):
        return (
            isinstance(b, list)
            and len(a) == len(b)
            and all(_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return a == b


def _initial_arrays(config):
    from bouquet.tasks import DataSpec, dataset_info
    from bouquet.tasks.finetune import build_task_model

    run_config = {**app_defaults(), **config}
    # The shared settings an algorithm fixes (FedIns' SSF pools) shape the model.
    run_config = effective_run_config(build_strategy(run_config), run_config)
    spec = DataSpec.from_run_config(run_config, num_partitions=4)
    model = build_task_model(
        run_config,
        dataset_info(spec),
        wrapper=get_algorithm(run_config["algorithm"]).model_wrapper,
    )
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_pyproject_declares_the_shared_settings():
    declared = {k: v for k, v in app_defaults().items() if "." not in k}
    assert declared == DEFAULTS


@pytest.mark.parametrize("name", ALGORITHMS)
def test_declaration_is_complete_and_pyproject_declares_it(name):
    cls = get_algorithm(name)
    assert cls.paper and cls.tagline and cls.family and cls.__doc__
    declared = {
        k.split(".", 1)[1]: v
        for k, v in app_defaults().items()
        if k.startswith(f"{name}.")
    }
    assert declared == {p.key: p.default for p in cls.params}
    assert cls.__module__.startswith("bouquet.strategies.")
    module_doc = __import__(cls.__module__, fromlist=["_"]).__doc__
    assert "http" in module_doc or "ICML" in module_doc or "NeurIPS" in module_doc


def _recording_app(seen: list[Message], strip: tuple[str, ...] = ()):
    """Bouquet's ClientApp; train replies are recorded, ``strip`` removed."""
    from bouquet.clientapps.app import app

    def client(msg: Message, context) -> Message:
        reply = app(msg, context)
        if msg.metadata.message_type == "train" and reply.has_content():
            content = RecordDict(dict(reply.content.items()))
            for name in strip:
                content.pop(name, None)
            reply = Message(content, reply_to=msg)
            seen.append(reply)
        return reply

    return client


@pytest.mark.parametrize("name", ALGORITHMS)
def test_two_rounds_move_the_model_and_every_reply_conforms(name, tmp_path):
    cls = get_algorithm(name)
    config = {
        "algorithm": name,
        "num-server-rounds": 2,
        "fraction-evaluate": 0.0,
        "output-dir": str(tmp_path),
        "seed": 7,
        "model": "cnn",  # BatchNorm: float buffers and a 0-d integer buffer
        "plot": False,
        **cls.replay_settings,
    }
    seen: list[Message] = []
    first, path, _ = run_inprocess(config, num_nodes=4, client_app=_recording_app(seen))
    arrays = {k: v.numpy() for k, v in first.arrays.items()}
    assert arrays and all(np.isfinite(a).all() for a in arrays.values())
    initial = _initial_arrays(config)
    assert not cls.global_model or any(
        not np.array_equal(arrays[k], initial[k])
        for k in arrays
        if arrays[k].dtype.kind == "f"
    ), "the model did not move in 2 rounds"

    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    for row in rows[1:]:
        assert row["train-dropped"] == 0 and row["error-replies"] == 0, row
        assert row["train-replies"] > 0 and not row["update-skipped"], row
    assert seen
    for reply in seen:
        content = reply.content
        assert content[wire.CLIENT_INFO][wire.ROUTINE] == cls.routine
        assert set(cls.reply_metrics) <= set(content[wire.METRICS].keys())
        assert set(cls.reply_records) <= set(content.array_records)

    if issubclass(cls, GossipStrategy):
        # No global model: the arrays are the average of the node models, and
        # every round reports how far the nodes are from it.
        last = [r.content[wire.GOSSIP_MODEL] for r in seen[-4:]]
        for key, value in arrays.items():
            if value.dtype.kind == "f":
                mean = np.mean([m[key].numpy().astype(np.float64) for m in last], 0)
                np.testing.assert_allclose(value, mean, rtol=1e-5, atol=1e-6)
        assert all(r["train-consensus-distance"] >= 0 for r in rows[1:])

    state = load_state(path / "checkpoint")
    assert state.round == 2
    fresh = build_strategy({**app_defaults(), **config})
    fresh.load_state(state.strategy)
    assert _equal(fresh.export_state(), state.strategy)

    again, _, _ = run_inprocess(config, num_nodes=4)
    for key, value in arrays.items():
        np.testing.assert_array_equal(value, again.arrays[key].numpy())


FAST = {
    "num-server-rounds": 2,
    "fraction-evaluate": 0.0,
    "local-steps": 4,
    "lr": 0.05,
    "momentum": 0.0,
    "seed": 3,
    "plot": False,
}


@pytest.mark.parametrize(
    "name", [n for n in ALGORITHMS if get_algorithm(n).routine != wire.PLAIN_ROUTINE]
)
def test_a_client_without_the_routine_fails_the_run_loudly(name, tmp_path):
    routine = get_algorithm(name).routine
    config = {**FAST, "algorithm": name, "output-dir": str(tmp_path)}
    app = _recording_app([], strip=(wire.CLIENT_INFO,))
    with pytest.raises(RoutineMissingError, match=f"routine '{routine}'"):
        run_inprocess(config, num_nodes=3, client_app=app)


def test_a_server_only_algorithm_takes_any_client(tmp_path):
    config = {**FAST, "algorithm": "fedavg", "output-dir": str(tmp_path)}
    app = _recording_app([], strip=(wire.CLIENT_INFO,))
    _, path, _ = run_inprocess(config, num_nodes=3, client_app=app)
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    assert all(r["train-replies"] == 3 for r in rows[1:])


@pytest.mark.parametrize(
    "name",
    [n for n in ALGORITHMS if get_algorithm(n).reply_metrics],
)
def test_declared_reply_metrics_are_enforced(name, tmp_path):
    cls = get_algorithm(name)
    missing = cls.reply_metrics[0]
    seen: list[Message] = []
    app = _recording_app(seen)

    def without_metric(msg, context):
        reply = app(msg, context)
        if msg.metadata.message_type == "train":
            metrics = reply.content[wire.METRICS]
            del metrics[missing]
        return reply

    config = {**FAST, "algorithm": name, "output-dir": str(tmp_path)}
    _, path, _ = run_inprocess(config, num_nodes=3, client_app=without_metric)
    rows = json.loads((path / "metrics.json").read_text())["rounds"]
    assert all(r["train-replies"] == 0 and r["update-skipped"] for r in rows[1:])
    assert all(missing in reason for reason in rows[1]["drop-reasons"])


@pytest.mark.parametrize(("name", "index"), REDUCTIONS)
def test_declared_reductions_hold(name, index, tmp_path):
    reduction = get_algorithm(name).reductions[index]
    config = {**FAST, "model": "mlp", "output-dir": str(tmp_path)}
    mine = {f"{name}.{k}": v for k, v in reduction.settings.items()}
    theirs = {
        f"{reduction.equals}.{k}": v for k, v in reduction.equals_settings.items()
    }
    got, _, _ = run_inprocess({**config, "algorithm": name, **mine}, num_nodes=4)
    expected, _, _ = run_inprocess(
        {**config, "algorithm": reduction.equals, **theirs}, num_nodes=4
    )
    for key in expected.arrays:
        np.testing.assert_allclose(
            got.arrays[key].numpy(),
            expected.arrays[key].numpy(),
            rtol=1e-5,
            atol=1e-6,
            err_msg=f"{name} with {reduction.settings} != {reduction.equals}",
        )
