"""Protocol edges: every way a request can be spelled or framed is judged, or refused; none slips
past the judgement to the upstream.

The real gateway process; Graph reached through a loopback relay that counts the connections the
gateway opens to it. The gateway opens an upstream connection only for a request it has allowed
(``connection_strategy=lazy``), so "the relay saw no connection" proves nothing went upstream,
whatever the bytes (the look-alike notes HTTP requests only, never raw bytes or WebSocket
handshakes). Each request carries a unique marker, and the look-alike's log of what it received
shows which requests reached Graph.

Covered elsewhere: CONNECT to a host no rule names and absolute-form plain HTTP (test_gateway.py),
a non-HTTP payload inside CONNECT before any TLS (test_gateway.py).
"""

from __future__ import annotations

import json
import socket
import subprocess

import httpx
import pytest

from ..support.e2e import marker, raw_connect, reached, received
from ..support.relay import Relay
from ..support.wire import client_context, exchange, h2_request, h2_status, json_bodies, read_response, statuses
from .conftest import EXAMPLE_POLICY, gateway_running

GRAPH = "graph.microsoft.com"
IDN_UNICODE = "bücher.example"
IDN_ASCII = "xn--bcher-kva.example"
MCP_DIRECTORY_APP = "5e0b1683-de22-5eac-9334-fb85a741f6ff"

# The example policy, plus an upstream with an internationalised name (written in Unicode; the
# policy holds it in its ASCII form) that mcp-directory may read and nobody may write.
IDN_UPSTREAM = f"""  - host: {IDN_UNICODE}
    token: any
"""
IDN_RULE = f"""
  - id: idn-read
    action: allow
    when: {{app_ids: [{MCP_DIRECTORY_APP}]}}
    operations:
      - host: {IDN_UNICODE}
        methods: [GET]
        paths: ["/**"]
"""


@pytest.fixture(scope="module")
def edges(tmp_path_factory, lookalike):
    """A gateway whose Graph is a counting relay to the look-alike."""
    work = tmp_path_factory.mktemp("edges")
    policy = work / "policy.yaml"
    text = EXAMPLE_POLICY.read_text()
    assert "\nupstreams:\n" in text
    policy.write_text(text.replace("\nupstreams:\n", "\nupstreams:\n" + IDN_UPSTREAM, 1) + IDN_RULE)
    with Relay(("127.0.0.1", lookalike.port)) as relay:
        with gateway_running(work / "gw", lookalike, policy=policy,
                             extra_args=["--resolve", f"{GRAPH}={relay.address}",
                                         "--resolve", f"{IDN_ASCII}=127.0.0.1:{lookalike.port}"]) as gw:
            yield gw, relay


def audit_for(gw, mark: str) -> list[dict]:
    return [line for line in gw.audit() if mark in (line.get("url") or "")]


def upstream_connections(relay: Relay) -> int:
    return sum(relay.accepted.values())


def nhi_of(doc: dict) -> dict:
    return doc["error"]["innerError"]["nhi-gateway"]


# --- HTTP/2 and HTTP/1.1 ------------------------------------------------------------------------


# request: (method, path, expected status, expected rule)
DECISIONS = {
    "allowed read": ("GET", "/v1.0/users?$top=2", 200, "directory-read"),
    "write no rule allows": ("DELETE", "/v1.0/users/someone", 403, None),
    "denied by a rule": ("POST", "/v1.0/applications/x/addPassword", 403, "no-credential-minting"),
}


