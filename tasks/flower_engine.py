"""Flower's simulation engine, polled in one pass instead of one pass per node.

Flower's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``) hands
messages to its workers from a thread, ``add_messages_to_queue``, that asks the
link state for each node's next message every 0.1 s. Each ask
(``InMemoryLinkState.get_message_ins``) walks the whole message store and
re-checks every stored message it passes (expiry, federation membership), so
one poll costs (nodes x messages in flight) checks, under the state's lock.
Measured on 2 CPUs (``simulations/bench_small_clients.py``): with 200 nodes and
100 messages in flight the loop keeps a core busy; with 10,000 nodes and 1,000
in flight one poll takes tens of seconds, which was the 68.7 s round of
``docs/benchmarks.md`` section 4 (flwrlabs/flower#4993).

:func:`install` replaces that thread's function, in the engine's process only,
with :func:`add_messages_to_queue`: the same contract (at most the oldest
undelivered message per node per poll, marked delivered as Flower marks it, the
store's invalid messages deleted by Flower's own check) computed in one walk
of the store per poll. The interval adapts: ten times the poll's own duration,
between 10 ms and Flower's 100 ms, so polling costs at most about a tenth of a
core however large the federation.

It is version-checked. The replacement relies on the source of three Flower
functions (the loop, the per-node query and the store check); their hashes for
the Flower versions it was measured on are in :data:`FLOWER_SOURCES`. On any
other source :func:`install` leaves Flower's loop in place and logs why, and
``tests/tasks/test_flower_engine.py`` fails, so an upgrade is re-measured
rather than silently running a replacement that no longer matches.

It is installed by importing ``bouquet.clientapps`` inside the engine's
process (Flower loads the ClientApp there before it starts the thread);
``BOUQUET_ENGINE_POLL=flower`` keeps Flower's loop.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

ENGINE_MODULE = "flwr.server.superlink.fleet.vce.vce_api"
"""Flower's simulation engine; imported only in the process that runs it."""

FLOWER_SOURCES = {
    "add_messages_to_queue": "953f4bd41a931a77",
    "InMemoryLinkState.get_message_ins": "6547c8dcbc62e12f",
    "InMemoryLinkState._check_stored_messages": "2be47567d2478a58",
}
"""SHA-256 (first 16 hex digits) of the Flower sources the replacement
mirrors, as in Flower 1.42.0."""

MIN_INTERVAL = 0.01
MAX_INTERVAL = 0.1
"""Seconds between polls: Flower's 0.1 s at most."""

ENV_SWITCH = "BOUQUET_ENGINE_POLL"

_installed: dict[str, Any] = {}
_lock = threading.Lock()


def source_hash(function: Callable[..., Any]) -> str:
    """The first 16 hex digits of the SHA-256 of ``function``'s source."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def flower_mismatches() -> list[str]:
    """The Flower functions whose source differs from :data:`FLOWER_SOURCES`."""
    import importlib

    from flwr.server.superlink.linkstate.in_memory_linkstate import (
        InMemoryLinkState,
    )

    engine = importlib.import_module(ENGINE_MODULE)
    functions = {
        "add_messages_to_queue": _installed.get(
            "original", engine.add_messages_to_queue
        ),
        "InMemoryLinkState.get_message_ins": InMemoryLinkState.get_message_ins,
        "InMemoryLinkState._check_stored_messages": (
            InMemoryLinkState._check_stored_messages
        ),
    }
    return [
        f"{name} ({source_hash(function)}, expected {FLOWER_SOURCES[name]})"
        for name, function in functions.items()
        if source_hash(function) != FLOWER_SOURCES[name]
    ]


def pending_messages(state: Any, node_ids: set[int]) -> list[Any]:
    """The oldest undelivered message of each node in ``node_ids``, now delivered.

    What one pass of Flower's loop (``get_message_ins(node_id, limit=1)`` for
    every node) returns, from one walk of the store: Flower's own check first
    deletes the expired messages and those whose nodes left the federation.
    """
    from flwr.supercore.date import now

    chosen: dict[int, Any] = {}
    with state.lock:
        state._check_stored_messages(set(state.message_ins_store))
        for message in state.message_ins_store.values():
            node_id = message.metadata.dst_node_id
            if (
                node_id in chosen
                or node_id not in node_ids
                or message.metadata.delivered_at != ""
            ):
                continue
            chosen[node_id] = message
        delivered_at = now().isoformat()
        for message in chosen.values():
            message.metadata.delivered_at = delivered_at
    return list(chosen.values())


def add_messages_to_queue(
    state: Any,
    queue: Any,
    nodes_mapping: Iterable[int],
    f_stop: threading.Event,
) -> None:
    """Flower's extractor thread, one store walk per poll (module docstring)."""
    node_ids = set(nodes_mapping)
    while not f_stop.is_set():
        start = time.perf_counter()
        for message in pending_messages(state, node_ids):
            queue.put(message)
        spent = time.perf_counter() - start
        f_stop.wait(min(MAX_INTERVAL, max(MIN_INTERVAL, 10 * spent)))


def install() -> bool:
    """Use :func:`add_messages_to_queue` in Flower's engine, if it runs here.

    Returns whether the replacement is in place. Does nothing outside the
    engine's process, when ``BOUQUET_ENGINE_POLL=flower``, or when Flower's
    sources differ from the measured ones (logged once).
    """
    engine = sys.modules.get(ENGINE_MODULE)
    if engine is None or os.environ.get(ENV_SWITCH, "") == "flower":
        return False
    if sys.argv and os.path.basename(sys.argv[0]) == "default_worker.py":
        return False  # a Ray worker (a ClientApp actor) imports, never runs, it
    from logging import INFO, WARNING

    from flwr.common.logger import log

    with _lock:
        if "original" in _installed:
            return True
        mismatches = flower_mismatches()
        if mismatches:
            if not _installed.get("warned"):
                _installed["warned"] = True
                log(
                    WARNING,
                    "Flower's simulation engine polls every node separately; "
                    "Bouquet's one-pass poll is off because these Flower sources "
                    "changed: %s",
                    ", ".join(mismatches),
                )
            return False
        _installed["original"] = engine.add_messages_to_queue
        engine.add_messages_to_queue = add_messages_to_queue
    log(
        INFO,
        "Simulation engine: all nodes polled in one pass (bouquet.tasks.flower_engine)",
    )
    return True


def uninstall() -> None:
    """Put Flower's own loop back (tests)."""
    engine = sys.modules.get(ENGINE_MODULE)
    with _lock:
        original = _installed.pop("original", None)
        if engine is not None and original is not None:
            engine.add_messages_to_queue = original
