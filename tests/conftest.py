"""Shared test setup: an offline, private Flower/Ray environment and reply builders."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from bouquet.simulations.proctools import PRIVATE_ENV

for _key, _value in PRIVATE_ENV.items():
    os.environ.setdefault(_key, _value)

if "RAY_TMPDIR" not in os.environ:
    # Ray's default temp dir (/tmp/ray) is shared by the machine: a cluster
    # file left there captures later runs. Short path: Ray's sockets live in it.
    _ray_tmp = tempfile.mkdtemp(prefix="bqray", dir="/tmp")
    os.environ["RAY_TMPDIR"] = _ray_tmp
    atexit.register(shutil.rmtree, _ray_tmp, ignore_errors=True)

from flwr.app import (  # noqa: E402 (environment first)
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from bouquet.simulations.inprocess import ensure_task_identity, give_id  # noqa: E402


def build_wheel(source, out_dir) -> Path:
    """Build Bouquet's wheel from a copy of ``source`` into ``out_dir``; its path.

    The copy keeps setuptools' ``build/`` and ``*.egg-info`` out of the checkout.
    """
    copy = Path(out_dir) / "source"
    shutil.copytree(
        source,
        copy,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "__pycache__", ".*cache"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out_dir),
            str(copy),
        ],
        check=True,
        capture_output=True,
    )
    return next(Path(out_dir).glob("flwr_bouquet-*.whl"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "bouquet-cache"
    monkeypatch.setenv("BOUQUET_CACHE_DIR", str(cache))


def _sent(node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    ensure_task_identity()
    msg = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=node_id,
        message_type=message_type,
    )
    give_id(msg)
    return msg


def answer(strategy, replies, phase: str = "train") -> list[Message]:
    """``replies`` as answers to the messages ``strategy`` sent this round.

    Acceptance takes only a reply to a message the strategy sent, from its
    recipient. A reply from node N is re-addressed to the message sent to N
    (given an id, as a grid does on push); where none was (a round context
    built by hand), one is added to the context's messages, as if sent.
    """
    ctx = strategy.train_round if phase == "train" else strategy.evaluate_round
    kind = MessageType.TRAIN if phase == "train" else MessageType.EVALUATE
    for msg in ctx.messages:  # a grid gives ids on push; a test grid does not
        if not msg.metadata.message_id:
            give_id(msg)
    by_node = {m.metadata.dst_node_id: m for m in ctx.messages}
    out = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in by_node:
            by_node[node] = _sent(node, kind)
            ctx.messages.append(by_node[node])
        body = reply.error if reply.has_error() else reply.content
        out.append(Message(body, reply_to=by_node[node]))
    return out


def make_reply(
    arrays: dict[str, np.ndarray] | None,
    metrics: dict | None = None,
    node_id: int = 1,
    extra: dict | None = None,
    routine: str | None = None,
) -> Message:
    """A reply from ``node_id`` carrying ``arrays`` and ``metrics``.

    ``routine``: the client routine the reply says it ran (its ``client-info``
    record), as a Bouquet client's reply does.
    """
    content = RecordDict()
    if routine is not None:
        content["client-info"] = ConfigRecord({"client-routine": routine})
    if arrays is not None:
        content["arrays"] = ArrayRecord(
            {k: Array(np.asarray(v)) for k, v in arrays.items()}
        )
    content["metrics"] = MetricRecord(
        metrics if metrics is not None else {"num-examples": 10}
    )
    for name, record in (extra or {}).items():
        content[name] = record
    return Message(content, reply_to=_sent(node_id))


def make_error_reply(reason: str, node_id: int = 1) -> Message:
    return Message(Error(2, reason), reply_to=_sent(node_id))


@pytest.fixture
def reply():
    return make_reply


@pytest.fixture
def error_reply():
    return make_error_reply
