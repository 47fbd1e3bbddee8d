"""The addon chain fails closed: every way a request can go wrong ends in a refusal that the client
can read, and nothing reaches the upstream.

No sockets: each test builds the chain exactly as the gateway does (``build_chain``), then runs the
hooks of each flow in the order mitmproxy 12 runs them (``exchange`` mirrors
``mitmproxy/proxy/layers/http``: an addon's exception is logged and the next addon still runs, a
response set in the ``request`` hooks means the upstream is never contacted, a kill stops the flow
and fires ``error``). Tokens are minted by the look-alike Entra authority and really verified.
The harness is ``tests/support/chain.py``; its fixtures are in ``tests/unit/conftest.py``.
"""

from __future__ import annotations

import gzip
import json

import pytest
from mitmproxy import flow, http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import tflow

from nhi_gateway.addons import approval as approval_module
from nhi_gateway.addons import guard as guard_module
from nhi_gateway.addons import masking as masking_module
from nhi_gateway.addons import membership as membership_module
from nhi_gateway.addons import upstream_timeout as upstream_timeout_module
from nhi_gateway.addons.approvals_api import ApprovalsAPI, api_mode
from nhi_gateway.addons.audit import Audit
from nhi_gateway.addons.authorization import Authorization
from nhi_gateway.policy.decision import decision_of, set_decision
from nhi_gateway.addons.guard import Guard
from nhi_gateway.addons.identity import CONNECT_KEY, Identity
from nhi_gateway.addons.recorder import Recorder
from nhi_gateway.recording.audit import AuditWriteError
from nhi_gateway.policy.decision import Decision, Stage
from nhi_gateway.lookalike.pki import SigningKey
from nhi_gateway.masking.masks import MASK

from ..support.chain import (
    Gateway,
    POLICY,
    READER_APP,
    READER_OID,
    SECRET_MAIL,
    STRANGER_OID,
    TENANT,
    UPSTREAM_SECRET,
    USERS,
    boom,
    connect,
    exchange,
    graph_json,
    graph_request,
    killed,
    refusal,
    run_hook,
    running_gateway,
    tunnel,
)

pytestmark = pytest.mark.usefixtures("no_exception_escapes_an_addon")

# The same policy reloaded without its mask profile (the allow rule no longer names one).
POLICY_WITHOUT_PROFILE = POLICY.replace("    pii: {fields: [mail]}\n", "    other: {fields: [mobilePhone]}\n").replace(
    "    mask: pii\n", ""
)



# --- the path that works (the baseline every refusal below differs from) -------------------------


async def test_allowed_request_is_forwarded_and_masked(gw, tokens):
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])
    sent = await exchange(gw.chain, f, graph_json(USERS))
    assert sent is not None, "an allowed request must reach the upstream"
    assert sent.headers["Authorization"] == f"Bearer {tokens['reader']}"
    assert f.response.status_code == 200
    doc = json.loads(f.response.content)
    assert doc["value"][0]["mail"] == MASK and doc["value"][0]["displayName"] == "Alice"
    assert doc["value"][0]["manager"]["mail"] == MASK
    decision = decision_of(f)
    assert decision.allowed and decision.rule_id == "directory-read"
    assert decision.extra["masked_fields"] == 3
    assert not gw.health.problems
    assert gw.recorder.last_path is not None and gw.recorder.last_path.stat().st_size > 0


async def test_deny_rule_refuses_before_upstream(gw, tokens):
    client = await tunnel(gw)
    f = graph_request(client, method="DELETE", path="/v1.0/users/1", bearer=tokens["reader"])
    assert await exchange(gw.chain, f, graph_json({}, status=204)) is None
    r = refusal(f, 403)
    assert r["code"] == "Authorization_RequestDenied"
    assert (r["stage"], r["rule"]) == ("policy", "no-user-deletes")


async def test_no_rule_refuses_before_upstream(gw, tokens):
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["stranger"])
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 403)
    assert (r["stage"], r["rule"]) == ("policy", None)
    assert decision_of(f).principal["object_id"] == STRANGER_OID


