"""``flower-superlink`` whose admin APIs answer only the machine itself.

Flower 1.42 serves the Fleet API (SuperNodes), the Control API (``flwr run``,
``flwr supernode register``, ``flwr stop``, logs) and the Runtime API (its own
ServerApp processes) on one HTTP(S) port; ``--control-api-address`` and
``--fleet-api-address`` are deprecated and ignored. Without Flower's enterprise
account plugins the Control API has no authentication: whoever reaches the port
(and holds the public ``ca.crt``) can register a SuperNode key, start and stop
runs and read logs. Node authentication then protects nothing.

Run as ``python -P simulations/admin_guard.py [--admin-from CIDR ...]
<flower-superlink arguments>``, this starts the same ``flower-superlink``
with one middleware in front of Flower's: requests whose source address is
not in the admin networks get ``403`` unless they go to the Fleet API
(``/v1/fleet/...``) or ``/health``. The admin networks are loopback
(``127.0.0.0/8``, ``::1``), the ``--host`` address itself when it is a
concrete one (the machine reaching its own interface), and every
``--admin-from`` network. Administer from elsewhere through an SSH tunnel
(``ssh -L 9092:127.0.0.1:9092 server``) or ``--admin-from 10.0.0.7/32``.

The source address is the TCP peer, or what ``X-Forwarded-For`` says when a
proxy on the loopback interface forwards the request (uvicorn trusts those
headers from 127.0.0.1 only): a request can only look local if it is.

This file imports nothing from Bouquet (the deployment scripts run it by path
with ``python -P`` from a neutral directory); it patches
``flwr.superlink.main._get_middleware``, which exists in Flower 1.42, and fails
loudly on a Flower without it.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from typing import Any

PUBLIC_PREFIXES = ("/v1/fleet/", "/health")
"""Paths any source may reach: the SuperNodes' API and the health check."""

LOOPBACK = ("127.0.0.0/8", "::1/128")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def networks(extra: Iterable[str] = (), host: str | None = None) -> tuple[Network, ...]:
    """Loopback, the bind ``host`` if it is a concrete address, and ``extra``."""
    found = [ipaddress.ip_network(n) for n in LOOPBACK]
    found += [ipaddress.ip_network(n, strict=False) for n in extra]
    if host:
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            address = None  # a name: nothing to add
        if address is not None and not address.is_unspecified:
            found.append(ipaddress.ip_network(address))
    return tuple(found)


def is_public(path: str) -> bool:
    """Whether ``path`` may be reached from any source address."""
    return path == "/health" or path.startswith(PUBLIC_PREFIXES)


class AdminGuard:
    """ASGI middleware: admin paths only from the admin networks (403 otherwise)."""

    def __init__(
        self, app: Callable[..., Awaitable[None]], admin: Sequence[Network]
    ) -> None:
        self.app = app
        self.admin = tuple(admin)

    def allowed(self, host: str | None) -> bool:
        """Whether a request from ``host`` may reach admin paths."""
        try:
            address = ipaddress.ip_address(host or "")
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.admin)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        client = scope.get("client") or (None, None)
        if self.allowed(client[0]):
            await self.app(scope, receive, send)
            return
        body = (
            f"{scope.get('path')} is only served to the SuperLink's admin networks "
            f"(request from {client[0]}); see docs/deploy.md"
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def install(admin: Sequence[Network]) -> None:
    """Put :class:`AdminGuard` in front of Flower's SuperLink middleware."""
    import flwr.superlink.main as superlink_main
    from starlette.middleware import Middleware

    original = getattr(superlink_main, "_get_middleware", None)
    if original is None:
        raise RuntimeError(
            "This Flower has no flwr.superlink.main._get_middleware: the admin "
            "guard was written for Flower 1.42 and cannot protect this SuperLink."
        )

    def guarded() -> list[Middleware]:
        return [Middleware(AdminGuard, admin=admin), *original()]

    superlink_main._get_middleware = guarded


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """(``--admin-from`` networks, Flower's arguments, the ``--host`` value)."""
    extra, rest, host = [], [], None
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--admin-from":
            extra.append(args.pop(0))
        elif arg.startswith("--admin-from="):
            extra.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
            if arg == "--host" and args:
                host = args[0]
            elif arg.startswith("--host="):
                host = arg.split("=", 1)[1]
    return extra, rest, host


def main(argv: Sequence[str] | None = None) -> None:
    """Start ``flower-superlink`` with the guard (see the module docstring)."""
    extra, rest, host = split_args(sys.argv[1:] if argv is None else argv)
    admin = networks(extra, host or "127.0.0.1")
    install(admin)
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *rest]
    print(
        "Admin guard: control and runtime APIs answer only "
        + ", ".join(str(n) for n in admin),
        file=sys.stderr,
        flush=True,
    )
    flower_superlink()


if __name__ == "__main__":
    main()