@pytest.mark.parametrize("client", ["httpx http2", "httpx http1.1", "curl --http2", "curl --http1.1"])
def test_http2_and_http1_get_the_same_decisions(edges, lookalike, tokens, client):
    gw, _ = edges
    token = tokens()
    seen = {}
    for name, (method, path, status, rule) in DECISIONS.items():
        mark = marker()
        url = f"https://{GRAPH}{path}{'&' if '?' in path else '?'}m={mark}"
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        body = b"{}" if method == "POST" else None
        if client.startswith("httpx"):
            h2 = client.endswith("http2")
            with httpx.Client(http2=h2, proxy=gw.proxy(), trust_env=False,
                              verify=client_context(gw.ca_cert, h2), timeout=30) as c:
                r = c.request(method, url, headers=headers, content=body)
            got, version, text = r.status_code, r.http_version, r.text
        else:
            flag = client.split()[1]
            args = ["curl", "-sS", flag, "--proxy", gw.proxy(), "--cacert", gw.ca_cert, "-X", method,
                    "-w", "\n%{http_code} %{http_version}", url]
            for k, v in headers.items():
                args += ["-H", f"{k}: {v}"]
            if body:
                args += ["--data-binary", body.decode()]
            out = subprocess.run(args, capture_output=True, text=True, timeout=30)
            text, _, tail = out.stdout.rpartition("\n")
            got, version = int(tail.split()[0]), "HTTP/" + tail.split()[1]
        assert version == ("HTTP/2" if "2" in client.split()[-1] else "HTTP/1.1"), version
        assert got == status, (name, text[:300])
        if status != 200:
            assert nhi_of(json.loads(text))["rule"] == rule
            assert not reached(lookalike, mark)
        else:
            assert "[masked]" in text
        line = audit_for(gw, mark)[-1]
        seen[name] = (line["decision"], line["rule"], line["status"])
    assert seen == {name: ("allow" if s == 200 else "deny", rule, s) for name, (_, _, s, rule) in DECISIONS.items()}


def test_http2_authority_naming_another_host_is_misdirected(edges, lookalike, tokens):
    mark = marker()
    events, body = h2_request(edges[0], [(":method", "GET"), (":scheme", "https"), (":authority", "evil.example"),
                                         (":path", f"/v1.0/users?m={mark}"), ("authorization", f"Bearer {tokens()}")])
    assert h2_status(events) == 421, body[:300]
    assert not reached(lookalike, mark)


# --- WebSocket ---------------------------------------------------------------------------------


def test_websocket_upgrade_is_refused_at_the_request_with_json(edges, lookalike, tokens):
    """No rule can allow a WebSocket (its messages would pass unjudged): even on a path a rule
    allows, the handshake gets a 403 that says why, and never reaches the upstream."""
    gw, relay = edges
    before = upstream_connections(relay)
    mark = marker()
    data = exchange(gw, (f"GET /v1.0/users?m={mark} HTTP/1.1\r\nHost: {GRAPH}\r\n"
                         f"Authorization: Bearer {tokens()}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                         "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
    assert statuses(data) == [403], data[:300]
    refusal = json_bodies(data)[0]
    assert nhi_of(refusal)["check"] == "upgrade"
    assert "WebSocket" in refusal["error"]["message"]
    assert upstream_connections(relay) == before
    line = audit_for(gw, mark)[-1]
    assert (line["decision"], line["status"], line["check"]) == ("deny", 403, "upgrade")


@pytest.mark.parametrize("shape", ["extended CONNECT (RFC 8441)", "upgrade header"])
def test_websocket_over_http2_is_refused(edges, lookalike, tokens, shape):
    """mitmproxy does not offer extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL is 0), and an
    upgrade header is a protocol error in HTTP/2: the connection ends, nothing goes upstream."""
    gw, relay = edges
    before = upstream_connections(relay)
    mark = marker()
    headers = [(":method", "CONNECT"), (":protocol", "websocket")] if shape.startswith("extended") else \
        [(":method", "GET"), ("upgrade", "websocket")]
    headers += [(":scheme", "https"), (":authority", GRAPH), (":path", f"/v1.0/users?m={mark}"),
                ("sec-websocket-version", "13"), ("authorization", f"Bearer {tokens()}")]
    events, _ = h2_request(gw, headers)
    assert h2_status(events) in (None, 400, 403), events
    assert upstream_connections(relay) == before and not reached(lookalike, mark)


# --- not HTTP inside the tunnel ----------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    b"\x00\x01\x02\x03" * 256 + b"\r\n\r\n",
    b"\x05\x01\x00\r\n\r\n",  # a SOCKS5 greeting
])
def test_non_http_after_the_tls_handshake_is_refused(edges, payload):
    """rawtcp is off: bytes that are not HTTP are parsed as HTTP, refused, and never relayed."""
    gw, relay = edges
    before = upstream_connections(relay)
    data = exchange(gw, payload)
    assert statuses(data) == [400], data[:300]
    assert upstream_connections(relay) == before


