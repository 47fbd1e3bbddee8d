"""The real gateway process, real clients (requests and curl) configured with HTTPS_PROXY and the
gateway's CA, real TLS to the Graph look-alike. Every refusal is checked at the client and at the
upstream: a refused request must never have reached Graph."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys

import pytest
import requests

from ..support.e2e import (
    GRAPH,
    error_of,
    get_token,
    marker,
    proxy_basic,
    raw_connect,
    reached_graph,
    use_proxy,
)
from .conftest import BIN, REPO, start_gateway, stop


# --- allowed ------------------------------------------------------------------------------------

def test_allowed_read_is_masked_audited_and_recorded(gateway, lookalike, monkeypatch):
    token = get_token(gateway, lookalike, monkeypatch)
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users?$top=3&m={mark}", headers={"Authorization": f"Bearer {token}"},
                     timeout=20)
    assert r.status_code == 200, r.text
    users = r.json()["value"]
    assert users and all(u["mail"] == "[masked]" for u in users if "mail" in u)
    assert all(u["userPrincipalName"] == "[masked]" for u in users)
    assert all(u["displayName"] != "[masked]" for u in users)  # only the listed fields
    assert reached_graph(lookalike, mark)

    line = next(a for a in gateway.audit() if mark in a["url"])
    assert line["decision"] == "allow" and line["rule"] == "directory-read" and line["status"] == 200
    assert line["principal"]["display_name"] == "mcp-directory"
    assert line["principal"]["object_id"] == lookalike.app("mcp-directory")["object_id"]


def test_proxy_credentials_with_curl(gateway, lookalike, monkeypatch):
    """HTTPS_PROXY=http://name:<JWT>@host:port: curl sends Proxy-Authorization on CONNECT only."""
    token = get_token(gateway, lookalike, monkeypatch)
    mark = marker()
    env = gateway.client_env(token)
    out = subprocess.run(
        ["curl", "-sS", "--cacert", gateway.ca_cert, "-w", "\n%{http_code}", f"{GRAPH}/v1.0/groups?m={mark}"],
        env=env, capture_output=True, text=True, timeout=30,
    )
    body, _, status = out.stdout.rpartition("\n")
    assert status == "200", out.stdout + out.stderr
    assert json.loads(body)["value"]
    received = [line for line in lookalike.received() if mark in line["path"]]
    assert len(received) == 1
    headers = [h.lower() for h in received[0]["headers"]]
    assert "proxy-authorization" not in headers  # never goes upstream
    assert received[0]["authorization"]  # the verified proxy token was presented as the bearer


# --- refused ------------------------------------------------------------------------------------

def test_refused_write_names_the_rule_and_never_reaches_graph(gateway, lookalike, monkeypatch):
    token = get_token(gateway, lookalike, monkeypatch)
    app_id = lookalike.app("mcp-directory")["application_object_id"]
    mark = marker()
    for url in (f"{GRAPH}/v1.0/applications/{app_id}/addPassword?m={mark}",
                f"{GRAPH}/v1.0/applications(appId='{lookalike.app('mcp-directory')['client_id']}')/addPassword?m={mark}",
                f"{GRAPH}/beta/APPLICATIONS/{app_id}/AddPassword/?m={mark}"):
        r = requests.post(url, json={"passwordCredential": {"displayName": "x"}},
                          headers={"Authorization": f"Bearer {token}"}, timeout=20)
        assert r.status_code == 403, (url, r.text)
        err = error_of(r)
        assert err["code"] == "Authorization_RequestDenied"
        assert err["innerError"]["nhi-gateway"]["rule"] == "no-credential-minting"
        assert "no-credential-minting" in err["message"]
    assert not reached_graph(lookalike, mark)
    denied = [a for a in gateway.audit() if mark in a["url"]]
    assert len(denied) == 3 and all(a["decision"] == "deny" and a["status"] == 403 for a in denied)


def test_no_rule_allows(gateway, lookalike, monkeypatch):
    token = get_token(gateway, lookalike, monkeypatch)
    mark = marker()
    r = requests.delete(f"{GRAPH}/v1.0/users/someone?m={mark}", headers={"Authorization": f"Bearer {token}"},
                        timeout=20)
    assert r.status_code == 403
    assert "no rule allows" in error_of(r)["message"]
    assert error_of(r)["innerError"]["nhi-gateway"]["rule"] is None
    assert not reached_graph(lookalike, mark)


