"""Routing: send a host name to another address, keeping URL, Host and SNI.

This is how the loopback look-alikes stand in for graph.microsoft.com and
login.microsoftonline.com: the client's request is exactly what it would be in production.
"""

from __future__ import annotations

from collections.abc import Mapping

from mitmproxy.proxy import server_hooks

from ..egress import Address


class Routing:
    def __init__(self, resolve: Mapping[str, Address]) -> None:
        self.resolve = dict(resolve)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        try:
            address = data.server.address
            if address is None:
                return
            target = self.resolve.get(address[0].lower().rstrip("."))
            if target is not None:
                if data.server.sni is None:
                    data.server.sni = address[0]
                data.server.address = (target.host, target.port)
        except Exception as e:
            # Setting an error aborts the connection: never fall through to an unmapped address.
            data.server.error = f"nhi-gateway routing failed: {e!r}"