# --- 1. the final guard --------------------------------------------------------------------------


def without_authorization(gw: Gateway, monkeypatch) -> None:
    gw.chain.remove(gw.addon(Authorization))


def authorization_hook_skipped(gw: Gateway, monkeypatch) -> None:
    # As if mitmproxy never called the policy step for this flow.
    monkeypatch.setattr(gw.addon(Authorization), "request", lambda f: None)


def deny_written_but_not_answered(gw: Gateway, monkeypatch) -> None:
    def decide_without_answering(f):
        set_decision(f, Decision.deny(Stage.POLICY, 403, "Authorization_RequestDenied", "no"))

    monkeypatch.setattr(gw.addon(Authorization), "request", decide_without_answering)


@pytest.mark.parametrize("break_policy_step", [without_authorization, authorization_hook_skipped,
                                               deny_written_but_not_answered])
async def test_guard_refuses_a_request_without_an_allow(gw, tokens, monkeypatch, break_policy_step):
    break_policy_step(gw, monkeypatch)
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])  # a request the policy would allow
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 403)
    assert (r["stage"], r["check"]) == ("guard", "guard")


async def test_guard_replaces_a_response_to_a_request_never_allowed(gw):
    # A flow that reaches the response hooks without having been judged (a path that skipped the
    # request hooks): the upstream's answer is replaced, not passed on.
    f = graph_request(tflow.tclient_conn())
    f.response = graph_json(UPSTREAM_SECRET, content_type="text/plain")
    await run_hook(gw.chain, "responseheaders", f)
    await run_hook(gw.chain, "response", f)
    r = refusal(f, 403)
    assert (r["stage"], r["check"]) == ("guard", "guard")


async def test_guard_refuses_a_connect_identity_did_not_admit(gw, monkeypatch):
    monkeypatch.setattr(gw.addon(Identity), "http_connect", lambda f: None)
    f = await connect(gw.chain, tflow.tclient_conn())
    r = refusal(f, 403)
    assert (r["stage"], r["check"]) == ("guard", "guard")


# --- 2. an exception in any hook refuses the flow ------------------------------------------------


REQUEST_SIDE_FAILURES = {
    # hook (the dependency made to raise): installs the failure
    "identity.request (verify)": lambda gw, mp: mp.setattr(gw.verifier, "verify", boom),
    "authorization.request (decide)": lambda gw, mp: mp.setattr(gw.policies.current, "decide", boom),
    "guard.request": lambda gw, mp: mp.setattr(gw.addon(Guard), "_unhealthy", boom),
    "membership.request (needs_lookup)": lambda gw, mp: mp.setattr(membership_module, "needs_lookup", boom),
    "approval.request (decision_of)": lambda gw, mp: mp.setattr(approval_module, "decision_of", boom),
    "upstream_timeout.request (event loop)": lambda gw, mp: mp.setattr(
        upstream_timeout_module, "asyncio", type("NoLoop", (), {"get_running_loop": staticmethod(boom)})),
}


@pytest.mark.parametrize("failure", REQUEST_SIDE_FAILURES, ids=list(REQUEST_SIDE_FAILURES))
async def test_exception_in_a_request_hook_refuses(gw, tokens, monkeypatch, failure):
    client = await tunnel(gw)
    REQUEST_SIDE_FAILURES[failure](gw, monkeypatch)
    f = graph_request(client, bearer=tokens["reader"])
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 500)
    assert (r["code"], r["stage"]) == ("GatewayError", "error")
    assert decision_of(f).stage is Stage.ERROR


CONNECT_FAILURES = {
    "identity.http_connect (verify)": lambda gw, mp: mp.setattr(gw.verifier, "verify", boom),
    "guard.http_connect": lambda gw, mp: mp.setattr(gw.addon(Guard), "_unhealthy", boom),
}