@pytest.mark.parametrize("case", ["missing", "tampered", "expired", "wrong-tenant", "not-a-jwt"])
def test_bad_tokens_get_401_naming_the_check(gateway, lookalike, monkeypatch, tokens, case):
    use_proxy(monkeypatch, gateway)
    good = tokens()
    bad = {
        "missing": None,
        "tampered": good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB"),
        "expired": tokens(now=1_700_000_000),
        "wrong-tenant": tokens(tenant_id="99999999-9999-4999-8999-999999999999"),
        "not-a-jwt": "hello",
    }[case]
    expected_check = {"missing": "missing", "tampered": "signature", "expired": "lifetime",
                      "wrong-tenant": "tenant", "not-a-jwt": "format"}[case]
    mark = marker()
    headers = {"Authorization": f"Bearer {bad}"} if bad else {}
    r = requests.get(f"{GRAPH}/v1.0/users?m={mark}", headers=headers, timeout=20)
    assert r.status_code == 401, r.text
    err = error_of(r)
    assert err["code"] == "InvalidAuthenticationToken"
    assert err["innerError"]["nhi-gateway"]["check"] == expected_check
    assert not reached_graph(lookalike, mark)


def test_bad_proxy_token_gets_407_with_json(gateway, tokens):
    status, body, s = raw_connect(gateway, "graph.microsoft.com", proxy_basic(tokens(now=1_700_000_000)))
    s.close()
    assert status == 407
    assert json.loads(body)["error"]["innerError"]["nhi-gateway"]["check"] == "lifetime"


def test_unknown_host_is_refused_at_connect(gateway, tokens):
    status, body, s = raw_connect(gateway, "evil.example.com", proxy_basic(tokens()))
    s.close()
    assert status == 403
    assert "not an upstream named in the policy" in json.loads(body)["error"]["message"]
    assert any(a["method"] == "CONNECT" and a["url"].startswith("evil.example.com") for a in gateway.audit())


def test_non_http_payload_inside_connect_is_refused(gateway, lookalike, tokens):
    before = len(lookalike.received())
    status, _, s = raw_connect(gateway, "graph.microsoft.com", proxy_basic(tokens()))
    assert status == 200
    s.sendall(b"\x00\x01SSH-2.0-OpenSSH_9.6\r\n" * 10)
    s.settimeout(10)
    try:
        leftover = s.recv(65536)
        while leftover and len(leftover) < 1 << 20:
            more = s.recv(65536)
            if not more:
                break
            leftover += more
    except (ConnectionResetError, TimeoutError):
        pass
    s.close()
    assert len(lookalike.received()) == before  # nothing was relayed to the upstream


def test_http2_and_tls_inside_tunnel_to_other_host_is_refused(gateway, tokens, lookalike):
    """CONNECT to graph, then ask for another host inside the tunnel: judged, refused (421)."""
    status, _, s = raw_connect(gateway, "graph.microsoft.com", proxy_basic(tokens()))
    assert status == 200
    ctx = ssl.create_default_context(cafile=gateway.ca_cert)
    tls = ctx.wrap_socket(s, server_hostname="graph.microsoft.com")
    mark = marker()
    tls.sendall(f"GET /v1.0/users?m={mark} HTTP/1.1\r\nHost: login.microsoftonline.com\r\n"
                f"Connection: close\r\n\r\n".encode())
    data = b""
    while chunk := tls.recv(65536):
        data += chunk
    tls.close()
    assert data.split()[1] == b"421", data[:200]
    assert not reached_graph(lookalike, mark)


# --- what is kept -------------------------------------------------------------------------------

