"""What the end-to-end tests do as a client of a running gateway, and what they read back.

The gateway process and the look-alike are started by ``tests/e2e/conftest.py`` (fixtures
``lookalike``, ``gateway``, ``tokens``; ``start_gateway``, ``gateway_running``). A test sends each
request with a ``marker()`` in its query, then finds that request again: at the look-alike
(``reached_graph``: did it get past the gateway?), in the audit trail (``audit_line``) and in the
recordings (``recorded``, ``recorded_flow``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid

import pytest
import requests
from mitmproxy import io

from . import entra

GRAPH = "https://graph.microsoft.com"
LOGIN = "https://login.microsoftonline.com"


def marker() -> str:
    """A unique query marker so each test finds its own request in the upstream's log."""
    return uuid.uuid4().hex[:12]


def use_proxy(monkeypatch, gateway, token: str | None = None) -> None:
    """Configure this process's clients as users do: HTTPS_PROXY (with ``token`` as the proxy
    password when given) and the gateway's CA bundle."""
    for k, v in gateway.client_env(token).items():
        if k.lower().endswith("proxy") or k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
            monkeypatch.setenv(k, v)


def session_for(gw) -> requests.Session:
    """A client configured as users configure one: HTTPS_PROXY and the gateway's CA."""
    s = requests.Session()
    s.trust_env = False  # the same settings, without touching this process's environment
    env = gw.client_env()
    s.proxies = {"https": env["HTTPS_PROXY"]}
    s.verify = env["REQUESTS_CA_BUNDLE"]
    return s


def received(lookalike, mark: str) -> list[dict]:
    """The requests the look-alike (Graph and Entra's endpoints) received with ``mark`` in their path."""
    return [line for line in lookalike.received() if mark in line.get("path", "")]


def reached(lookalike, mark: str) -> bool:
    """Whether a request with ``mark`` got past the gateway to the look-alike."""
    return bool(received(lookalike, mark))


def reached_graph(lookalike, mark: str) -> bool:
    return reached(lookalike, mark)


def audit_line(gateway, mark: str) -> dict:
    """The one audit line of the request with ``mark``."""
    lines = [a for a in gateway.audit() if mark in a["url"]]
    assert len(lines) == 1, lines
    return lines[0]


def recorded(gateway, mark: str) -> list:
    """Every recorded flow whose request path carries ``mark``, in file order."""
    flows = []
    for path in gateway.recording_files():
        with open(path, "rb") as fh:
            flows += [f for f in io.FlowReader(fh).stream() if mark in f.request.path]
    return flows


def recorded_flow(gateway, mark: str):
    """The first recorded flow of the request with ``mark``."""
    flows = recorded(gateway, mark)
    assert flows, f"no recorded flow for {mark}"
    return flows[0]


def until(predicate, what: str, deadline: float = 15.0, interval: float = 0.1):
    """Poll ``predicate`` until it holds and return its value; fail naming ``what`` after
    ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        if value := predicate():
            return value
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline}s: {what}")
        time.sleep(interval)


def cli(*args: str, cwd=None, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``nhi-gateway ARGS`` as an operator runs it (``env`` replaces this process's environment)."""
    return subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def graph_credential(lookalike, secret: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The gateway's own Graph credential (the look-alike's nhi-gateway app, a client secret, or
    ``secret`` instead), given as an operator gives it: (command-line arguments, environment)."""
    gw_app = lookalike.app("nhi-gateway")
    args = ["--graph-client-id", gw_app["client_id"]]
    env = {"NHI_GRAPH_TENANT_ID": lookalike.tenant_id, "NHI_GRAPH_CLIENT_SECRET": secret or gw_app["secret"]}
    return args, env


def error_of(response) -> dict:
    """The Graph-style ``error`` of a refusal."""
    return response.json()["error"]


def nhi(response) -> dict:
    """The gateway's own part of a refusal body (stage, check, rule, request id)."""
    return error_of(response)["innerError"]["nhi-gateway"]


def get_token(gateway, lookalike, monkeypatch, app: str = "mcp-directory") -> str:
    """client_credentials through the gateway, exactly as an app does it."""
    use_proxy(monkeypatch, gateway)
    a = lookalike.app(app)
    r = requests.post(
        f"{LOGIN}/{lookalike.tenant_id}/oauth2/v2.0/token",
        data={"grant_type": "client_credentials", "client_id": a["client_id"],
              "client_secret": a["secret"], "scope": "https://graph.microsoft.com/.default"},
        timeout=20,
    )
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def proxy_basic(token: str) -> str:
    """The proxy credentials of ``HTTPS_PROXY=http://agent:<token>@gateway``, as a raw CONNECT sends them."""
    return entra.basic("agent", token)


def read_head(sock) -> bytes:
    """Read until the end of an HTTP head (``\\r\\n\\r\\n``) or until the peer closes; what was read."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def raw_connect(gateway, host: str | bytes, proxy_auth: str | None = None,
                port: int = 443) -> tuple[int, bytes, socket.socket]:
    """Send a CONNECT by hand (``host`` as raw bytes if need be): most clients hide a refused
    CONNECT's body, tests must not. The status, the body of the answer, and the socket."""
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    target = host.encode() if isinstance(host, str) else host
    head = b"CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n" % (target, port, target, port)
    if proxy_auth:
        head += f"Proxy-Authorization: {proxy_auth}\r\n".encode()
    s.sendall(head + b"\r\n")
    head, _, body = read_head(s).partition(b"\r\n\r\n")
    status = int(head.split()[1])
    length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, body, s
