"""Just-in-time approval without sockets: the domain (requests, grants, who may decide, the SQLite
store) and the two addons (holding a flow; the approval API) driven as mitmproxy drives them.
The end-to-end behaviour, with the real gateway and real clients, is in tests/e2e/test_approvals.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils

from nhi_gateway.addons.approval import Approval
from nhi_gateway.addons.approvals_api import ApprovalsAPI, api_mode, display_name, is_api_flow
from nhi_gateway.policy.decision import REFUSED_KEY, decision_of, set_decision
from nhi_gateway.addons.guard import Health
from nhi_gateway.addons.identity import PRINCIPAL_KEY
from nhi_gateway.approvals.store import (
    ApprovalError,
    Approvals,
    ApprovalSettings,
    ApprovalState,
    ApprovalStore,
    ApprovalStoreError,
    Approver,
    ApproverList,
    approval_rules,
    check_named,
    format_duration,
    notification_text,
    parse_duration,
    request_digest,
)
from nhi_gateway.recording.audit import AuditLog, AuditWriteError, verify_chain
from nhi_gateway.policy.decision import Action
from nhi_gateway.lookalike.minting import EntraAuthority
from nhi_gateway.policy.operation import Operation
from nhi_gateway.policy.loader import PolicyStore, parse_policy
from nhi_gateway.identity.principal import Principal, TokenSource
from nhi_gateway.identity.signing_keys import KeyStore
from nhi_gateway.identity.tokens import TokenVerifier

from ..support.approvals import BOT, BOT_APP, ME, OPERATION, SETTINGS, TARGET, TENANT, open_request
from ..support.entra import LOGIN, entra_fetcher
from ..support.policies import V1_ISSUER, V2_ISSUER, policy_head

ADELE = "0f573d36-fa84-5b0a-917c-50d218f4571b"
ALEX = "9d30a7d1-85d0-5d80-8734-f6a6cb79de21"
FINANCE = "fa763154-4fe2-5fa2-9700-3c383daf712a"
AZURE_CLI = "04b07795-8ddb-461a-bbee-02f9e1bf7b46"
GATEWAY_API = "7aebfec0-9a46-5038-80cb-18b0fabd868c"  # the gateway's own app registration

POLICY = policy_head(TENANT, issuers=(V1_ISSUER, V2_ISSUER)) + f"""\
approvals:
  client_id: {GATEWAY_API}
  app_id_uri: api://{GATEWAY_API}
  scope: Approvals.Decide
  require_auth_context: c1
