"""Requests of a shape the gateway will not judge are refused before identity and before any rule,
through the real gateway process: method overrides (also inside a ``$batch``), oversized targets
and headers, transfer codings other than ``chunked``. Each refusal is Graph-shaped JSON naming its
check, is audited and recorded, and nothing of it reaches the look-alike Graph or Entra."""

from __future__ import annotations

import gzip
import json

import pytest
import requests

from nhi_gateway.policy.admission import LIMITS

from ..support.e2e import GRAPH, get_token, marker, reached_graph, recorded
from ..support.wire import exchange, json_bodies, read_response, statuses, tunnel


@pytest.fixture
def token(gateway, lookalike, monkeypatch) -> str:
    return get_token(gateway, lookalike, monkeypatch)


def assert_refused_before_any_rule(gateway, lookalike, r: requests.Response, mark: str, status: int, check: str):
    assert r.status_code == status, r.text[:300]
    doc = r.json()
    nhi = doc["error"]["innerError"]["nhi-gateway"]
    assert (nhi["stage"], nhi["check"], nhi["rule"]) == ("request", check, None), doc
    assert not reached_graph(lookalike, mark)
    line = [a for a in gateway.audit() if mark in (a["url"] or "")][-1]
    assert (line["decision"], line["status"], line["stage"], line["check"]) == ("deny", status, "request", check)
    flows = recorded(gateway, mark)
    assert len(flows) == 1 and flows[0].response.status_code == status


# --- method tunnelling ---------------------------------------------------------------------------

OVERRIDES = {
    "X-HTTP-Method-Override": dict(headers={"X-HTTP-Method-Override": "DELETE"}),
    "X-HTTP-Method": dict(headers={"X-HTTP-Method": "DELETE"}),
    "X-Method-Override": dict(headers={"x-method-override": "DELETE"}),
    "_method in the query": dict(query="&_method=DELETE"),
    "_method percent-encoded": dict(query="&%5Fmethod=DELETE"),
}


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_a_read_that_asks_for_another_method_is_refused_and_never_reaches_graph(gateway, lookalike, token, case):
    """GET /users is allowed (directory-read): with an override it is refused all the same, since
    a server that honoured it would run a DELETE judged as a GET."""
    spec = OVERRIDES[case]
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users?m={mark}{spec.get('query', '')}", timeout=20,
                     headers={"Authorization": f"Bearer {token}", **spec.get("headers", {})})
    assert_refused_before_any_rule(gateway, lookalike, r, mark, 400, "method_override")
    assert "method" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, content_type", [
    (b"displayName=x&_method=DELETE", "application/x-www-form-urlencoded"),
    (json.dumps({"_method": "DELETE", "displayName": "x"}).encode(), "application/json"),
    (gzip.compress(json.dumps({"_method": "DELETE"}).encode()), "application/json"),
])
def test_a_body_parameter_asking_for_another_method_is_refused(gateway, lookalike, token, body, content_type):
    mark = marker()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    if body[:2] == b"\x1f\x8b":
        headers["Content-Encoding"] = "gzip"
    r = requests.post(f"{GRAPH}/v1.0/users?m={mark}", data=body, headers=headers, timeout=20)
    assert_refused_before_any_rule(gateway, lookalike, r, mark, 400, "method_override")


@pytest.mark.parametrize("inner", [
    {"headers": {"X-HTTP-Method-Override": "DELETE"}},
    {"headers": {"x-http-method": "DELETE"}},
    {"url_suffix": "&_method=DELETE"},
    {"body": {"_method": "DELETE"}, "headers": {"Content-Type": "application/json"}, "method": "POST"},
])
def test_a_batch_item_asking_for_another_method_refuses_the_batch(gateway, lookalike, token, inner):
    mark = marker()
    item = {"id": "1", "method": inner.get("method", "GET"), "url": f"/users?m={mark}{inner.get('url_suffix', '')}"}
    if "headers" in inner:
        item["headers"] = inner["headers"]
    if "body" in inner:
        item["body"] = inner["body"]
    batch = {"requests": [{"id": "ok", "method": "GET", "url": f"/users?$top=1&m={mark}"}, item]}
    r = requests.post(f"{GRAPH}/v1.0/$batch?m={mark}", json=batch, headers={"Authorization": f"Bearer {token}"},
                      timeout=20)
    assert r.status_code == 400, r.text[:300]
    assert "method" in r.text
    assert not reached_graph(lookalike, mark)


