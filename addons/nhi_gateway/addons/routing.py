"""Routing: send a host name to another address, keeping URL, Host and SNI.

This is how the loopback look-alikes stand in for graph.microsoft.com and
login.microsoftonline.com: the client's request is exactly what it would be in production.

The mapping works like DNS: the event loop's ``getaddrinfo`` answers the mapped names with the
mapped address and port. Rewriting ``server.address`` in a ``server_connect`` hook instead breaks
connection reuse: mitmproxy reuses an upstream connection only when its address equals the
request's, so every HTTP/1.1 request opened a new connection and the sixth on one client
connection waited for mitmproxy's per-address connection limit (and an open connection's address
cannot be put back).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from nhi_gateway.proxy.egress import Address

logger = logging.getLogger(__name__)


def install_resolver(loop: asyncio.AbstractEventLoop, resolve: Mapping[str, Address]) -> None:
    """Make ``loop`` resolve the names in ``resolve`` to their address and port."""
    if not resolve:
        return
    mapping = dict(resolve)
    original = loop.getaddrinfo

    async def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode("idna") if isinstance(host, bytes) else host
        target = mapping.get(name.lower().rstrip(".")) if name else None
        if target is not None:
            host, port = target.host, target.port
        return await original(host, port, *args, **kwargs)

    # asyncio.open_connection -> loop.create_connection resolves through the loop's own method.
    loop.getaddrinfo = getaddrinfo


class Routing:
    def __init__(self, resolve: Mapping[str, Address]) -> None:
        self.resolve = dict(resolve)

    def running(self) -> None:
        install_resolver(asyncio.get_running_loop(), self.resolve)
        for name, target in self.resolve.items():
            logger.info("resolving %s to %s:%d", name, target.host, target.port)
