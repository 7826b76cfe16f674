"""The admin guard in front of the SuperLink: which paths answer which sources."""

import asyncio

import pytest

from bouquet.simulations.admin_guard import (
    AdminGuard,
    install,
    is_public,
    networks,
    split_args,
)


def _call(admin, path, client):
    sent, reached = [], []

    async def app(scope, receive, send):
        reached.append(scope["path"])

    guard = AdminGuard(app, admin)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "client": client}
    asyncio.run(guard(scope, None, send))
    return (403 if sent and sent[0]["status"] == 403 else 200), bool(reached)


@pytest.mark.parametrize(
    ("path", "client", "served"),
    [
        ("/v1/control/start-run", ("127.0.0.1", 5000), True),
        ("/v1/control/start-run", ("::1", 5000), True),
        ("/v1/control/create-node-cli", ("192.0.2.2", 5000), False),
        ("/v1/control/list-runs", ("::ffff:192.0.2.2", 5000), False),
        ("/v1/runtime/pull-task-input", ("10.0.0.9", 5000), False),
        ("/openapi.json", ("10.0.0.9", 5000), False),
        ("/v1/control/list-runs", None, False),
        ("/v1/fleet/activate-node", ("192.0.2.2", 5000), True),
        ("/v1/fleet/pull-messages", ("203.0.113.7", 5000), True),
        ("/health", ("203.0.113.7", 5000), True),
        ("/v1/control/list-runs", ("10.0.0.7", 1), True),  # --admin-from
    ],
)
def test_admin_paths_answer_admin_networks_only(path, client, served):
    admin = networks(["10.0.0.7/32"], host="0.0.0.0")
    status, reached = _call(admin, path, client)
    assert reached == served and (status == 200) == served


def test_a_concrete_bind_address_is_an_admin_source():
    assert AdminGuard(None, networks((), host="192.0.2.2")).allowed("192.0.2.2")
    assert not AdminGuard(None, networks((), host="0.0.0.0")).allowed("192.0.2.2")
    assert not AdminGuard(None, networks((), host="server.example.org")).allowed(
        "192.0.2.2"
    )


def test_public_paths():
    assert is_public("/v1/fleet/push-messages") and is_public("/health")
    assert not is_public("/v1/fleetx") and not is_public("/v1/control/start-run")


def test_split_args_keeps_flowers_arguments():
    extra, rest, host = split_args(
        ["--admin-from", "10.0.0.0/8", "--host", "0.0.0.0", "--admin-from=::1", "-x"]
    )
    assert extra == ["10.0.0.0/8", "::1"]
    assert rest == ["--host", "0.0.0.0", "-x"] and host == "0.0.0.0"


def test_install_puts_the_guard_first(monkeypatch):
    import flwr.superlink.main as superlink_main

    monkeypatch.setattr(
        superlink_main, "_get_middleware", superlink_main._get_middleware
    )
    install(networks())
    middleware = superlink_main._get_middleware()
    assert middleware[0].cls is AdminGuard and len(middleware) > 1