def test_recordings_open_in_stock_mitmdump_and_hold_no_secrets(gateway, lookalike, monkeypatch):
    token = get_token(gateway, lookalike, monkeypatch)
    requests.get(f"{GRAPH}/v1.0/users", headers={"Authorization": f"Bearer {token}"}, timeout=20)
    requests.get(f"{GRAPH}/v1.0/users", headers={"Authorization": "Bearer bad"}, timeout=20)
    files = gateway.recording_files()
    assert any(f.name == "anonymous.mitm" for f in files)
    app = lookalike.app("mcp-directory")
    assert any(f.name == f"mcp-directory--{app['object_id']}.mitm" for f in files)
    for f in files:
        out = subprocess.run([str(BIN / "mitmdump"), "-nr", str(f), "--flow-detail", "1"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "graph.microsoft.com" in out.stdout or "login.microsoftonline.com" in out.stdout

    secrets = [token, app["secret"], token.split(".")[2]]
    everything = b"".join(f.read_bytes() for f in files) + (gateway.recordings / "audit.jsonl").read_bytes() \
        + gateway.log.read_bytes()
    for secret in secrets:
        assert secret.encode() not in everything


def test_recorded_flows_carry_comment_and_decision(gateway, lookalike, monkeypatch):
    from mitmproxy import io

    token = get_token(gateway, lookalike, monkeypatch)
    mark = marker()
    requests.post(f"{GRAPH}/v1.0/applications/x/addPassword?m={mark}",
                  headers={"Authorization": f"Bearer {token}"}, json={}, timeout=20)
    app = lookalike.app("mcp-directory")
    path = next(f for f in gateway.recording_files() if app["object_id"] in f.name)
    with open(path, "rb") as fh:
        flows = [f for f in io.FlowReader(fh).stream() if mark in f.request.path]
    assert len(flows) == 1
    flow = flows[0]
    assert "DENY" in flow.comment and "no-credential-minting" in flow.comment and "mcp-directory" in flow.comment
    assert flow.marked
    assert flow.metadata["nhi"]["rule"] == "no-credential-minting"
    assert flow.request.headers["Authorization"] == "Bearer [redacted]"


def test_audit_has_one_line_per_decision_and_the_chain_verifies(gateway):
    from nhi_gateway.recording.audit import verify_chain

    lines = gateway.audit()
    assert lines
    for line in lines:
        assert {"time", "flow_id", "principal", "method", "url", "decision", "rule", "status"} <= set(line)
    assert len({line["flow_id"] for line in lines}) == len(lines)
    assert verify_chain(gateway.recordings / "audit.jsonl") == []


# --- fail closed at start and at the edges ------------------------------------------------------

def test_malformed_policy_stops_the_start_naming_file_line_column(tmp_path):
    policy = tmp_path / "broken.yaml"
    policy.write_text((REPO / "policies" / "example.yaml").read_text().replace("action: deny", "action: maybe", 1))
    out = subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", "run", "--policy", str(policy),
                          "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    line_no = next(i for i, line in enumerate(policy.read_text().splitlines(), 1) if "action: maybe" in line)
    assert f"broken.yaml:{line_no}:" in out.stderr
    assert "maybe" in out.stderr


def test_unreachable_signing_keys_at_cold_start_answer_503(tmp_path, lookalike, tokens, monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: Entra is "down"
    gw = start_gateway(tmp_path / "gw", lookalike,
                       extra_args=["--resolve", f"login.microsoftonline.com=127.0.0.1:{port}"])
    try:
        use_proxy(monkeypatch, gw)
        mark = marker()
        r = requests.get(f"{GRAPH}/v1.0/users?m={mark}", headers={"Authorization": f"Bearer {tokens()}"},
                         timeout=30)
        assert r.status_code == 503
        assert error_of(r)["innerError"]["nhi-gateway"]["check"] == "keys_unavailable"
        assert not reached_graph(lookalike, mark)
    finally:
        stop(gw.proc)


def test_plain_http_absolute_form_is_judged_and_refused(gateway, lookalike, tokens):
    """http_proxy carries Proxy-Authorization on every plain request; the token must not go
    upstream in cleartext, so plain HTTP is refused, and the header never leaves the gateway."""
    mark = marker()
    env = {**gateway.client_env(), "http_proxy": gateway.proxy(tokens())}
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", f"http://graph.microsoft.com/v1.0/users?m={mark}"],
                         env=env, capture_output=True, text=True, timeout=30)
    body, _, status = out.stdout.rpartition("\n")
    assert status == "403", out.stdout + out.stderr
    assert "plain HTTP" in json.loads(body)["error"]["message"]
    assert not reached_graph(lookalike, mark)


def test_connect_to_another_port_is_refused(gateway, tokens):
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    s.sendall(f"CONNECT graph.microsoft.com:8443 HTTP/1.1\r\nHost: graph.microsoft.com:8443\r\n"
              f"Proxy-Authorization: {proxy_basic(tokens())}\r\n\r\n".encode())
    head = s.recv(65536)
    s.close()
    assert head.split()[1] == b"403"


def test_keep_alive_connection_serves_many_requests(gateway, lookalike, monkeypatch):
    """One HTTP/1.1 client connection, many requests: the upstream connection is reused (a
    rewritten upstream address once made the sixth request wait until the upstream dropped an
    idle connection). --max-time only bounds a hang; it measures nothing."""
    token = get_token(gateway, lookalike, monkeypatch)
    out = subprocess.run(
        ["curl", "--http1.1", "-sS", "--max-time", "4", "--cacert", gateway.ca_cert,
         "-w", "\n@@%{http_code} %{num_connects}\n", "-H", f"Authorization: Bearer {token}",
         *[f"{GRAPH}/v1.0/groups?n={i}" for i in range(12)]],
        env=gateway.client_env(), capture_output=True, text=True, timeout=60,
    )
    results = [line[2:].split() for line in out.stdout.splitlines() if line.startswith("@@")]
    assert [code for code, _ in results] == ["200"] * 12, out.stderr
    assert sum(int(n) for _, n in results) == 1  # one client connection for all twelve


def test_what_the_gateway_creates_is_private_to_its_user(gateway, lookalike, monkeypatch):
    """The CA key, recordings, audit trail and their directories: no access for group or others."""
    import os
    import stat

    get_token(gateway, lookalike, monkeypatch)  # makes sure recordings exist
    confdir = gateway.workdir / "confdir"
    paths = [confdir, confdir / "mitmproxy-ca.pem", gateway.recordings, gateway.recordings / "audit.jsonl",
             *gateway.recording_files(), *(f.parent for f in gateway.recording_files())]
    assert len(paths) > 5
    for path in paths:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
