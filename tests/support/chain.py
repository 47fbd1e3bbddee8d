"""The gateway's addon chain without sockets, built exactly as the gateway builds it (``build_chain``).

``exchange`` runs the hooks of one flow in the order mitmproxy 12 runs them (it mirrors
``mitmproxy/proxy/layers/http``): an addon's exception is logged and the next addon still runs (and is
kept in ``escaped``, which the ``no_exception_escapes_an_addon`` fixture asserts empty), a response
set in the ``request`` hooks means the upstream is never contacted, a kill stops the flow and fires
``error``. Flows are built by ``connect`` (a CONNECT, with proxy credentials or not) and
``graph_request`` (a request inside the tunnel); ``graph_json`` is an answer as Graph sends it, and
``refusal`` reads and checks the gateway's refusal as a client does. ``running_gateway`` is
``build_gateway`` inside mitmproxy's ``taddons.context``, for a test or fixture of its own.

The fixtures ``authority`` (a look-alike Entra), ``tokens`` (reader, reader-2, stranger) and ``gw``
(a ``Gateway`` with ``POLICY``, inside ``taddons.context``) are in ``tests/unit/conftest.py``.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import connection, flow, http
from mitmproxy.test import taddons, tflow, tutils

from nhi_gateway.addons.guard import Health
from nhi_gateway.addons.identity import CONNECT_KEY
from nhi_gateway.addons.recorder import Recorder
from nhi_gateway.identity.signing_keys import KeyStore
from nhi_gateway.identity.tokens import TokenVerifier
from nhi_gateway.lookalike.minting import EntraAuthority
from nhi_gateway.policy.decision import REFUSED_KEY, decision_of
from nhi_gateway.policy.loader import PolicyStore, parse_policy
from nhi_gateway.proxy.gateway import GatewayConfig, build_chain

from .entra import basic, entra_fetcher
from .policies import V1_ISSUER, V2_ISSUER, policy_head

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
READER_APP = "5e0b1683-de22-5eac-9334-fb85a741f6ff"
READER_OID = "0b1c2d3e-0000-4000-8000-000000000042"
SECOND_OID = "0b1c2d3e-0000-4000-8000-000000000043"  # another service principal of the same app
STRANGER_APP = "11111111-2222-4333-8444-555555555555"
STRANGER_OID = "0b1c2d3e-0000-4000-8000-000000000044"
GRAPH = "graph.microsoft.com"

SECRET_MAIL = "alice@contoso.example"
UPSTREAM_SECRET = b"upstream-only: must never reach the client"

# What the gateway allows in these tests: readers read users (masked), nobody deletes one. A
# module that tries another identity section puts its own head before it.
READER_RULES = f"""\
masking:
  profiles:
    pii: {{fields: [mail]}}
rules:
  - id: directory-read
    action: allow
    when: {{app_ids: [{READER_APP}]}}
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users", "/users/{{id}}"]
    mask: pii
  - id: no-user-deletes
    action: deny
    operations:
      - host: graph.microsoft.com
        methods: [DELETE]
        paths: ["/users/{{id}}"]
"""

# The gateway's policy in these tests.
POLICY = policy_head(TENANT, issuers=(V1_ISSUER, V2_ISSUER),
                     upstreams=[{"host": GRAPH, "token": "any"}]) + READER_RULES


def mint_tokens(authority: EntraAuthority) -> dict[str, str]:
    """App tokens of the readers (two service principals of one app) and of a stranger no rule names."""
    def mint(app, oid, name):
        return authority.mint_app_token(tenant_id=TENANT, app_id=app, object_id=oid, display_name=name,
                                        roles=("User.Read.All",))

    return {
        "reader": mint(READER_APP, READER_OID, "mcp-directory"),
        "reader-2": mint(READER_APP, SECOND_OID, "mcp-directory-2"),
        "stranger": mint(STRANGER_APP, STRANGER_OID, "stranger"),
    }


@dataclass
class Gateway:
    """The chain and the parts of it a test reaches into."""

    chain: list
    policies: PolicyStore
    verifier: TokenVerifier
    health: Health
    recorder: Recorder
    policy_path: Path

    def addon(self, cls):
        return next(a for a in self.chain if isinstance(a, cls))


def build_gateway(tmp_path: Path, authority, *, recordings: Path | None = None,
                  audit_path: Path | None = None, fetch=None, policy: str = POLICY) -> Gateway:
    """The chain with ``policy`` (written to ``tmp_path/policy.yaml``), keys from ``authority`` (or
    ``fetch``), recording in process to ``recordings`` (default ``tmp_path/recordings``)."""
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(policy)
    if recordings is None:
        recordings = tmp_path / "recordings"
        recordings.mkdir()
    policies = PolicyStore(parse_policy(policy, str(policy_path)))
    verifier = TokenVerifier(KeyStore(fetch or entra_fetcher(authority)))
    health = Health()
    # In-process recording: these tests drive the hooks themselves and reach into the recorder.
    config = GatewayConfig(policy_path=policy_path, recordings=recordings, audit_path=audit_path,
                           recording_process=False)
    chain, recorder = build_chain(config, policies, verifier, health)
    return Gateway(chain, policies, verifier, health, recorder, policy_path)


@contextmanager
def running_gateway(tmp_path: Path, authority, **kwargs) -> Iterator[Gateway]:
    """``build_gateway(tmp_path, authority, **kwargs)`` inside mitmproxy's ``taddons.context`` (the
    addons' options loaded), its recorder stopped when the block ends."""
    gateway = build_gateway(tmp_path, authority, **kwargs)
    try:
        with taddons.context(*gateway.chain):
            yield gateway
    finally:
        gateway.recorder.done()


