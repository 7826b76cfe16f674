"""Client recipes: one module per client routine, found by name.

A recipe module defines ``make_hooks(config) -> list[Hook]``; ``config`` is the
message's config record. It declares the config keys it reads as ``BOUNDS``
(a tuple of :class:`clientapps.bounds.Bound`) and reads them through those
bounds, so that a value out of bounds is refused before training. The
server's strategy names the routine its algorithm needs
(``config["client-routine"]``); algorithms whose clients just train use
``plain``. Only the named module is imported: one broken recipe
never breaks the others, and the client never imports the server side.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping
from typing import Any

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.hooks import Hook
from bouquet.tasks.wire import ROUTINE

Recipe = Callable[[Mapping[str, Any]], list[Hook]]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def list_recipes() -> list[str]:
    """The routines this client can run."""
    return list(_recipes(tuple(__path__)))


@functools.cache
def _recipes(path: tuple[str, ...]) -> tuple[str, ...]:
    # Listing the folder on every message cost 0.3 ms of a 3 ms client call.
    return tuple(
        sorted(m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_"))
    )


def get_recipe(name: str) -> Recipe:
    """The ``make_hooks`` of recipe module ``name``."""
    return _module(name).make_hooks


def get_evaluation(name: str) -> Callable[..., Any] | None:
    """Recipe ``name``'s ``evaluation_model(model, config, state)``, if it has one.

    A routine whose nodes evaluate a model other than the one they hold (a
    realigned head: FedLoGe) defines it; the strategy names the routine in
    its evaluate messages' config too.
    """
    return getattr(_module(name), "evaluation_model", None)


def get_split(name: str) -> Callable[..., Any] | None:
    """Recipe ``name``'s ``split_step(msg, context, model, data, settings, seed)``.

    A routine with split learning as messages (SFPrompt) answers the
    ``train.split`` exchanges after the first with it (:func:`clientapps.
    routine.split_client`); None: the routine has none.
    """
    return getattr(_module(name), "split_step", None)


def partial_arrays(name: str) -> bool:
    """Whether recipe ``name`` declares ``PARTIAL_ARRAYS`` (:mod:`clientapps.partial`).

    Its nodes may be sent part of the trainable model (FedPipe: the adapters
    they train, cut to their rank) and reply in the shapes they were sent.
    False for a routine this client has no recipe for (a user's own hooks).
    """
    if not _NAME.match(name) or name not in list_recipes():
        return False
    return bool(getattr(_module(name), "PARTIAL_ARRAYS", False))


def _module(name: str) -> Any:
    if not _NAME.match(name) or name not in list_recipes():
        known = ", ".join(list_recipes())
        raise ConfigError(
            ROUTINE,
            name,
            f"one of this client's routines ({known}), "
            "or install the Bouquet version the server runs",
        )
    return importlib.import_module(f"{__name__}.{name}")