@pytest.mark.parametrize("failure", CONNECT_FAILURES, ids=list(CONNECT_FAILURES))
async def test_exception_in_a_connect_hook_refuses_the_tunnel(gw, tokens, monkeypatch, failure):
    CONNECT_FAILURES[failure](gw, monkeypatch)
    f = await connect(gw.chain, tflow.tclient_conn(), token=tokens["reader"])
    r = refusal(f, 500)
    assert (r["code"], r["stage"]) == ("GatewayError", "error")
    assert "Proxy-Authorization" not in f.request.headers


RESPONSE_SIDE_FAILURES = {
    "masking.response (mask_body)": lambda gw, mp: mp.setattr(masking_module, "mask_body", boom),
    "guard.response": lambda gw, mp: mp.setattr(guard_module, "decision_of", boom),
    "audit.response (AuditLog.write)": lambda gw, mp: mp.setattr(gw.addon(Audit).log, "write", boom),
    "recorder.response (write)": lambda gw, mp: mp.setattr(gw.recorder, "write", boom),
}


@pytest.mark.parametrize("failure", RESPONSE_SIDE_FAILURES, ids=list(RESPONSE_SIDE_FAILURES))
async def test_exception_in_a_response_hook_withholds_the_upstream_body(gw, tokens, monkeypatch, failure):
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])
    upstream = graph_json({"value": [{"mail": SECRET_MAIL, "note": UPSTREAM_SECRET.decode()}]})
    # Installed once the request has gone upstream, so the failure hits the response hooks.
    install = RESPONSE_SIDE_FAILURES[failure]
    sent = await exchange(gw.chain, f, upstream, before_response=lambda: install(gw, monkeypatch))
    assert sent is not None
    assert f.response is not upstream
    r = refusal(f, 500)
    assert (r["code"], r["stage"]) == ("GatewayError", "error")
    assert decision_of(f).stage is Stage.ERROR


def raising_stream(self):
    raise RuntimeError("injected failure")


async def test_exception_in_requestheaders_kills_the_flow(gw, tokens, monkeypatch):
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])
    monkeypatch.setattr(http.Request, "stream", property(raising_stream), raising=False)
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    assert killed(f)
    assert decision_of(f).stage is Stage.ERROR and not decision_of(f).allowed


async def test_exception_in_responseheaders_kills_the_flow(gw, tokens, monkeypatch):
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])
    upstream = graph_json(UPSTREAM_SECRET, content_type="text/plain")
    await exchange(gw.chain, f, upstream, before_response=lambda: monkeypatch.setattr(
        http.Response, "stream", property(raising_stream), raising=False))
    assert killed(f)
    assert decision_of(f).stage is Stage.ERROR and not decision_of(f).allowed


async def async_boom(*args, **kwargs):
    raise RuntimeError("injected failure")


async def test_exception_in_the_approval_api_refuses_the_call(gw, tokens, monkeypatch):
    monkeypatch.setattr(ApprovalsAPI, "_caller", async_boom)
    client = tflow.tclient_conn()
    client.proxy_mode = ProxyMode.parse(api_mode("127.0.0.1", 1))
    f = graph_request(client, path="/approvals", host="approvals.nhi-gateway.invalid", scheme="http",
                      port=1, bearer=tokens["reader"])
    assert await exchange(gw.chain, f, graph_json({})) is None
    r = refusal(f, 500)
    assert (r["code"], r["stage"]) == ("GatewayError", "error")


async def test_exception_in_the_recorder_refuses_and_amends_the_audit_line(tmp_path, authority, tokens, monkeypatch):
    audit_path = tmp_path / "audit.jsonl"
    with running_gateway(tmp_path, authority, audit_path=audit_path) as gw:
        client = await tunnel(gw)
        f = graph_request(client, bearer=tokens["reader"])
        upstream = graph_json({"value": [{"note": UPSTREAM_SECRET.decode()}]})
        sent = await exchange(gw.chain, f, upstream,
                              before_response=lambda: monkeypatch.setattr(gw.recorder, "write", boom))
        assert sent is not None
        r = refusal(f, 500)
        assert (r["code"], r["stage"]) == ("GatewayError", "error")
    lines = [json.loads(raw) for raw in audit_path.read_text().splitlines() if json.loads(raw)["flow_id"] == f.id]
    assert [line["status"] for line in lines] == [200, 500] and "amends" in lines[-1]


