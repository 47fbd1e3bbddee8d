"""Starting the proxies under test with host names resolved to loopback ports, the way DNS would.

Both proxies are started through here, bare mitmdump (``mitmproxy.tools.main.mitmdump``, what the
``mitmdump`` command runs) and the gateway (``nhi_gateway.cli.main.main(["run", ...])``, what
``nhi-gateway run`` runs), with the same mapping: the event loop's ``getaddrinfo`` answers
graph.microsoft.com (and the Entra hosts) with the look-alike's loopback address and port. Nothing
else changes, so both proxies see exactly what they would see in production: URL, Host, SNI and
upstream connection reuse are those of the real name.

Why not the gateway's ``--resolve`` (a ``server_connect`` hook that rewrites the server address):
mitmproxy matches a request to an open upstream connection by that address, so after the rewrite
no HTTP/1.1 request reuses its upstream connection; every request opens a new one and the idle ones
stay open. mitmproxy allows 5 connections per address and client connection
(``ConnectionHandler.max_conns``), so the 6th request on a keep-alive client connection waits
forever. With a lazy connection strategy that is every HTTP/1.1 client that keeps its connection.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping

from nhi_gateway.addons.routing import install_resolver
from nhi_gateway.proxy.egress import Address, parse_resolve


def install(loop: asyncio.AbstractEventLoop, resolve: Mapping[str, Address]) -> None:
    """Make ``loop`` resolve the names in ``resolve`` to their address and port."""
    install_resolver(loop, resolve)


class ResolvingPolicy(asyncio.DefaultEventLoopPolicy):
    """Every loop made by ``asyncio.run`` resolves as ``resolve`` says."""

    def __init__(self, resolve: Mapping[str, Address]) -> None:
        super().__init__()
        self.resolve = dict(resolve)

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        install(loop, self.resolve)
        return loop


def run_proxy(kind: str, resolve: list[str], argv: list[str]) -> int:
    """Run ``mitmdump`` or ``nhi-gateway`` with ``argv`` in this process, resolving as told."""
    asyncio.set_event_loop_policy(ResolvingPolicy(parse_resolve(resolve)))
    if kind == "mitmdump":
        from mitmproxy.tools.main import mitmdump

        mitmdump(argv)
        return 0
    if kind == "gateway":
        from nhi_gateway.cli.main import main

        return main(argv)
    raise ValueError(kind)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for mitmdump, which writes no ready file)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
