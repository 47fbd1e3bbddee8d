"""A cheap stand-in for Graph's ``GET /v1.0/users?$top=5``, so the upstream is not what limits the
benchmark.

The look-alike (Starlette on uvicorn's pure-Python h11 server, an RS256 check and a log line per
request) spends more CPU per request than a proxy does, and on a two-core machine it would cap bare
mitmdump and the gateway alike, so their ratio would say nothing. This server answers with the
bytes the look-alike itself returned for the same request (fetched once, with the same token, at
the start of the run) and only checks that the very token the client sent arrived, in
``Authorization``. It uses the look-alike's TLS certificate, so proxies trust it as they trust
the look-alike. Run as ``python -m nhi_gateway.bench upstream``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path

import h11


@dataclass(frozen=True)
class CannedResponse:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def to_file(self, path: Path) -> None:
        path.write_text(json.dumps({
            "status": self.status, "headers": list(self.headers), "body": self.body.decode("utf-8"),
        }))

    @classmethod
    def from_file(cls, path: Path) -> CannedResponse:
        data = json.loads(path.read_text())
        return cls(data["status"], tuple((k, v) for k, v in data["headers"]), data["body"].encode("utf-8"))


# Per-response headers of the look-alike that a replay must not repeat verbatim (length is set anew).
_DROP = frozenset({"content-length", "date", "transfer-encoding", "connection"})

_UNAUTHORIZED = json.dumps({"error": {
    "code": "InvalidAuthenticationToken", "message": "the benchmark's token did not arrive unchanged",
}}).encode()


class GraphStandIn(asyncio.Protocol):
    def __init__(self, path: str, authorization: bytes, canned: CannedResponse) -> None:
        self.path = path.encode()
        self.authorization = authorization
        headers = [(k, v) for k, v in canned.headers if k.lower() not in _DROP]
        self.ok = h11.Response(status_code=canned.status,
                               headers=[*headers, ("Content-Length", str(len(canned.body)))])
        self.body = h11.Data(data=canned.body)
        self.transport: asyncio.Transport | None = None
        self.http = h11.Connection(h11.SERVER)
        self.request: h11.Request | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.http.receive_data(data)
        self._drain()

    def eof_received(self) -> bool:
        self.http.receive_data(b"")
        self._drain()
        return False

    def _drain(self) -> None:
        try:
            while True:
                event = self.http.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if isinstance(event, h11.Request):
                    self.request = event
                elif isinstance(event, h11.EndOfMessage):
                    self._respond()
                    if self.http.our_state is h11.MUST_CLOSE:
                        self.transport.close()
                        return
                    self.http.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    self.transport.close()
                    return
        except h11.ProtocolError:
            self.transport.close()

    def _respond(self) -> None:
        req = self.request
        auth = next((v for k, v in req.headers if k == b"authorization"), b"")
        http = self.http
        if req.method == b"GET" and req.target == self.path and hmac.compare_digest(auth, self.authorization):
            out = http.send(self.ok) + http.send(self.body) + http.send(h11.EndOfMessage())
        else:
            status = 401 if req.target == self.path else 404
            body = _UNAUTHORIZED if status == 401 else b'{"error":{"code":"Request_ResourceNotFound"}}'
            out = http.send(h11.Response(status_code=status, headers=[
                ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]))
            out += http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage())
        self.transport.write(out)


async def serve(*, cert: Path, key: Path, path: str, token: str, canned: CannedResponse,
                ready_file: Path, host: str = "127.0.0.1", port: int = 0) -> None:
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    tls.set_alpn_protocols(["http/1.1"])
    authorization = f"Bearer {token}".encode()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: GraphStandIn(path, authorization, canned), host, port, ssl=tls,
                                      backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()
    tmp = ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"host": bound[0], "port": bound[1], "pid": os.getpid()}))
    tmp.replace(ready_file)
    async with server:
        await stop.wait()