# --- 3. streamed bodies ----------------------------------------------------------------------------


async def test_streamed_response_is_killed_at_responseheaders(gw, tokens):
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])
    upstream = graph_json(USERS)

    def upstream_streams():
        upstream.stream = True  # what stream_large_bodies or an addon would set

    await exchange(gw.chain, f, upstream, before_response=upstream_streams)
    assert killed(f)
    assert not f.live


async def test_streamed_request_is_killed_before_it_is_sent(gw, tokens):
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])
    f.request.stream = True
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    assert killed(f)
    assert decision_of(f) is None or not decision_of(f).allowed


# --- 4. non-HTTP payloads inside CONNECT ---------------------------------------------------------


async def test_raw_tcp_inside_a_tunnel_is_killed(gw, tokens):
    client = await tunnel(gw, token=tokens["reader"])
    f = tflow.ttcpflow(client_conn=client)
    await run_hook(gw.chain, "tcp_start", f)
    assert killed(f)


async def test_websocket_is_killed(gw):
    f = tflow.twebsocketflow()
    await run_hook(gw.chain, "websocket_start", f)
    assert killed(f)


@pytest.mark.parametrize("protocol", ["websocket", "h2c", "TLS/1.2", ""])
async def test_upgrade_request_is_refused_before_it_goes_upstream(gw, tokens, protocol):
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])  # a request the policy allows
    f.request.headers["Connection"] = "Upgrade"
    f.request.headers["Upgrade"] = protocol
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 403)
    assert (r["stage"], r["check"]) == ("guard", "upgrade")
    assert decision_of(f).operation.startswith("GET graph.microsoft.com") and decision_of(f).principal  # on record


async def test_a_101_answer_is_not_relayed(gw, tokens):
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])
    switching = http.Response.make(101, b"", {"Upgrade": "websocket", "Connection": "Upgrade"})
    assert await exchange(gw.chain, f, switching) is not None
    r = refusal(f, 502)
    assert (r["stage"], r["check"]) == ("guard", "upgrade")


# --- 5. records that cannot be written -----------------------------------------------------------


async def test_unwritable_recording_refuses_and_stops_the_gateway_until_it_recovers(tmp_path, authority, tokens):
    recordings = tmp_path / "recordings"
    recordings.write_text("a file where the recordings directory should be")
    with running_gateway(tmp_path, authority, recordings=recordings, audit_path=tmp_path / "audit.jsonl") as gw:
        client = await tunnel(gw)
        f = graph_request(client, bearer=tokens["reader"])
        upstream = graph_json({"value": [{"note": UPSTREAM_SECRET.decode()}]})
        assert await exchange(gw.chain, f, upstream) is None  # its write-ahead failed: never forwarded
        r = refusal(f, 503)
        assert (r["code"], r["stage"], r["check"]) == ("ServiceUnavailable", "guard", "recording")
        assert "before forwarding" in r["message"]
        assert "recording" in gw.health.problems

        # Every later request is refused before it goes upstream.
        g = graph_request(client, bearer=tokens["reader"])
        assert await exchange(gw.chain, g, graph_json(USERS)) is None
        r = refusal(g, 503)
        assert (r["stage"], r["check"]) == ("guard", "health")

        c = await connect(gw.chain, tflow.tclient_conn(), token=tokens["reader"])
        r = refusal(c, 503)
        assert (r["stage"], r["check"]) == ("guard", "health")

        # Once the directory is writable again, the next (refused, recorded) flow clears the fault.
        recordings.unlink()
        recordings.mkdir()
        h = graph_request(client, bearer=tokens["reader"])
        assert await exchange(gw.chain, h, graph_json(USERS)) is None
        assert not gw.health.problems
        k = graph_request(client, bearer=tokens["reader"])
        assert await exchange(gw.chain, k, graph_json(USERS)) is not None
        assert k.response.status_code == 200


