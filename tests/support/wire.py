"""Requests spelled byte by byte, through a running gateway: what well-behaved libraries never
send, and what a test must read exactly as it came back.

``tunnel`` is a TLS connection inside a CONNECT tunnel (``raw_connect``), verified with the
gateway's CA; ``exchange`` sends raw bytes through one and returns everything the gateway answered
(``read_response``), which ``statuses`` and ``json_bodies`` take apart. ``h2_request`` sends one
HTTP/2 stream with the h2 library, its own validation off, and ``h2_status`` reads the answer's
status. ``client_context`` is an SSL context for httpx that offers ``h2`` first when asked.
"""

from __future__ import annotations

import json
import ssl

import h2.config
import h2.connection
import h2.events

from .e2e import raw_connect
from .policies import GRAPH_HOST


def read_response(s, wait: float = 10.0, settle: float = 1.0, limit: int = 1 << 20) -> bytes:
    """What the gateway sends until it closes, or falls silent for ``settle`` seconds once it
    has answered (a keep-alive connection stays open), or for ``wait`` seconds before that."""
    data = b""
    s.settimeout(wait)
    try:
        while len(data) < limit and (chunk := s.recv(65536)):
            data += chunk
            if b"\r\n\r\n" in data:
                s.settimeout(settle)
    except (ConnectionResetError, TimeoutError, ssl.SSLError):
        pass
    return data


def tunnel(gw, host: str = GRAPH_HOST, sni: str | None = None, alpn: list[str] | None = None) -> ssl.SSLSocket:
    status, body, s = raw_connect(gw, host)
    assert status == 200, body
    ctx = ssl.create_default_context(cafile=gw.ca_cert)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(s, server_hostname=sni or host.rstrip(".").lower())


def exchange(gw, raw: bytes, host: str = GRAPH_HOST, sni: str | None = None, wait: float = 10.0) -> bytes:
    """Send ``raw`` inside a TLS tunnel to ``host``; everything the gateway answers."""
    tls = tunnel(gw, host, sni)
    tls.sendall(raw)
    data = read_response(tls, wait=wait)
    tls.close()
    return data


def statuses(data: bytes) -> list[int]:
    return [int(line.split()[1]) for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


def json_bodies(data: bytes) -> list[dict]:
    out = []
    for part in data.split(b"HTTP/1.1 ")[1:]:
        _, _, body = part.partition(b"\r\n\r\n")
        try:
            out.append(json.loads(body[: body.rfind(b"}") + 1]))
        except ValueError:
            pass
    return out


class H2First(ssl.SSLContext):
    """Inside a proxy tunnel httpcore offers ALPN ``http/1.1, h2`` in that order, and mitmproxy
    honours the client's order, so httpx would never speak HTTP/2 through the gateway. This
    context offers ``h2`` first, as curl and browsers do."""

    def set_alpn_protocols(self, protocols):
        super().set_alpn_protocols(sorted(protocols, key=lambda p: p != "h2"))


def client_context(ca: str, h2_first: bool) -> ssl.SSLContext:
    ctx = H2First(ssl.PROTOCOL_TLS_CLIENT) if h2_first else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    return ctx


def h2_request(gw, headers: list[tuple[str, str]] | list[tuple[bytes, bytes]], body: bytes = b"") -> tuple[list, bytes]:
    """One HTTP/2 stream sent with the h2 library, validation of what we send switched off: the
    events the gateway answered with, and the response body."""
    tls = tunnel(gw, alpn=["h2"])
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
        validate_inbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=not body)
    if body:
        conn.send_data(1, body, end_stream=True)
    tls.sendall(conn.data_to_send())
    tls.settimeout(10)
    seen, data = [], b""
    try:
        while not any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated))
                      for e in seen):
            chunk = tls.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                seen.append(event)
                if isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            tls.sendall(conn.data_to_send())
    except (TimeoutError, ssl.SSLError, ConnectionResetError):
        pass
    tls.close()
    return seen, data


def h2_status(events) -> int | None:
    for e in events:
        if isinstance(e, h2.events.ResponseReceived):
            return int(dict(e.headers)[b":status"])
    return None