rules:
  - id: secret-rotation
    action: approve
    when: {{app_ids: [{BOT_APP}]}}
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/applications/{{id}}/addPassword"]
    approval:
      approvers:
        users: [{ADELE}, {BOT}]
        groups: [{FINANCE}]
      timeout: 2m
      max_grant: 1h
  - id: directory-read
    action: allow
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users/**"]
"""


# --- durations, digests, texts -------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30), ("15m", 900), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), (" 90S ", 90), ("1h 5m", 3900),
])
def test_durations_read_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["", "5", "0s", "soon", "5x", "1h-5m", "m5", "1.5h", "-1h"])
def test_what_is_not_a_duration_says_how_to_write_one(text):
    with pytest.raises(ValueError, match="e.g. 30s, 15m, 1h"):
        parse_duration(text)


def test_the_digest_binds_method_url_and_body():
    base = request_digest("POST", "https://graph.microsoft.com/v1.0/x", b'{"a":1}')
    assert base == request_digest("post", "https://graph.microsoft.com/v1.0/x", b'{"a":1}')
    others = {
        request_digest("PUT", "https://graph.microsoft.com/v1.0/x", b'{"a":1}'),
        request_digest("POST", "https://graph.microsoft.com/v1.0/x?y", b'{"a":1}'),
        request_digest("POST", "https://graph.microsoft.com/v1.0/x", b'{"a":2}'),
        request_digest("POST", "https://graph.microsoft.com/v1.0/x", b""),
        # Moving bytes between the URL and the body must not give the same digest.
        request_digest("POST", "https://graph.microsoft.com/v1.0/x{", b'"a":1}'),
    }
    assert base not in others and len(others) == 5


# --- who may decide ------------------------------------------------------------------------------


def test_settings_come_from_the_approve_rules_of_the_policy():
    rules = approval_rules(parse_policy(POLICY))
    assert list(rules) == ["secret-rotation"]
    s = rules["secret-rotation"]
    assert (s.timeout, s.max_grant) == (120, 3600)
    assert s.approvers == ApproverList(frozenset({ADELE, BOT}), frozenset({FINANCE}))


@pytest.mark.parametrize("who, groups, named", [
    (ADELE, (), True),
    (ADELE.upper(), (), True),
    (ALEX, (), False),
    (ALEX, (FINANCE,), True),
    (ALEX, (FINANCE.upper(),), True),
    (ALEX, ("b3666a47-af00-5d14-9237-a347cab61910",), False),
])
def test_the_rule_names_who_may_decide(who, groups, named):
    settings = approval_rules(parse_policy(POLICY))["secret-rotation"]
    if named:
        check_named("secret-rotation", settings, Approver(TENANT, who, "x"), groups)
    else:
        with pytest.raises(ApprovalError) as e:
            check_named("secret-rotation", settings, Approver(TENANT, who, "x"), groups)
        assert e.value.status == 403 and "not an approver of rule 'secret-rotation'" in e.value.message


def test_a_rule_that_is_gone_names_nobody():
    with pytest.raises(ApprovalError) as e:
        check_named("old-rule", None, ME, ())
    assert e.value.status == 403 and "no longer an approve rule" in e.value.message


# --- requests and grants -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path):
    s = ApprovalStore(tmp_path / "approvals.sqlite3")
    yield s
    s.close()


async def test_an_approval_releases_the_held_request(store):
    approvals = Approvals(store)
    request = open_request(approvals)
    waiting = asyncio.ensure_future(approvals.outcome(request))
    await asyncio.sleep(0)
    assert not waiting.done()
    approved, grant = approvals.approve(request.id, ME, reason="  ticket\n42 ")
    final = await waiting
    assert final.state is ApprovalState.APPROVED and final.approver == ME and final.reason == "ticket 42"
    assert grant is None and final.grant_id is None
    assert final.outcome() == {"id": request.id, "state": "approved", "approver": ME.to_dict(), "reason": "ticket 42"}
    with pytest.raises(ApprovalError) as e:
        approvals.deny(request.id, ME)
    assert e.value.status == 409


async def test_a_denial_is_final(store):
    approvals = Approvals(store)
    request = open_request(approvals)
    waiting = asyncio.ensure_future(approvals.outcome(request))
    approvals.deny(request.id, ME, reason="no ticket")
    final = await waiting
    assert (final.state, final.reason) == (ApprovalState.DENIED, "no ticket")
    with pytest.raises(ApprovalError):
        approvals.approve(request.id, ME)


async def test_nobody_deciding_times_out(store):
    clock = Clock()
    approvals = Approvals(store, clock=clock)
    request = open_request(approvals)
    clock.now += 119.98  # 20 ms of the two minutes are left
    final = await approvals.outcome(request)
    assert final.state is ApprovalState.TIMED_OUT and final.reason == "approval timed out"
    with pytest.raises(ApprovalError) as e:
        approvals.approve(request.id, ME)
    assert e.value.status == 409


async def test_a_cancelled_request_cannot_be_approved(store):
    approvals = Approvals(store)
    request = open_request(approvals)
    waiting = asyncio.ensure_future(approvals.outcome(request))
    assert approvals.cancel(request.id, "the client disconnected").state is ApprovalState.CANCELLED
    assert (await waiting).state is ApprovalState.CANCELLED
    assert approvals.cancel(request.id, "again") is None
    with pytest.raises(ApprovalError):
        approvals.approve(request.id, ME)


async def test_no_identity_approves_its_own_request_even_when_named(store):
    approvals = Approvals(store)
    request = open_request(approvals)
    with pytest.raises(ApprovalError) as e:
        approvals.approve(request.id, Approver(TENANT.upper(), BOT.upper(), "rotation-bot"))
    assert e.value.status == 403 and "cannot approve its own request" in e.value.message
    # The same object id in another tenant is another identity.
    approvals.approve(request.id, Approver("3e9b0d47-1c2a-4f85-8b6e-d07a94c2e15b", BOT, "elsewhere"))


@pytest.mark.parametrize("seconds, max_grant, why", [
    (7200, 3600, "longer than rule 'secret-rotation' allows (max_grant 1h)"),
    (60, 0, "sets no max_grant"),
    (0, 3600, "must be positive"),
])
async def test_grants_are_bounded_by_the_rule(store, seconds, max_grant, why):
    approvals = Approvals(store)
    request = open_request(approvals, ApprovalSettings("secret-rotation", SETTINGS.approvers, 120, max_grant))
    with pytest.raises(ApprovalError) as e:
        approvals.approve(request.id, ME, grant_seconds=seconds)
    assert e.value.status == 400 and why in e.value.message
    assert store.get(request.id).state is ApprovalState.PENDING


async def test_a_grant_covers_the_principal_operation_and_rule_until_it_expires(store):
    clock = Clock()
    approvals = Approvals(store, clock=clock)
    request = open_request(approvals)
    _, grant = approvals.approve(request.id, ME, reason="window", grant_seconds=600)
    assert grant is not None and store.get(request.id).grant_id == grant.id
    key = (TENANT, BOT)
    assert approvals.grant_for(key, OPERATION, "secret-rotation") == grant
    assert approvals.grant_for((TENANT, ADELE), OPERATION, "secret-rotation") is None
    assert approvals.grant_for(key, OPERATION.replace("addpassword", "addkey"), "secret-rotation") is None
    assert approvals.grant_for(key, OPERATION, "another-rule") is None
    clock.now += 599
    assert approvals.grant_for(key, OPERATION, "secret-rotation") == grant
    clock.now += 1
    assert approvals.grant_for(key, OPERATION, "secret-rotation") is None
    assert store.grants(now=clock.now) == []
    assert [g.state(clock.now) for g in store.grants(now=clock.now, active_only=False)] == ["expired"]
    with pytest.raises(ApprovalError) as e:
        approvals.revoke(grant.id, ME)
    assert e.value.status == 409


async def test_a_grant_is_never_left_active_when_storing_the_decision_fails(store):
    """The grant and the approval are one write: when the approval cannot be stored (here the
    database refuses the update, as a full disk or an I/O error would), no grant stays behind."""
    approvals = Approvals(store)
    request = open_request(approvals)
    store._connect().execute("CREATE TRIGGER broken BEFORE UPDATE ON approvals "
                             "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
    with pytest.raises(ApprovalStoreError):
        approvals.approve(request.id, ME, reason="window", grant_seconds=600)
    assert approvals.grant_for((TENANT, BOT), OPERATION, "secret-rotation") is None
    assert store.grants(now=time.time(), active_only=False) == []
    store._connect().execute("DROP TRIGGER broken")
    assert store.get(request.id).state is ApprovalState.PENDING  # still there to be decided
    _, grant = approvals.approve(request.id, ME, grant_seconds=600)
    assert approvals.grant_for((TENANT, BOT), OPERATION, "secret-rotation") == grant


async def test_a_revoked_grant_covers_nothing(store):
    approvals = Approvals(store)
    request = open_request(approvals)
    _, grant = approvals.approve(request.id, ME, grant_seconds=600)
    revoked = approvals.revoke(grant.id, ME)
    assert revoked.revoked_by == ME and revoked.to_dict()["state"] == "revoked"
    assert approvals.grant_for((TENANT, BOT), OPERATION, "secret-rotation") is None
    with pytest.raises(ApprovalError) as e:
        approvals.revoke("grt-doesnotexist", ME)
    assert e.value.status == 404


async def test_grants_outlive_the_process_and_pending_requests_do_not(tmp_path):
    path = tmp_path / "approvals.sqlite3"
    first = Approvals(ApprovalStore(path))
    _, grant = first.approve(open_request(first).id, ME, grant_seconds=600)
    pending = open_request(first)
    first.store.close()  # a crash: nobody marked the pending request

    store = ApprovalStore(path)
    assert store.cancel_pending("the gateway restarted while the request was held", time.time()) == 1
    again = Approvals(store)
    assert again.grant_for((TENANT, BOT), OPERATION, "secret-rotation") == grant
    assert store.get(pending.id).state is ApprovalState.CANCELLED
    store.close()


def test_an_unusable_database_fails_when_used_not_when_opened(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    store = ApprovalStore(tmp_path / "file" / "approvals.sqlite3")
    with pytest.raises(OSError, match="approvals database"):
        store.requests()


def test_the_notification_says_what_is_asked_and_how_to_answer(store):
    async def run():
        return open_request(Approvals(store))

    request = asyncio.run(run())
    text = notification_text(request, "http://127.0.0.1:8081")
    assert f"rotation-bot ({BOT}) asks to {OPERATION} (rule secret-rotation)" in text
    assert f"nhi-gateway approvals approve {request.id} --api http://127.0.0.1:8081" in text
    assert f"nhi-gateway approvals deny {request.id}" in text and "at most 1h" in text


# --- the holding addon ---------------------------------------------------------------------------


def bot_principal() -> Principal:
    return Principal(tenant_id=TENANT, object_id=BOT, app_id=BOT_APP, display_name="rotation-bot",
                     token_sources=(TokenSource.BEARER,))


def held_flow(policies: PolicyStore, principal: Principal | None = None, body: bytes = b'{"p":1}') -> http.HTTPFlow:
    req = tutils.treq(method=b"POST", scheme=b"https", host="graph.microsoft.com", port=443, authority=b"",
                      path=TARGET.encode(), headers=http.Headers(host="graph.microsoft.com"), content=body)
    f = tflow.tflow(req=req)
    principal = principal or bot_principal()
    f.metadata[PRINCIPAL_KEY] = principal
    op = Operation.from_request("POST", "https", "graph.microsoft.com", 443, TARGET)
    decision = policies.current.decide(principal, op)
    assert decision.action is Action.APPROVE
    set_decision(f, decision)
    return f


class Webhook:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.fail = fail

    async def __call__(self, url: str, payload: dict):
        self.sent.append((url, payload))
        if self.fail:
            raise ConnectionRefusedError("nobody listens")
        return 200, None


@pytest.fixture
def holding(tmp_path):
    policies = PolicyStore(parse_policy(POLICY, str(tmp_path / "policy.yaml")))
    approvals = Approvals(ApprovalStore(tmp_path / "approvals.sqlite3"))
    log = AuditLog(tmp_path / "audit.jsonl")
    webhook = Webhook()
    addon = Approval(policies, approvals, Health(), log, webhook, api_url=lambda: "http://127.0.0.1:8081")
    with taddons.context(addon):
        yield SimpleNamespace(addon=addon, policies=policies, approvals=approvals, log=log, webhook=webhook,
                              path=tmp_path)
    approvals.close()
    log.close()


async def pending_of(approvals: Approvals, count: int = 1):
    for _ in range(200):
        found = approvals.store.requests()
        if len(found) >= count:
            return found
        await asyncio.sleep(0.005)
    raise AssertionError("nothing was held")


async def test_an_approved_flow_becomes_an_allow_naming_the_approver(holding):
    f = held_flow(holding.policies)
    hook = asyncio.ensure_future(holding.addon.request(f))
    [request] = await pending_of(holding.approvals)
    assert not hook.done() and f.response is None
    assert request.digest == request_digest("POST", f.request.url, b'{"p":1}')
    assert request.body_preview == '{"p":1}' and request.flow_id == f.id
    holding.approvals.approve(request.id, ME, reason="ok")
    await hook
    d = decision_of(f)
    assert d.allowed and f.response is None
    assert d.extra["approval"]["state"] == "approved" and d.extra["approver"] == ME.label
    assert "approved by Adele Vance" in d.reason
    lines = [json.loads(x) for x in (holding.path / "audit.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["approval_requested"]
    assert lines[0]["flow_id"] == f.id and lines[0]["approval"]["id"] == request.id
    assert verify_chain(holding.path / "audit.jsonl") == []


async def test_a_denied_flow_is_refused_with_the_approvers_reason(holding):
    f = held_flow(holding.policies)
    hook = asyncio.ensure_future(holding.addon.request(f))
    [request] = await pending_of(holding.approvals)
    holding.approvals.deny(request.id, ME, reason="no change ticket")
    await hook
    body = json.loads(f.response.content)["error"]
    assert f.response.status_code == 403 and f.metadata[REFUSED_KEY]
    assert body["message"].startswith("denied by Adele Vance") and "no change ticket" in body["message"]
    assert decision_of(f).extra["approval"]["state"] == "denied"
    assert decision_of(f).extra["approver"] == ME.label  # who decided, as the recording shows it


async def test_a_client_that_disconnects_cancels_its_held_request(holding):
    f = held_flow(holding.policies)
    hook = asyncio.ensure_future(holding.addon.request(f))
    [request] = await pending_of(holding.approvals)
    holding.addon.client_disconnected(f.client_conn)
    await hook
    assert holding.approvals.store.get(request.id).state is ApprovalState.CANCELLED
    assert f.response.status_code == 403 and "cancelled" in json.loads(f.response.content)["error"]["message"]
    assert decision_of(f).extra["approval"]["state"] == "cancelled"


async def test_held_flows_wait_side_by_side(holding):
    flows = [held_flow(holding.policies, body=b'{"n":%d}' % i) for i in range(20)]
    hooks = [asyncio.ensure_future(holding.addon.request(f)) for f in flows]
    requests = await pending_of(holding.approvals, 20)
    assert len({r.digest for r in requests}) == 20 and not any(h.done() for h in hooks)
    for r in requests[::2]:
        holding.approvals.approve(r.id, ME)
    for r in requests[1::2]:
        holding.approvals.deny(r.id, ME)
    await asyncio.gather(*hooks)
    allowed = {f.id for f in flows if decision_of(f).allowed}
    assert allowed == {r.flow_id for r in requests[::2]}


async def test_a_grant_lets_the_flow_through_without_asking(holding):
    first = held_flow(holding.policies)
    hook = asyncio.ensure_future(holding.addon.request(first))
    [request] = await pending_of(holding.approvals)
    _, grant = holding.approvals.approve(request.id, ME, grant_seconds=600)
    await hook
    second = held_flow(holding.policies, body=b'{"another": "body"}')
    await holding.addon.request(second)
    d = decision_of(second)
    assert d.allowed and d.extra["approval"]["grant_id"] == grant.id and grant.id in d.reason
    assert len(holding.approvals.store.requests(pending_only=False)) == 1  # nobody was asked again


async def test_the_webhook_gets_the_text_and_a_failing_one_changes_nothing(holding):
    holding.addon.policies = PolicyStore(parse_policy(
        POLICY.replace("approvals:", "approvals:\n  webhook: https://hooks.example.test/x", 1)))
    holding.webhook.fail = True
    f = held_flow(holding.policies)
    hook = asyncio.ensure_future(holding.addon.request(f))
    [request] = await pending_of(holding.approvals)
    for _ in range(100):
        if holding.webhook.sent:
            break
        await asyncio.sleep(0.005)
    [(url, payload)] = holding.webhook.sent
    assert url == "https://hooks.example.test/x"
    assert request.id in payload["text"] and "nhi-gateway approvals approve" in payload["text"]
    assert payload["nhi_gateway"]["approval"]["id"] == request.id
    assert "body_preview" not in payload["nhi_gateway"]["approval"]  # the body stays with the gateway
    holding.approvals.approve(request.id, ME)
    await hook
    assert decision_of(f).allowed


async def test_no_webhook_is_sent_when_the_policy_names_none(holding):
    f = held_flow(holding.policies)
    hook = asyncio.ensure_future(holding.addon.request(f))
    [request] = await pending_of(holding.approvals)
    holding.approvals.deny(request.id, ME)
    await hook
    assert holding.webhook.sent == []


async def test_an_anonymous_request_cannot_be_held(holding):
    f = held_flow(holding.policies)
    del f.metadata[PRINCIPAL_KEY]
    await holding.addon.request(f)
    assert f.response.status_code == 403 and "verified identity" in json.loads(f.response.content)["error"]["message"]
    assert holding.approvals.store.requests() == []


async def test_an_unwritable_audit_trail_refuses_before_anyone_is_asked(holding, monkeypatch):
    def disk_full(record):
        raise AuditWriteError("disk full")

    monkeypatch.setattr(holding.log, "append", disk_full)
    f = held_flow(holding.policies)
    await holding.addon.request(f)
    assert f.response.status_code == 503
    assert [r.state for r in holding.approvals.store.requests(pending_only=False)] == [ApprovalState.CANCELLED]
    assert "audit" in holding.addon.health.problems


async def test_an_unusable_database_refuses_503(holding, monkeypatch):
    holding.approvals.store.close()
    (holding.path / "a-file").write_text("where the database's directory should be")
    monkeypatch.setattr(holding.approvals.store, "path", holding.path / "a-file" / "approvals.sqlite3")
    f = held_flow(holding.policies)
    await holding.addon.request(f)
    assert f.response.status_code == 503
    assert "approval records" in json.loads(f.response.content)["error"]["message"]


async def test_other_decisions_pass_untouched(holding):
    f = tflow.tflow()
    set_decision(f, parse_policy(POLICY).decide(
        bot_principal(), Operation.from_request("GET", "https", "graph.microsoft.com", 443, "/v1.0/users")))
    before = dict(f.metadata)
    await holding.addon.request(f)
    assert f.metadata == before and f.response is None


# --- the approval API ----------------------------------------------------------------------------


def person(authority: EntraAuthority, oid: str, name: str, groups=None, **changes) -> str:
    """An approver's token as `nhi-gateway approvals login` gets it: v2, for the gateway's API,
    with its scope and the authentication context the policy asks for."""
    args = dict(tenant_id=TENANT, object_id=oid, client_id=GATEWAY_API, audience=GATEWAY_API,
                scopes=["Approvals.Decide"], name=name, upn=f"{name.split()[0]}@nhilab.onmicrosoft.com",
                acrs=["c1"], groups=groups)
    return authority.mint_user_token(**(args | changes))


def graph_token_of_a_person(authority: EntraAuthority, oid: str, name: str) -> str:
    """The same person's delegated Graph token, as `az account get-access-token` gets it."""
    return authority.mint_app_token(tenant_id=TENANT, app_id=AZURE_CLI, object_id=oid, display_name="Azure CLI",
                                    acr="0", extra_claims={"idtyp": "user", "scp": "User.Read", "name": name})


API_MODE = ProxyMode.parse(api_mode("127.0.0.1", 8081))


def api_flow(method: str, path: str, token: str | None = None, body: dict | None = None) -> http.HTTPFlow:
    headers = http.Headers(host="127.0.0.1:8081")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = tutils.treq(method=method.encode(), scheme=b"http", host="approvals.nhi-gateway.invalid", port=1,
                      authority=b"", path=path.encode(), headers=headers,
                      content=json.dumps(body).encode() if body is not None else b"")
    f = tflow.tflow(req=req)
    f.client_conn.proxy_mode = API_MODE
    return f


@pytest.fixture
def api(holding, authority):
    verifier = TokenVerifier(KeyStore(entra_fetcher(authority)))
    addon = ApprovalsAPI(holding.policies, holding.approvals, verifier, holding.addon.health, holding.log)
    return SimpleNamespace(addon=addon, holding=holding,
                           adele=person(authority, ADELE, "Adele Vance"),
                           alex=person(authority, ALEX, "Alex Wilber"),
                           megan=person(authority, ALEX, "Megan in Finance", groups=[FINANCE]))


def use_policy(api, text: str) -> None:
    """The API, serving under another policy."""
    a = api.addon
    api.addon = ApprovalsAPI(PolicyStore(parse_policy(text, "p.yaml")), a.approvals, a.verifier, a.health, a.audit_log)


async def call(api, method: str, path: str, token: str | None, body: dict | None = None) -> tuple[int, dict]:
    f = api_flow(method, path, token, body)
    await api.addon.request(f)
    assert f.response is not None, "the API must answer every request on its listener"
    return f.response.status_code, json.loads(f.response.content)


def test_only_the_api_listener_is_the_api():
    assert is_api_flow(api_flow("GET", "/approvals"))
    assert not is_api_flow(tflow.tflow())
    f = tflow.tflow()
    f.client_conn.proxy_mode = ProxyMode.parse("reverse:https://graph.microsoft.com@8082")
    assert not is_api_flow(f)


async def test_proxy_flows_are_never_answered_by_the_api(api):
    f = tflow.tflow()
    f.request.path = "/approvals"
    await api.addon.request(f)
    assert f.response is None


@pytest.mark.parametrize("token, status, check", [(None, 401, "approvals_api"), ("garbage", 401, "format")])
async def test_the_api_needs_a_verified_token(api, token, status, check):
    code, body = await call(api, "GET", "/approvals", token)
    assert code == status
    assert body["error"]["innerError"]["nhi-gateway"]["check"] == check


def refused_tokens(authority: EntraAuthority) -> list:
    """Valid Entra tokens (right tenant, issuer, signature, lifetime) that must not prove an
    approver, each with the check that refuses it."""
    adele = ADELE, "Adele Vance"
    return [
        pytest.param(graph_token_of_a_person(authority, *adele), "approver_audience", "not for this gateway's approval API",
                     id="graph-token"),
        pytest.param(person(authority, *adele, audience="api://another-api", scopes=["Approvals.Decide"]),
                     "approver_audience", "api://another-api", id="another-api"),
        pytest.param(authority.mint_app_token(tenant_id=TENANT, app_id=BOT_APP, object_id=ADELE, audience=GATEWAY_API,
                                              version="2.0", roles=("Approvals.Decide",)),
                     "approver_person", "app-only", id="app-only"),
        pytest.param(authority.mint_app_token(
            tenant_id=TENANT, app_id=BOT_APP, object_id=ADELE, audience=f"api://{GATEWAY_API}",
            extra_claims={"xms_mirid": "/subscriptions/x/resourcegroups/y/providers/Microsoft.ManagedIdentity/"
                                       "userAssignedIdentities/z", "scp": "Approvals.Decide", "idtyp": "user"}),
                     "approver_person", "managed identity", id="managed-identity"),
        pytest.param(person(authority, *adele, client_id=BOT_APP, client_acr="2"), "approver_client",
                     "on-behalf-of", id="on-behalf-of"),
        pytest.param(person(authority, *adele, scopes=["User.Read"]), "approver_scope", "Approvals.Decide",
                     id="without-scope"),
        pytest.param(person(authority, *adele, acrs=[]), "approver_auth_context", "authentication context c1",
                     id="without-auth-context"),
        pytest.param(person(authority, *adele, acrs=["c2"]), "approver_auth_context", "authentication context c1",
                     id="another-auth-context"),
    ]


@pytest.mark.parametrize("index", range(8))
async def test_tokens_that_are_not_an_approvers_are_refused_401_naming_the_check(api, authority, index):
    token, check, message = refused_tokens(authority)[index].values
    f = held_flow(api.holding.policies)
    hook = asyncio.ensure_future(api.holding.addon.request(f))
    [request] = await pending_of(api.holding.approvals)
    for method, path in (("GET", "/approvals"), ("POST", f"/approvals/{request.id}/approve")):
        code, body = await call(api, method, path, token)
        assert code == 401, body
        assert body["error"]["innerError"]["nhi-gateway"]["check"] == check
        assert message in body["error"]["message"]
    assert api.holding.approvals.store.get(request.id).state is ApprovalState.PENDING
    api.holding.approvals.deny(request.id, ME)
    await hook


async def test_a_missing_auth_context_gets_a_claims_challenge(api, authority):
    import base64

    f = api_flow("GET", "/approvals", person(authority, ADELE, "Adele Vance", acrs=[]))
    await api.addon.request(f)
    challenge = f.response.headers["WWW-Authenticate"]
    assert 'error="insufficient_claims"' in challenge
    claims = json.loads(base64.b64decode(challenge.split('claims="')[1].rstrip('"')))
    assert claims == {"access_token": {"acrs": {"essential": True, "value": "c1"}}}


async def test_v1_approver_tokens_carry_the_app_id_uri_and_mfa_is_read_from_amr(api, authority):
    use_policy(api, POLICY.replace("require_auth_context: c1", "require_mfa: true"))
    v1 = dict(version="1.0", audience=f"api://{GATEWAY_API}/", acrs=[])
    code, body = await call(api, "GET", "/approvals", person(authority, ADELE, "Adele Vance", amr=["pwd", "mfa"], **v1))
    assert code == 200, body
    code, body = await call(api, "GET", "/approvals", person(authority, ADELE, "Adele Vance", amr=["pwd"], **v1))
    assert code == 401 and body["error"]["innerError"]["nhi-gateway"]["check"] == "approver_mfa"
    code, body = await call(api, "GET", "/approvals", person(authority, ADELE, "Adele Vance"))  # v2: no amr
    assert code == 401 and body["error"]["innerError"]["nhi-gateway"]["check"] == "approver_mfa"


async def test_without_an_app_registration_in_the_policy_no_token_approves(api):
    section = "approvals:\n  client_id: " + GATEWAY_API + "\n  app_id_uri: api://" + GATEWAY_API + \
        "\n  scope: Approvals.Decide\n  require_auth_context: c1\n"
    assert section in POLICY
    use_policy(api, POLICY.replace(section, ""))
    code, body = await call(api, "GET", "/approvals", api.adele)
    assert code == 401 and body["error"]["innerError"]["nhi-gateway"]["check"] == "approver_audience"
    assert "approvals.client_id" in body["error"]["message"]


async def test_the_api_says_how_to_sign_in_without_a_token(api):
    code, body = await call(api, "GET", "/.well-known/oauth-protected-resource", None)
    assert code == 200
    assert body["resource"] == f"api://{GATEWAY_API}"
    assert body["scopes_supported"] == [f"api://{GATEWAY_API}/Approvals.Decide"]
    assert body["authorization_servers"] == [f"{LOGIN}/{TENANT}/v2.0"]
    assert body["nhi_gateway"]["require_auth_context"] == "c1"
    assert body["nhi_gateway"]["login_client_id"] == GATEWAY_API


async def test_approving_through_the_api_releases_the_flow(api):
    f = held_flow(api.holding.policies)
    hook = asyncio.ensure_future(api.holding.addon.request(f))
    [request] = await pending_of(api.holding.approvals)
    code, body = await call(api, "GET", "/approvals", api.adele)
    assert code == 200 and [a["id"] for a in body["approvals"]] == [request.id]
    code, body = await call(api, "POST", f"/approvals/{request.id}/approve", api.adele,
                            {"for": "10m", "reason": "change 7"})
    assert code == 200, body
    assert body["approval"]["state"] == "approved" and body["approval"]["approver"]["display_name"] == "Adele Vance"
    assert body["grant"]["state"] == "active"
    await hook
    assert decision_of(f).allowed
    code, body = await call(api, "GET", "/grants", api.adele)
    assert [g["approval_id"] for g in body["grants"]] == [request.id]
    events = [json.loads(x).get("event") for x in (api.holding.path / "audit.jsonl").read_text().splitlines()]
    assert events == ["approval_requested", "approval_approved"]


async def test_outsiders_are_refused_and_group_members_admitted(api):
    f = held_flow(api.holding.policies)
    hook = asyncio.ensure_future(api.holding.addon.request(f))
    [request] = await pending_of(api.holding.approvals)
    for method, path in (("GET", "/approvals"), ("GET", f"/approvals/{request.id}"),
                         ("POST", f"/approvals/{request.id}/approve"), ("POST", f"/approvals/{request.id}/deny"),
                         ("GET", "/grants")):
        code, body = await call(api, method, path, api.alex)
        assert code == 403, (path, body)
        assert "Alex Wilber" in body["error"]["message"]
    code, body = await call(api, "POST", f"/approvals/{request.id}/deny", api.megan, {"reason": "not today"})
    assert code == 200, body
    await hook
    assert f.response.status_code == 403 and "Megan in Finance" in json.loads(f.response.content)["error"]["message"]


@pytest.mark.parametrize("method, path, body, status, message", [
    ("GET", "/nothing", None, 404, "no such endpoint"),
    ("DELETE", "/approvals", None, 405, "use GET"),
    ("POST", "/approvals/apr-aaaaaaaaaaaa/approve", None, 404, "no approval request"),
    ("DELETE", "/grants/grt-aaaaaaaaaaaa", None, 404, "no grant"),
    ("POST", "/approvals/{id}/approve", {"for": "2h"}, 400, "max_grant 1h"),
    ("POST", "/approvals/{id}/approve", {"for": "later"}, 400, "not a duration"),
    ("POST", "/approvals/{id}/deny", {"for": "1h"}, 400, "approve only"),
    ("POST", "/approvals/{id}/approve", {"reasons": "typo"}, 400, "unknown member"),
    ("POST", "/approvals/{id}/approve", ["x"], 400, "JSON object"),
])
async def test_bad_api_calls_say_what_is_wrong(api, method, path, body, status, message):
    f = held_flow(api.holding.policies)
    hook = asyncio.ensure_future(api.holding.addon.request(f))
    [request] = await pending_of(api.holding.approvals)
    code, answer = await call(api, method, path.format(id=request.id), api.adele, body)
    assert code == status and message in answer["error"]["message"], answer
    assert api.holding.approvals.store.get(request.id).state is ApprovalState.PENDING
    api.holding.approvals.deny(request.id, ME)
    await hook


async def test_the_approver_is_named_by_their_name_not_the_apps(authority):
    token = person(authority, ADELE, "Adele Vance")
    p = Principal(tenant_id=TENANT, object_id=ADELE, app_id=AZURE_CLI, display_name="Azure CLI")
    assert display_name(token, p) == "Adele Vance"
    app = authority.mint_app_token(tenant_id=TENANT, app_id=BOT_APP, object_id=BOT, display_name="rotation-bot")
    assert display_name(app, p) == "Azure CLI"


# --- the demo's policy -----------------------------------------------------------------------------


def test_the_demo_adds_its_approval_rule_to_the_example_policy(tmp_path):
    from pathlib import Path

    import nhi_gateway
    from nhi_gateway.demo.approval import policy_with_approval
    from nhi_gateway.policy.loader import load_policy
    from nhi_gateway.identity.principal import AuthMethod

    example = Path(nhi_gateway.__file__).resolve().parents[2] / "policies" / "example.yaml"
    policy = load_policy(policy_with_approval(example, tmp_path / "policy.yaml"))
    add = Operation.from_request("POST", "https", "graph.microsoft.com", 443, TARGET)

    def caller(app: str, auth: AuthMethod) -> Principal:
        return Principal(tenant_id=TENANT, object_id=BOT, app_id=app, auth_method=auth)

    d = policy.decide(caller(BOT_APP, AuthMethod.CERTIFICATE), add)
    assert (d.action, d.rule_id) == (Action.APPROVE, "secret-rotation")
    assert approval_rules(policy)["secret-rotation"].approvers.users == frozenset({ADELE})
    d = policy.decide(caller(BOT_APP, AuthMethod.CLIENT_SECRET), add)
    assert (d.action, d.rule_id) == (Action.DENY, "no-credential-minting")
    d = policy.decide(caller("5e0b1683-de22-5eac-9334-fb85a741f6ff", AuthMethod.CERTIFICATE), add)
    assert d.action is Action.DENY and d.rule_id is None  # no rule allows it


async def test_a_policy_reload_that_lowers_max_grant_bounds_grants_of_requests_already_held(store):
    approvals = Approvals(store)
    request = open_request(approvals)  # held under max_grant 1h
    with pytest.raises(ApprovalError) as e:
        approvals.approve(request.id, ME, grant_seconds=1800, max_grant=600)  # the rule now says 10m
    assert e.value.status == 400 and "max_grant 10m" in e.value.message
    _, grant = approvals.approve(request.id, ME, grant_seconds=600, max_grant=600)
    assert grant is not None


# --- judged again at release (issue 18, item 2) ------------------------------------------------------

DENY_ADDED = """\
  - id: no-minting-now
    action: deny
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/applications/{id}/addPassword"]
"""


async def test_a_grant_never_covers_what_the_policy_in_force_denies(holding):
    """The flow was decided (approve) under one policy; by the time the grant would let it go, a
    reload has added a deny: the deny wins, naming its rule and the grant it overrules."""
    first = held_flow(holding.policies)
    hook = asyncio.ensure_future(holding.addon.request(first))
    [request] = await pending_of(holding.approvals)
    _, grant = holding.approvals.approve(request.id, ME, grant_seconds=600)
    await hook
    second = held_flow(holding.policies)
    holding.addon.policies = PolicyStore(parse_policy(POLICY + DENY_ADDED))
    await holding.addon.request(second)
    body = json.loads(second.response.content)["error"]
    assert second.response.status_code == 403
    assert body["innerError"]["nhi-gateway"]["rule"] == "no-minting-now"
    assert grant.id in body["message"] and "policy in force" in body["message"]


async def test_an_approval_answered_after_a_reload_is_refused_by_the_new_deny(holding):
    f = held_flow(holding.policies)
    hook = asyncio.ensure_future(holding.addon.request(f))
    [request] = await pending_of(holding.approvals)
    assert holding.addon.judged_now(request.id).action is Action.APPROVE
    holding.addon.policies = PolicyStore(parse_policy(POLICY + DENY_ADDED))
    assert holding.addon.judged_now(request.id).rule_id == "no-minting-now"  # what the API tells the approver
    holding.approvals.approve(request.id, ME, reason="ok")
    await hook
    d = decision_of(f)
    assert f.response.status_code == 403 and d.rule_id == "no-minting-now"
    assert d.extra["approval"]["state"] == "approved" and d.extra["approver"] == ME.label
    assert holding.addon.judged_now(request.id) is None  # no longer held