async def test_audit_line_says_what_the_client_got_when_recording_fails(tmp_path, authority, tokens, monkeypatch):
    audit_path = tmp_path / "audit.jsonl"

    def disk_full(self, flow, connections=None):
        raise OSError(28, "No space left on device")

    # The request half is written ahead (and forwarded); the disk fills before the answer is written.
    monkeypatch.setattr(Recorder, "record_now", disk_full)
    with running_gateway(tmp_path, authority, audit_path=audit_path) as gw:
        client = await tunnel(gw)
        f = graph_request(client, bearer=tokens["reader"])
        assert await exchange(gw.chain, f, graph_json(USERS)) is not None
    assert f.response.status_code == 503
    lines = [json.loads(raw) for raw in audit_path.read_text().splitlines()
             if json.loads(raw)["flow_id"] == f.id]
    # The audit line written before the recording failed is amended by the next one.
    assert (lines[-1]["decision"], lines[-1]["status"], lines[-1]["check"]) == ("deny", 503, "recording")
    assert "amends" in lines[-1]


async def test_audit_write_failure_refuses_and_stops_the_gateway(gw, tokens, monkeypatch):
    def disk_full(record):
        raise AuditWriteError("cannot write audit log: [Errno 28] No space left on device")

    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])
    upstream = graph_json({"value": [{"note": UPSTREAM_SECRET.decode()}]})
    audit = gw.addon(Audit)
    assert await exchange(gw.chain, f, upstream,
                          before_response=lambda: monkeypatch.setattr(audit.log, "write", disk_full)) is not None
    r = refusal(f, 503)
    assert (r["code"], r["stage"], r["check"]) == ("ServiceUnavailable", "guard", "audit")
    assert "audit" in gw.health.problems

    g = graph_request(client, bearer=tokens["reader"])
    assert await exchange(gw.chain, g, graph_json(USERS)) is None
    r = refusal(g, 503)
    assert (r["stage"], r["check"]) == ("guard", "health")


async def test_an_answer_cut_short_is_audited_as_the_502_the_client_got(tmp_path, authority, tokens):
    # The upstream's headers arrived, its body never did: mitmproxy answers the client 502 and
    # calls `error`; flow.response still holds the upstream's 200 headers.
    audit_path = tmp_path / "audit.jsonl"
    with running_gateway(tmp_path, authority, audit_path=audit_path) as gw:
        client = await tunnel(gw)
        f = graph_request(client, bearer=tokens["reader"])
        await run_hook(gw.chain, "requestheaders", f)
        await run_hook(gw.chain, "request", f)
        f.response = graph_json(USERS)
        await run_hook(gw.chain, "responseheaders", f)
        f.error = flow.Error("peer closed connection without sending complete message body")
        await run_hook(gw.chain, "error", f)
    line = [json.loads(raw) for raw in audit_path.read_text().splitlines() if json.loads(raw)["flow_id"] == f.id][-1]
    assert (line["status"], line["error"]) == (502, "peer closed connection without sending complete message body")


# --- 6. masking ------------------------------------------------------------------------------------


async def test_gzip_response_is_masked_and_stays_gzip(gw, tokens):
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])
    upstream = graph_json(USERS, encoding="gzip")
    assert SECRET_MAIL.encode() not in upstream.raw_content  # really compressed on the wire
    assert await exchange(gw.chain, f, upstream) is not None
    assert f.response.status_code == 200
    assert f.response.headers["Content-Encoding"] == "gzip"
    doc = json.loads(gzip.decompress(f.response.raw_content))
    assert [u["mail"] for u in doc["value"]] == [MASK, None]  # null stays null: masking keeps JSON types
    assert doc["value"][0]["manager"]["mail"] == MASK
    assert int(f.response.headers["Content-Length"]) == len(f.response.raw_content)
    assert SECRET_MAIL.encode() not in gzip.decompress(f.response.raw_content)