# --- sizes ---------------------------------------------------------------------------------------

SIZES = {
    "a target over the limit": (414, dict(query="&x=" + "a" * LIMITS.target)),
    "too many header fields": (431, dict(headers={f"X-Field-{i}": "v" for i in range(LIMITS.header_count + 1)})),
    "one header field over the limit": (431, dict(headers={"X-Big": "b" * LIMITS.header_field})),
    "all header fields over the limit": (431, dict(headers={f"X-Part-{i}": "v" * 8000 for i in range(9)})),
}


@pytest.mark.parametrize("case", list(SIZES))
def test_oversized_requests_are_refused_414_or_431_before_any_rule(gateway, lookalike, token, case):
    status, spec = SIZES[case]
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users?m={mark}{spec.get('query', '')}", timeout=20,
                     headers={"Authorization": f"Bearer {token}", **spec.get("headers", {})})
    assert_refused_before_any_rule(gateway, lookalike, r, mark, status, "size")


def test_an_oversized_connect_is_refused(gateway, lookalike):
    import socket

    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(b"CONNECT graph.microsoft.com:443 HTTP/1.1\r\nHost: graph.microsoft.com:443\r\n"
                  + b"".join(b"X-F%d: v\r\n" % i for i in range(LIMITS.header_count + 1)) + b"\r\n")
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 431"), head[:200]


# --- transfer codings ----------------------------------------------------------------------------


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


@pytest.mark.parametrize("coding, check", [("gzip, chunked", "transfer_encoding"),
                                           ("deflate, chunked", "transfer_encoding"),
                                           ("chunked, chunked", "framing")])  # mitmproxy refuses that one itself
def test_a_token_request_with_another_transfer_coding_is_refused_and_never_reaches_entra(
        gateway, lookalike, coding, check):
    """A gzip-coded token request would reach Entra with its client_secret inside bytes that
    the gateway's redaction never decoded: refused before anything reads it."""
    app = lookalike.app("mcp-directory")
    mark = marker()
    form = (f"grant_type=client_credentials&client_id={app['client_id']}&client_secret={app['secret']}"
            "&scope=https%3A%2F%2Fgraph.microsoft.com%2F.default").encode()
    body = gzip.compress(form) if "gzip" in coding else form
    raw = (f"POST /{lookalike.tenant_id}/oauth2/v2.0/token?m={mark} HTTP/1.1\r\n"
           "Host: login.microsoftonline.com\r\nContent-Type: application/x-www-form-urlencoded\r\n"
           f"Transfer-Encoding: {coding}\r\nConnection: close\r\n\r\n").encode() + chunked(body)
    data = exchange(gateway, raw, host="login.microsoftonline.com")
    assert statuses(data) == [400], data[:300]
    refusal = json_bodies(data)[0]
    assert refusal["error"]["innerError"]["nhi-gateway"]["check"] == check
    assert not reached_graph(lookalike, mark)
    line = [a for a in gateway.audit() if mark in (a["url"] or "")][-1]
    assert (line["status"], line["check"]) == (400, check)
    flows = recorded(gateway, mark)
    assert len(flows) == 1
    assert app["secret"] not in json.dumps(line)


@pytest.mark.parametrize("where", ["inside the tunnel", "on the proxy connection"])
def test_a_head_that_never_ends_is_refused_431_and_not_buffered_on(gateway, lookalike, where):
    """mitmproxy would buffer header bytes without end; the gateway stops at MAX_HEAD."""
    import socket

    from nhi_gateway.policy.admission import MAX_HEAD

    mark = marker()
    head = (f"GET https://graph.microsoft.com/v1.0/users?m={mark} HTTP/1.1\r\nHost: graph.microsoft.com\r\n"
            f"X-Endless: ").encode() + b"a" * (MAX_HEAD + 1024)
    if where == "inside the tunnel":
        s = tunnel(gateway)
    else:
        s = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    try:
        s.sendall(head)
        data = read_response(s, wait=10)
    finally:
        s.close()
    assert statuses(data) == [431], data[:300]
    assert json_bodies(data)[0]["error"]["innerError"]["nhi-gateway"]["check"] == "size"
    assert not reached_graph(lookalike, mark)
    line = [a for a in gateway.audit() if mark in (a["url"] or "")][-1]
    assert (line["status"], line["stage"], line["check"]) == (431, "proxy", "size")
    assert len(recorded(gateway, mark)) == 1