# --- running hooks as mitmproxy does -------------------------------------------------------------

escaped: list[BaseException] = []  # exceptions that got past an addon: mitmproxy would forward anyway


async def run_hook(chain, name: str, f) -> None:
    """Call ``name`` on every addon of the chain that has it, in order, as AddonManager does: an
    exception is logged and the next addon still runs (mitmproxy's ``safecall``)."""
    for addon in chain:
        hook = getattr(addon, name, None)
        if hook is None:
            continue
        try:
            result = hook(f)
            if inspect.isawaitable(result):
                await result
        except Exception as e:  # pragma: no cover - only reached when an addon fails open
            logging.getLogger(__name__).error("Addon error in %s.%s: %r", type(addon).__name__, name, e)
            escaped.append(e)


def killed(f) -> bool:
    return f.error is not None and f.error.msg == flow.Error.KILLED_MESSAGE


async def exchange(chain, f: http.HTTPFlow, upstream: http.Response | None = None,
                   before_response=None) -> http.Request | None:
    """One request through the chain, in mitmproxy 12's order (proxy/layers/http/__init__.py).

    Returns a copy of the request as it would have left for the upstream, or None when the
    gateway answered (or killed the flow) before any upstream connection was made.
    """
    await run_hook(chain, "requestheaders", f)
    if killed(f):
        await run_hook(chain, "error", f)
        return None
    await run_hook(chain, "request", f)
    if killed(f):
        await run_hook(chain, "error", f)
        return None
    sent = None
    if f.response is None:
        # Only now would mitmproxy open the upstream connection and send the request.
        sent = f.request.copy()
        f.response = upstream if upstream is not None else graph_json({"value": []})
    if before_response is not None:
        before_response()
    await run_hook(chain, "responseheaders", f)
    if killed(f):
        await run_hook(chain, "error", f)
        return sent
    await run_hook(chain, "response", f)
    return sent


async def connect(chain, client: connection.Client, host: str = GRAPH, token: str | None = None,
                  proxy_header: str | None = None, port: int = 443) -> http.HTTPFlow:
    """A CONNECT from ``client`` (HTTPS_PROXY=http://name:<token>@gateway when ``token``)."""
    headers = http.Headers(host=f"{host}:{port}")
    if token is not None:
        headers["Proxy-Authorization"] = basic("mcp-directory", token)
    if proxy_header is not None:
        headers["Proxy-Authorization"] = proxy_header
    req = tutils.treq(method=b"CONNECT", scheme=b"", host=host, port=port, authority=f"{host}:{port}".encode(),
                      path=b"", headers=headers, content=b"")
    f = tflow.tflow(client_conn=client, req=req)
    await run_hook(chain, "http_connect", f)
    if f.response is not None and not 200 <= f.response.status_code < 300:
        await run_hook(chain, "http_connect_error", f)
    else:
        await run_hook(chain, "http_connected", f)
    return f


def graph_request(client: connection.Client, method: str = "GET", path: str = "/v1.0/users",
                  host: str = GRAPH, scheme: str = "https", bearer: str | None = None,
                  proxy_token: str | None = None, port: int | None = None) -> http.HTTPFlow:
    headers = http.Headers(host=host, accept="application/json")
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    if proxy_token is not None:
        headers["Proxy-Authorization"] = basic("mcp-directory", proxy_token)
    port = port or (443 if scheme == "https" else 80)
    req = tutils.treq(method=method.encode(), scheme=scheme.encode(), host=host, port=port,
                      authority=b"" if scheme == "https" else f"{host}:{port}".encode(),
                      path=path.encode(), headers=headers, content=b"")
    return tflow.tflow(client_conn=client, req=req)


async def tunnel(gw: Gateway, token: str | None = None) -> connection.Client:
    """A client connection with an admitted CONNECT to Graph."""
    client = tflow.tclient_conn()
    f = await connect(gw.chain, client, token=token)
    assert f.response is None and f.metadata.get(CONNECT_KEY) == "admitted"
    return client


def graph_json(doc, status: int = 200, encoding: str | None = None,
               content_type: str = "application/json;odata.metadata=minimal;odata.streaming=true") -> http.Response:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    r = http.Response.make(status, b"", {"Content-Type": content_type})
    if encoding:
        r.headers["Content-Encoding"] = encoding
    r.content = raw  # encoded with the Content-Encoding, as Graph sends it
    return r


USERS = {
    "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users",
    "value": [
        {"id": "1", "displayName": "Alice", "mail": SECRET_MAIL, "manager": {"mail": "boss@contoso.example"}},
        {"id": "2", "displayName": "Bob", "mail": None},
    ],
}


def refusal(f: http.HTTPFlow, status: int) -> dict:
    """The client-facing refusal: status, Graph-style error JSON, and the flow marked refused."""
    assert f.response is not None, "the gateway did not answer"
    assert f.response.status_code == status, f.response.get_text(strict=False)
    assert f.response.headers["Content-Type"] == "application/json"
    body = json.loads(f.response.content)
    assert UPSTREAM_SECRET not in f.response.content and SECRET_MAIL.encode() not in f.response.content
    inner = body["error"]["innerError"]["nhi-gateway"]
    assert f.metadata.get(REFUSED_KEY) is True
    decision = decision_of(f)
    assert decision is not None and not decision.allowed
    return {"code": body["error"]["code"], "message": body["error"]["message"], **inner}


def boom(*args, **kwargs):
    raise RuntimeError("injected failure")