@pytest.mark.parametrize("upstream", [
    pytest.param(lambda: graph_json(b'{"value": [{"mail": "' + SECRET_MAIL.encode() + b'"'), id="truncated-json"),
    pytest.param(lambda: graph_json(b'{"mail": NaN, "x": "' + UPSTREAM_SECRET + b'"}'), id="not-json-constant"),
    pytest.param(lambda: mislabelled(b"not gzip: " + SECRET_MAIL.encode() + UPSTREAM_SECRET), id="corrupt-gzip"),
    # Parses as JSON only if the Content-Encoding is ignored: a client would decode it otherwise.
    pytest.param(lambda: mislabelled(b'{"value": []}'), id="json-labelled-gzip"),
])
async def test_json_body_that_cannot_be_masked_is_withheld(gw, tokens, upstream):
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])
    assert await exchange(gw.chain, f, upstream()) is not None
    r = refusal(f, 502)
    assert (r["code"], r["stage"], r["check"], r["rule"]) == ("BadGateway", "masking", "masking", "directory-read")


def mislabelled(raw: bytes) -> http.Response:
    r = graph_json(b"")
    r.headers["Content-Encoding"] = "gzip"
    r.raw_content = raw
    return r


async def test_mask_profile_removed_by_a_reload_withholds_the_response(gw, tokens):
    client = await tunnel(gw)
    f = graph_request(client, bearer=tokens["reader"])

    def reload_without_profile():
        gw.policy_path.write_text(POLICY_WITHOUT_PROFILE)
        gw.policies.reload()
        assert "pii" not in gw.policies.current.mask_profiles

    assert await exchange(gw.chain, f, graph_json(USERS), before_response=reload_without_profile) is not None
    r = refusal(f, 502)
    assert (r["stage"], r["check"], r["rule"]) == ("masking", "masking", "directory-read")
    assert "pii" in r["message"]


# --- 7. identity -----------------------------------------------------------------------------------


async def test_proxy_authorization_never_leaves_on_connect(gw, tokens):
    f = await connect(gw.chain, tflow.tclient_conn(), token=tokens["reader"])
    assert f.response is None and f.metadata[CONNECT_KEY] == "admitted"
    assert "Proxy-Authorization" not in f.request.headers


async def test_proxy_authorization_inside_a_tunnel_never_goes_upstream(gw, tokens):
    # A client that sends its proxy credentials on the requests inside the tunnel as well.
    client = await tunnel(gw)
    f = graph_request(client, proxy_token=tokens["reader"])
    sent = await exchange(gw.chain, f, graph_json(USERS))
    assert sent is not None
    assert "Proxy-Authorization" not in sent.headers
    assert sent.headers["Authorization"] == f"Bearer {tokens['reader']}"


@pytest.mark.parametrize("port", [80, 443])
async def test_plain_http_to_graph_is_refused(gw, tokens, port):
    # HTTP_PROXY clients send the token in cleartext on every request: never forward that.
    f = graph_request(tflow.tclient_conn(), scheme="http", port=port, proxy_token=tokens["reader"])
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 403)
    assert (r["stage"], r["check"]) == ("policy", "upstream")


async def test_proxy_token_is_presented_upstream_as_the_bearer(gw, tokens):
    client = await tunnel(gw, token=tokens["reader"])
    f = graph_request(client)  # no Authorization header: the client only set HTTPS_PROXY
    sent = await exchange(gw.chain, f, graph_json(USERS))
    assert sent is not None
    assert sent.headers["Authorization"] == f"Bearer {tokens['reader']}"
    assert decision_of(f).principal["object_id"] == READER_OID


@pytest.mark.parametrize("written", ["bearer {}", "BEARER   {}", "Bearer {}  "])
async def test_the_upstream_authorization_is_rebuilt_from_the_verified_token(gw, tokens, written):
    """Whatever the client wrote around its token, Graph gets ``Bearer <the verified token>``."""
    client = await tunnel(gw)
    f = graph_request(client)
    f.request.headers["Authorization"] = written.format(tokens["reader"])
    sent = await exchange(gw.chain, f, graph_json(USERS))
    assert sent is not None and sent.headers["Authorization"] == f"Bearer {tokens['reader']}"