@pytest.mark.parametrize("payload", [
    b"SSH-2.0-OpenSSH_9.6\r\n" + b"\x00\x01\x02\x03" * 256,
    # The start of a TLS ClientHello: mitmproxy waits for the rest (a whole one would be TLS
    # inside the tunnel, intercepted, and the HTTP inside it judged like any other).
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
])
def test_non_http_that_never_ends_its_head_is_never_relayed(edges, payload):
    """A client that sends bytes without ever ending a request head gets nothing, and nothing of
    it goes anywhere (the connection is held until the client or mitmproxy's idle timeout ends it)."""
    gw, relay = edges
    before = upstream_connections(relay)
    assert exchange(gw, payload, wait=2) == b""
    assert upstream_connections(relay) == before


# --- one host, many spellings --------------------------------------------------------------------


@pytest.mark.parametrize("host", [
    "127.0.0.1",
    "[::1]",
    "20.190.151.68",  # an address of Graph's front door: hosts are matched by name, never by address
    "2603:1037::1",
    "xn--grph-63d.microsoft.com",  # a homograph of graph (Cyrillic а), as clients send it
    "graph.microsoft.com.evil.example",
])
def test_connect_to_an_address_or_a_look_alike_name_is_refused(edges, host):
    gw, relay = edges
    before = upstream_connections(relay)
    status, body, s = raw_connect(gw, host if ":" not in host or host.startswith("[") else f"[{host}]")
    s.close()
    assert status == 403, body
    doc = json.loads(body)
    assert nhi_of(doc)["check"] == "upstream" and "not an upstream named in the policy" in doc["error"]["message"]
    assert upstream_connections(relay) == before


@pytest.mark.parametrize("host", ["grаph.microsoft.com", IDN_UNICODE, "graph%2emicrosoft.com"])
def test_connect_to_a_name_that_is_not_ascii_or_encoded_is_refused(edges, host):
    """Clients send internationalised names in their ASCII form; raw UTF-8 or percent-encoding in
    an authority is no valid name, refused by the HTTP parser itself."""
    gw, relay = edges
    before = upstream_connections(relay)
    status, _, s = raw_connect(gw, host.encode("utf-8"))
    s.close()
    assert status == 400
    assert upstream_connections(relay) == before


SPELLINGS_OF_GRAPH = ["graph.microsoft.com", "GRAPH.Microsoft.COM", "graph.microsoft.com.", "Graph.Microsoft.Com."]


@pytest.mark.parametrize("spelling", SPELLINGS_OF_GRAPH)
def test_every_spelling_of_graph_is_judged_as_graph(edges, lookalike, tokens, spelling):
    """The CONNECT, the Host header and the rules see one host, whatever its case or trailing dot:
    the deny rules hold, and the allow rule applies."""
    gw, _ = edges
    token = tokens()
    denied = marker()
    data = exchange(gw, (f"POST /v1.0/applications/x/addPassword?m={denied} HTTP/1.1\r\nHost: {spelling}\r\n"
                         f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                         "Content-Length: 2\r\nConnection: close\r\n\r\n{}").encode(), host=spelling)
    assert statuses(data) == [403], data[:300]
    assert nhi_of(json_bodies(data)[0])["rule"] == "no-credential-minting"
    assert not reached(lookalike, denied)

    allowed = marker()
    exchange(gw, (f"GET /v1.0/users?m={allowed} HTTP/1.1\r\nHost: {spelling}\r\nAuthorization: Bearer {token}\r\n"
                  "Connection: close\r\n\r\n").encode(), host=spelling)
    line = audit_for(gw, allowed)[-1]
    assert (line["decision"], line["rule"]) == ("allow", "directory-read")
    assert line["operation"].startswith("GET graph.microsoft.com ")
    assert reached(lookalike, allowed)


