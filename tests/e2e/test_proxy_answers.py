"""What mitmproxy answers by itself, through the real gateway process: a request it cannot read,
a body over the limit, an upstream it cannot reach. The client gets Graph-shaped JSON naming no
address, and each such request has its audit line (with the status the client saw) and its
recorded flow. Bytes that are not UTF-8 in a host or target never stop the recording."""

from __future__ import annotations

import json
import socket

import pytest
import requests

from ..support.e2e import GRAPH, get_token, marker, reached_graph, until
from ..support.recordings import flows_under
from ..support.wire import client_context, exchange, h2_request, json_bodies, statuses
from .conftest import start_gateway, stop


@pytest.fixture
def token(gateway, lookalike, monkeypatch) -> str:
    return get_token(gateway, lookalike, monkeypatch)


def flows_of(gw) -> list:
    return flows_under(gw.recordings)


def lines_with(gw, needle: str) -> list[dict]:
    return [a for a in gw.audit() if needle in json.dumps(a)]


def assert_graph_error(body: dict, check: str) -> None:
    assert set(body["error"]) == {"code", "message", "innerError"}, body
    assert body["error"]["innerError"]["nhi-gateway"]["check"] == check, body
    assert "127.0.0.1" not in json.dumps(body)


def assert_still_serving(gw, token: str) -> None:
    """The recording process is alive: a new request is answered and recorded."""
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users?$top=1&m={mark}", headers={"Authorization": f"Bearer {token}"}, timeout=20)
    assert r.status_code == 200, r.text[:300]
    until(lambda: [f for f in flows_of(gw) if mark in f.request.path], "the next request's recording")


# --- requests mitmproxy cannot read ----------------------------------------------------------------


FRAMINGS = {
    # name: (raw request inside the tunnel, method in the audit line)
    "a Content-Length that is no number": (
        "GET /v1.0/users?m={mark} HTTP/1.1\r\nHost: graph.microsoft.com\r\nContent-Length: ab\r\n\r\n", "GET"),
    "a header line without a colon": (
        "GET /v1.0/users?m={mark} HTTP/1.1\r\nHost: graph.microsoft.com\r\nno colon here\r\n\r\n", "UNREADABLE"),
    "a request line that is not HTTP": ("BREW /v1.0/users?m={mark} HTCPCP/1.0\r\n\r\n", "UNREADABLE"),
}


@pytest.mark.parametrize("case", list(FRAMINGS))
def test_a_request_mitmproxy_cannot_read_is_answered_in_json_audited_and_recorded(gateway, lookalike, token, case):
    raw, method = FRAMINGS[case]
    mark = marker()
    data = exchange(gateway, raw.format(mark=mark).encode(), wait=5)
    assert statuses(data) == [400], data[:300]
    assert b"application/json" in data.split(b"\r\n\r\n")[0]
    assert_graph_error(json_bodies(data)[0], "framing")
    assert not reached_graph(lookalike, mark)
    line = until(lambda: lines_with(gateway, mark), "the audit line")[-1]
    assert (line["method"], line["status"], line["decision"], line["stage"]) == (method, 400, "deny", "proxy"), line
    assert until(lambda: [f for f in flows_of(gateway) if mark in f.request.path], "the recording")
    assert_still_serving(gateway, token)


@pytest.mark.parametrize("where", ["target", "host header", "connect", "plain proxy request",
                                   "http2 path", "http2 authority"])
def test_bytes_that_are_not_utf8_never_stop_the_recording(gateway, lookalike, token, where):
    mark = marker()
    if where.startswith("http2"):
        path, authority = (f"/v1.0/users?m={mark}&x=".encode() + b"\xff\xfe", b"graph.microsoft.com") \
            if where == "http2 path" else (f"/v1.0/users?m={mark}".encode(), b"gr\xffaph.microsoft.com")
        h2_request(gateway, [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", authority),
                             (b":path", path), (b"authorization", f"Bearer {token}".encode())])
    elif where == "plain proxy request":
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
            s.sendall(b"GET http://gr\xff\xfeaph.microsoft.com/v1.0/users?m=" + mark.encode()
                      + b" HTTP/1.1\r\nHost: gr\xff\xfeaph.microsoft.com\r\n\r\n")
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
    elif where == "connect":
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
            s.sendall(b"CONNECT gr\xff\xfeaph-" + mark.encode() + b".example:443 HTTP/1.1\r\n\r\n")
            answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
    else:
        target, host = (f"/v1.0/users?m={mark}&x=".encode() + b"\xff\xfe\x80", b"graph.microsoft.com") \
            if where == "target" else (f"/v1.0/users?m={mark}".encode(), b"graph.microsoft.com\xff\xfe")
        data = exchange(gateway, b"GET " + target + b" HTTP/1.1\r\nHost: " + host +
                        f"\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode(), wait=5)
        assert statuses(data), data[:300]
    until(lambda: lines_with(gateway, mark), "the audit line")
    until(lambda: [f for f in flows_of(gateway) if mark in f.request.pretty_url], "the recording")
    assert_still_serving(gateway, token)


def test_a_body_over_the_limit_is_answered_413_in_json_and_audited_with_413(gateway, lookalike, token):
    mark = marker()
    limit = 32 * 2**20
    raw = (f"POST /v1.0/users?m={mark} HTTP/1.1\r\nHost: graph.microsoft.com\r\nAuthorization: Bearer {token}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {limit + 1}\r\n\r\n").encode()
    data = exchange(gateway, raw, wait=5)
    assert statuses(data) == [413], data[:300]
    assert_graph_error(json_bodies(data)[0], "body_size")
    assert not reached_graph(lookalike, mark)
    line = until(lambda: lines_with(gateway, mark), "the audit line")[-1]
    assert (line["status"], line["decision"], line["stage"], line["check"]) == (413, "deny", "proxy", "body_size")
    assert until(lambda: [f for f in flows_of(gateway) if mark in f.request.path], "the recording")


# --- an upstream that cannot be reached -------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("http2", [False, True])
def test_an_unreachable_upstream_is_answered_in_json_naming_no_address(tmp_path, lookalike, tokens, http2):
    import httpx

    port = closed_port()
    gw = start_gateway(tmp_path / "gw", lookalike, extra_args=["--resolve", f"graph.microsoft.com=127.0.0.1:{port}"])
    try:
        mark = marker()
        with httpx.Client(http2=http2, proxy=gw.proxy(), trust_env=False, timeout=30,
                          verify=client_context(gw.ca_cert, http2)) as c:
            r = c.get(f"{GRAPH}/v1.0/users?m={mark}", headers={"Authorization": f"Bearer {tokens()}"})
        assert r.status_code == 502, r.text[:300]
        assert r.headers["content-type"] == "application/json"
        assert_graph_error(r.json(), "upstream")
        assert str(port) not in r.text and "Cannot connect" not in r.text
        line = until(lambda: lines_with(gw, mark), "the audit line")[-1]
        assert (line["status"], line["decision"], line["rule"]) == (502, "allow", "directory-read")
    finally:
        stop(gw.proc)