async def test_request_without_a_token_is_refused_401(gw):
    client = await tunnel(gw)
    f = graph_request(client)
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 401)
    assert (r["code"], r["stage"], r["check"]) == ("InvalidAuthenticationToken", "identity", "missing")
    assert "WWW-Authenticate" in f.response.headers


async def test_unreachable_signing_keys_refuse_503(tmp_path, authority, tokens):
    async def entra_down(url):
        raise ConnectionError("login.microsoftonline.com unreachable")

    with running_gateway(tmp_path, authority, fetch=entra_down) as gw:
        client = await tunnel(gw)
        f = graph_request(client, bearer=tokens["reader"])
        assert await exchange(gw.chain, f, graph_json(USERS)) is None
        r = refusal(f, 503)
        assert (r["code"], r["stage"], r["check"]) == ("ServiceUnavailable", "identity", "keys_unavailable")


async def test_forged_token_is_refused_401(gw, tokens):
    # The reader's token with the payload of another caller: the signature no longer verifies.
    header, _, signature = tokens["reader"].split(".")
    payload = tokens["stranger"].split(".")[1]
    client = await tunnel(gw)
    f = graph_request(client, bearer=f"{header}.{payload}.{signature}")
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 401)
    assert (r["stage"], r["check"]) == ("identity", "signature")


async def test_token_from_an_unpublished_key_is_refused(gw, authority):
    rogue = authority.mint_app_token(tenant_id=TENANT, app_id=READER_APP, object_id=READER_OID,
                                     key=SigningKey.generate())
    client = await tunnel(gw)
    f = graph_request(client, bearer=rogue)
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 401)
    assert r["stage"] == "identity" and r["check"] == "kid"


@pytest.mark.parametrize("host", ["evil.example", "graph.microsoft.com.evil.example", "login.microsoftonline.com"])
async def test_request_for_another_host_inside_a_tunnel_is_misdirected(gw, tokens, host):
    client = await tunnel(gw, token=tokens["reader"])
    f = graph_request(client, host=host, bearer=tokens["reader"])
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 421)
    assert (r["code"], r["stage"], r["check"]) == ("MisdirectedRequest", "identity", "tunnel")


async def test_host_header_naming_another_host_is_misdirected(gw, tokens):
    # Judged as Graph, routed by a virtual-hosting upstream to whatever Host names: domain fronting.
    client = await tunnel(gw, token=tokens["reader"])
    f = graph_request(client, bearer=tokens["reader"])
    f.request.headers["Host"] = "evil.example"
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 421)
    assert (r["stage"], r["check"]) == ("identity", "tunnel")


@pytest.mark.parametrize("target_authority", ["evil.example", "evil.example:443", "127.0.0.1", "[::1]", "graph%2emicrosoft.com"])
async def test_absolute_form_target_naming_another_host_is_misdirected(gw, tokens, target_authority):
    # Inside a tunnel mitmproxy sends an absolute-form target on as it came, and a server routes
    # by it rather than by Host (RFC 9112 3.2.2).
    client = await tunnel(gw, token=tokens["reader"])
    f = graph_request(client, bearer=tokens["reader"])
    f.request.authority = target_authority
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 421)
    assert (r["stage"], r["check"]) == ("identity", "tunnel")


@pytest.mark.parametrize("target_authority", ["graph.microsoft.com", "GRAPH.Microsoft.com.", "graph.microsoft.com:443"])
async def test_absolute_form_target_naming_the_tunnel_s_host_is_judged(gw, tokens, target_authority):
    client = await tunnel(gw, token=tokens["reader"])
    f = graph_request(client, bearer=tokens["reader"])
    f.request.authority = target_authority
    assert await exchange(gw.chain, f, graph_json(USERS)) is not None
    assert f.response.status_code == 200


async def test_https_request_without_an_admitted_tunnel_is_misdirected(gw, tokens):
    f = graph_request(tflow.tclient_conn(), bearer=tokens["reader"])
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    assert refusal(f, 421)["check"] == "tunnel"