@pytest.mark.parametrize("spelling", [IDN_ASCII, IDN_ASCII.upper(), IDN_ASCII + "."])
def test_an_internationalised_upstream_is_judged_in_every_ascii_spelling(edges, lookalike, tokens, spelling):
    gw, _ = edges
    token = tokens()
    denied = marker()
    data = exchange(gw, (f"DELETE /things/1?m={denied} HTTP/1.1\r\nHost: {spelling}\r\n"
                         f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n").encode(),
                    host=spelling, sni=IDN_ASCII)
    assert statuses(data) == [403], data[:300]
    assert f"no rule allows DELETE {IDN_ASCII}" in json_bodies(data)[0]["error"]["message"]
    assert not reached(lookalike, denied)

    allowed = marker()
    exchange(gw, (f"GET /things?m={allowed} HTTP/1.1\r\nHost: {spelling}\r\nAuthorization: Bearer {token}\r\n"
                  "Connection: close\r\n\r\n").encode(), host=spelling, sni=IDN_ASCII)
    line = audit_for(gw, allowed)[-1]
    assert (line["decision"], line["rule"]) == ("allow", "idn-read")


@pytest.mark.parametrize("target", [
    "https://evil.example/v1.0/users",
    "https://127.0.0.1/v1.0/users",
    "https://[::1]/v1.0/users",
    "https://login.microsoftonline.com/v1.0/users",
])
def test_absolute_form_naming_another_host_inside_the_tunnel_is_misdirected(edges, lookalike, tokens, target):
    """A server must route an absolute-form request by its target, not by the Host header
    (RFC 9112 3.2.2): judging the tunnel's host and sending another's would be domain fronting."""
    gw, relay = edges
    before = upstream_connections(relay)
    mark = marker()
    data = exchange(gw, (f"GET {target}?m={mark} HTTP/1.1\r\nHost: {GRAPH}\r\nAuthorization: Bearer {tokens()}\r\n"
                         "Connection: close\r\n\r\n").encode())
    assert statuses(data) == [421], data[:300]
    assert nhi_of(json_bodies(data)[0])["check"] == "tunnel"
    assert upstream_connections(relay) == before and not reached(lookalike, mark)


@pytest.mark.parametrize("target", ["https://GRAPH.microsoft.com./v1.0/users", "https://graph.microsoft.com:443/v1.0/users"])
def test_absolute_form_naming_the_tunnel_s_host_is_judged(edges, lookalike, tokens, target):
    gw, _ = edges
    mark = marker()
    exchange(gw, (f"GET {target}?m={mark} HTTP/1.1\r\nHost: {GRAPH}\r\nAuthorization: Bearer {tokens()}\r\n"
                  "Connection: close\r\n\r\n").encode())
    line = audit_for(gw, mark)[-1]
    assert (line["decision"], line["rule"]) == ("allow", "directory-read")


@pytest.mark.parametrize("target", ["http://graph%2emicrosoft.com/v1.0/users", "https://graph%2emicrosoft.com/v1.0/users"])
def test_percent_encoded_host_in_absolute_form_is_refused(edges, lookalike, target):
    gw, relay = edges
    before = upstream_connections(relay)
    mark = marker()
    raw = f"GET {target}?m={mark} HTTP/1.1\r\nHost: {GRAPH}\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:  # plain proxy request
        s.sendall(raw)
        assert statuses(read_response(s)) == [400]
    assert statuses(exchange(gw, raw)) == [400]  # inside the tunnel
    assert upstream_connections(relay) == before and not reached(lookalike, mark)


# --- request smuggling ---------------------------------------------------------------------------


def smuggling_cases(token: str, mark: str) -> dict[str, bytes]:
    """Framings that two HTTP parsers can read differently. Each hides a second request, a DELETE
    no rule allows, carrying ``<mark>-smuggled``: it must never reach Graph unjudged."""
    hidden = (f"DELETE /v1.0/users/{mark}-smuggled HTTP/1.1\r\nHost: {GRAPH}\r\n"
              f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n").encode()
    n = len(hidden)
    start = f"POST /v1.0/users?m={mark} HTTP/1.1\r\nHost: {GRAPH}\r\nAuthorization: Bearer {token}\r\n"
    get = f"GET /v1.0/users?m={mark} HTTP/1.1\r\nHost: {GRAPH}\r\nAuthorization: Bearer {token}\r\n"
    return {
        "two Content-Length": f"{start}Content-Length: 0\r\nContent-Length: {n}\r\n\r\n".encode() + hidden,
        "two equal Content-Length": f"{start}Content-Length: {n}\r\nContent-Length: {n}\r\n\r\n".encode() + hidden,
        "Content-Length list": f"{start}Content-Length: {n}, 0\r\n\r\n".encode() + hidden,
        "Content-Length and Transfer-Encoding": f"{start}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode() + hidden,
        "Transfer-Encoding and Content-Length": f"{start}Transfer-Encoding: chunked\r\nContent-Length: {n + 5}\r\n\r\n0\r\n\r\n".encode() + hidden,
        "Transfer-Encoding obfuscated": f"{start}Content-Length: {n + 5}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".encode() + hidden,
        "Transfer-Encoding twice": f"{start}Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n".encode() + hidden,
        "Transfer-Encoding with a tab": f"{start}Transfer-Encoding:\tchunked\r\nContent-Length: {n + 5}\r\n\r\n0\r\n\r\n".encode() + hidden,
        "space before the colon": f"{start}Content-Length : {n}\r\n\r\n".encode() + hidden,
        "signed Content-Length": f"{start}Content-Length: +{n}\r\n\r\n".encode() + hidden,
        "obs-fold hiding Content-Length": f"{get}X-Folded: a\r\n Content-Length: {n}\r\n\r\n".encode() + hidden,
        "bare LF hiding Content-Length": f"{get}X-A: a\nContent-Length: {n}\r\n\r\n".encode() + hidden,
        "bare LF line endings": f"{get.replace(chr(13), '')}Content-Length: 0\n\n".encode() + hidden,
        "chunk size with an extension": f"{start}Transfer-Encoding: chunked\r\n\r\n2;x=y\r\n{{}}\r\n0\r\n\r\n".encode() + hidden,
        "chunk size overflow": f"{start}Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\n{{}}\r\n0\r\n\r\n".encode() + hidden,
    }


SMUGGLING = list(smuggling_cases("t", "m"))


@pytest.mark.parametrize("shape", SMUGGLING)
def test_request_smuggling_shapes_are_refused_or_normalised(edges, lookalike, tokens, shape):
    """Each shape is either refused (400) or read as the requests the gateway then judged: the
    hidden DELETE never reaches Graph, and whatever did reach Graph was judged and audited."""
    gw, _ = edges
    mark = marker()
    data = exchange(gw, smuggling_cases(tokens(), mark)[shape], wait=3)
    answered = statuses(data)
    if shape == "chunk size overflow":
        # Read as a chunk of 2**76 bytes: the gateway waits for it (up to the body size limit)
        # and has sent nothing anywhere.
        assert answered in ([], [400], [413]), data[:300]
    else:
        assert answered and answered[0] in (200, 400, 403, 413), data[:300]
    if 400 in answered:
        assert answered == [400], answered  # refused, nothing read after it
    assert not reached(lookalike, f"{mark}-smuggled")
    audited = {line["url"].split("graph.microsoft.com", 1)[-1] for line in audit_for(gw, mark)}
    for line in received(lookalike, mark):
        assert line["path"] in audited, (line["path"], audited)  # judged before it went on


@pytest.mark.parametrize("shape", ["content-length says 0", "transfer-encoding in HTTP/2"])
def test_http2_framing_that_would_smuggle_on_the_way_to_http1_is_refused(edges, lookalike, tokens, shape):
    """HTTP/2 in, HTTP/1.1 out: a body that contradicts content-length, or a transfer-encoding
    header (forbidden in HTTP/2), must not become a second HTTP/1.1 request upstream."""
    mark = marker()
    hidden = (f"DELETE /v1.0/users/{mark}-smuggled HTTP/1.1\r\nHost: {GRAPH}\r\n"
              f"Authorization: Bearer {tokens()}\r\n\r\n").encode()
    headers = [(":method", "POST"), (":scheme", "https"), (":authority", GRAPH),
               (":path", f"/v1.0/users?m={mark}"), ("authorization", f"Bearer {tokens()}")]
    if shape == "content-length says 0":
        headers.append(("content-length", "0"))
        body = hidden
    else:
        headers.append(("transfer-encoding", "chunked"))
        body = b"0\r\n\r\n" + hidden
    events, _ = h2_request(edges[0], headers, body)
    assert h2_status(events) in (None, 400, 403), events
    assert not reached(lookalike, f"{mark}-smuggled")