async def test_proxy_and_bearer_tokens_of_different_identities_are_refused(gw, tokens):
    client = await tunnel(gw, token=tokens["reader"])
    f = graph_request(client, bearer=tokens["reader-2"])  # both allowed by the policy on their own
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 401)
    assert (r["code"], r["stage"], r["check"]) == ("InvalidAuthenticationToken", "identity", "mismatch")


async def test_bad_proxy_token_refuses_the_connect_407(gw, tokens):
    tampered = tokens["reader"][:-4] + ("AAAA" if not tokens["reader"].endswith("AAAA") else "BBBB")
    f = await connect(gw.chain, tflow.tclient_conn(), token=tampered)
    r = refusal(f, 407)
    assert (r["stage"], r["check"]) == ("identity", "signature")
    assert f.metadata.get(CONNECT_KEY) != "admitted"
    assert "Proxy-Authenticate" in f.response.headers


async def test_a_refused_connect_leaves_no_identity_on_its_connection(gw, tokens):
    """Identity verified the proxy token, then a later stage refused the CONNECT (here: the
    records are failing). Nothing of that CONNECT may vouch for a later request on the connection."""
    client = tflow.tclient_conn()
    gw.health.fail("recording", "injected: disk full")
    f = await connect(gw.chain, client, token=tokens["reader"])
    assert refusal(f, 503)["check"] == "health"
    gw.health.recover("recording")
    g = graph_request(client)  # no token of its own
    assert await exchange(gw.chain, g) is None
    r = refusal(g, 421)
    assert (r["stage"], r["check"]) == ("identity", "tunnel")


async def test_proxy_credentials_without_a_token_refuse_the_connect_407(gw):
    f = await connect(gw.chain, tflow.tclient_conn(), proxy_header="Digest username=mcp-directory")
    r = refusal(f, 407)
    assert (r["stage"], r["check"]) == ("identity", "format")
    assert f.metadata.get(CONNECT_KEY) != "admitted"


# --- 8. hosts outside the policy -----------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "graph.microsoft.com.evil.example", "graph.microsoft.us"])
async def test_connect_to_an_unknown_host_is_refused(gw, tokens, host):
    client = tflow.tclient_conn()
    f = await connect(gw.chain, client, host=host, token=tokens["reader"])
    r = refusal(f, 403)
    assert (r["code"], r["stage"], r["check"]) == ("Authorization_RequestDenied", "policy", "upstream")
    assert f.metadata.get(CONNECT_KEY) != "admitted"
    # Requests on that client connection are not inside an admitted tunnel either.
    g = graph_request(client, host=host, bearer=tokens["reader"])
    assert await exchange(gw.chain, g, graph_json(USERS)) is None
    assert refusal(g, 421)["check"] == "tunnel"


@pytest.mark.parametrize("host", ["::1", "2603:1037::1", "127.0.0.1"])
async def test_connect_to_an_address_is_refused_403_not_500(gw, tokens, host):
    # Hosts are matched by name; mitmproxy hands IPv6 literals over without their brackets.
    f = await connect(gw.chain, tflow.tclient_conn(), host=host, token=tokens["reader"])
    r = refusal(f, 403)
    assert (r["stage"], r["check"]) == ("policy", "upstream")


async def test_connect_to_a_port_other_than_443_is_refused(gw, tokens):
    f = await connect(gw.chain, tflow.tclient_conn(), port=8443, token=tokens["reader"])
    r = refusal(f, 403)
    assert (r["stage"], r["check"]) == ("policy", "upstream")
    assert f.metadata.get(CONNECT_KEY) != "admitted"


async def test_plain_http_request_to_an_unknown_host_is_refused(gw, tokens):
    f = graph_request(tflow.tclient_conn(), host="evil.example", scheme="http", bearer=tokens["reader"])
    assert await exchange(gw.chain, f, graph_json(USERS)) is None
    r = refusal(f, 403)
    assert (r["stage"], r["check"]) == ("policy", "upstream")
