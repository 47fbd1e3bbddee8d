"""Group membership resolved by the gateway with its own Graph credential: what is asked, of whom,
with which token, how long the answer is kept, and that every failure is a GroupLookupFailed.

A fake Graph stands in for the token endpoint and getMemberGroups and records every URL asked,
so a test can show that nothing else (an endpoint written in a token) is ever called.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import jwt
import pytest

from nhi_gateway.identity.groups import (
    CLIENT_ASSERTION_TYPE,
    ENV_CERTIFICATE,
    ENV_CLIENT_ID,
    ENV_CLIENT_SECRET,
    ENV_TENANT_ID,
    CertificateCredential,
    CredentialError,
    GraphCredential,
    GroupLookupFailed,
    GroupResolver,
    GroupRules,
    credential_from_settings,
)
from nhi_gateway.lookalike.pki import SigningKey
from nhi_gateway.policy.loader import parse_policy
from nhi_gateway.identity.principal import Principal, TokenSource
from nhi_gateway.identity.tokens import principal_from_claims

from ..support.groups import (
    GROUP_RULES_HEAD,
    CALLER_APP,
    GATEWAY_APP,
    GROUP_A,
    GROUP_B,
    SECRET,
    SP,
    TENANT,
    FakeGraph,
    app_principal,
    credential,
)
from ..support.policies import op

OTHER_TENANT = "0f0e0d0c-0000-4000-8000-00000000000f"
SP2 = "0b1c2d3e-0000-4000-8000-000000000043"
SP3 = "0b1c2d3e-0000-4000-8000-000000000044"
USER = "0b1c2d3e-0000-4000-8000-0000000000f1"
TOKEN_ENDPOINT = f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token"
ATTACKER = "https://attacker.example/v1.0/users/x/getMemberObjects"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver(graph: FakeGraph, clock: Clock | None = None, **kw) -> GroupResolver:
    return GroupResolver(credential(), graph, clock=clock or Clock(), **kw)


def claims(**extra) -> dict:
    base = {"aud": "https://graph.microsoft.com", "iss": f"https://sts.windows.net/{TENANT}/", "tid": TENANT,
            "oid": SP, "sub": SP, "appid": CALLER_APP, "appidacr": "2", "idtyp": "app", "ver": "1.0",
            "iat": 1, "nbf": 1, "exp": 2**31}
    base.update(extra)
    return base


# --- what is asked, of whom -------------------------------------------------------------------


async def test_resolves_transitive_security_groups_with_the_gateways_own_token():
    graph = FakeGraph()
    p = await resolver(graph).with_groups(app_principal(groups=()))
    assert p.groups == (GROUP_A, GROUP_B)  # lower-case, Graph's order
    token_call, graph_call = graph.calls
    assert token_call["url"] == TOKEN_ENDPOINT
    assert token_call["form"] == {"grant_type": "client_credentials", "client_id": GATEWAY_APP,
                                  "scope": "https://graph.microsoft.com/.default", "client_secret": SECRET}
    assert graph_call["url"] == f"https://graph.microsoft.com/v1.0/servicePrincipals/{SP}/getMemberGroups"
    assert graph_call["json"] == {"securityEnabledOnly": True}
    assert graph_call["headers"] == {"Authorization": "Bearer gateway-token-1"}


async def test_app_only_groups_come_from_graph_even_if_a_token_claims_some():
    graph = FakeGraph()
    p = await resolver(graph).with_groups(app_principal(groups=("cccccccc-0000-4000-8000-00000000000c",)))
    assert p.groups == (GROUP_A, GROUP_B)


async def test_delegated_token_keeps_its_groups_claim_and_asks_nothing():
    graph = FakeGraph()
    user = principal_from_claims(claims(idtyp="user", scp="User.Read", oid=USER, sub="s", groups=[GROUP_B.upper()]),
                                 TokenSource.BEARER, "iss")
    assert await resolver(graph).with_groups(user) == user
    assert user.groups == (GROUP_B,) and graph.calls == []


@pytest.mark.parametrize("extra, collection, oid", [
    # App-only token with overage: resolved like every service principal.
    ({}, "servicePrincipals", SP),
    # Delegated token with overage: the user's groups, from Graph, never from the token's pointer.
    ({"idtyp": "user", "scp": "User.Read", "oid": USER, "sub": "s"}, "users", USER),
])
async def test_overage_is_resolved_through_graph_never_through_the_endpoint_in_the_token(extra, collection, oid):
    overage = {
        "_claim_names": {"groups": "src1"},
        "_claim_sources": {"src1": {"endpoint": ATTACKER}},
    }
    graph = FakeGraph({oid: [GROUP_A]})
    p = principal_from_claims(claims(**overage, **extra), TokenSource.BEARER, "iss")
    resolved = await resolver(graph).with_groups(p)
    assert resolved.groups == (GROUP_A,)
    assert graph.urls() == [TOKEN_ENDPOINT, f"https://graph.microsoft.com/v1.0/{collection}/{oid}/getMemberGroups"]
    assert not any("attacker" in repr(c) for c in graph.calls)


async def test_a_principal_of_another_tenant_is_not_looked_up_with_this_tenants_credential():
    graph = FakeGraph()
    with pytest.raises(GroupLookupFailed, match="tenant"):
        await resolver(graph).with_groups(app_principal(tenant=OTHER_TENANT))
    assert graph.calls == []


# --- caching ---------------------------------------------------------------------------------


async def test_answer_is_reused_for_the_ttl_then_asked_again():
    graph, clock = FakeGraph(), Clock()
    r = resolver(graph, clock, ttl=300)
    await r.member_groups(TENANT, SP)
    clock.now += 299
    graph.groups[SP] = [GROUP_B]  # removed from A: not seen until the answer expires
    assert await r.member_groups(TENANT, SP) == (GROUP_A, GROUP_B)
    assert len(graph.urls("graph")) == 1
    clock.now += 2
    assert await r.member_groups(TENANT, SP) == (GROUP_B,)
    assert len(graph.urls("graph")) == 2
    assert len(graph.urls("token")) == 1  # the gateway's token is still good


async def test_cache_is_bounded_and_keeps_the_recently_used():
    graph = FakeGraph({SP: [GROUP_A], SP2: [GROUP_B], SP3: []})
    r = resolver(graph, cache_size=2)
    await r.member_groups(TENANT, SP)
    await r.member_groups(TENANT, SP2)
    await r.member_groups(TENANT, SP)  # SP is now the most recent
    await r.member_groups(TENANT, SP3)  # evicts SP2
    before = len(graph.urls("graph"))
    await r.member_groups(TENANT, SP)
    assert len(graph.urls("graph")) == before
    await r.member_groups(TENANT, SP2)
    assert len(graph.urls("graph")) == before + 1


async def test_the_gateways_token_is_kept_until_shortly_before_it_expires():
    graph, clock = FakeGraph(), Clock()
    r = resolver(graph, clock, ttl=0)  # every lookup goes to Graph
    await r.member_groups(TENANT, SP)
    clock.now += 3599 - 301  # expires_in 3599: renewed within the last five minutes
    await r.member_groups(TENANT, SP)
    assert [c["headers"].get("Authorization") for c in graph.calls if "getMemberGroups" in c["url"]] == [
        "Bearer gateway-token-1", "Bearer gateway-token-1"]
    clock.now += 2
    await r.member_groups(TENANT, SP)
    assert len(graph.urls("token")) == 2
    assert graph.calls[-1]["headers"]["Authorization"] == "Bearer gateway-token-2"


async def test_concurrent_lookups_share_one_graph_call_and_one_token_request():
    graph = FakeGraph({SP: [GROUP_A], SP2: [GROUP_B]})
    graph.gate = asyncio.Event()
    r = resolver(graph)
    waiting = [asyncio.ensure_future(r.member_groups(TENANT, oid)) for oid in [SP] * 20 + [SP2] * 5]
    await asyncio.sleep(0.01)
    graph.gate.set()
    results = await asyncio.gather(*waiting)
    assert results == [(GROUP_A,)] * 20 + [(GROUP_B,)] * 5
    assert len(graph.urls("token")) == 1
    assert sorted(graph.urls("graph")) == sorted(
        f"https://graph.microsoft.com/v1.0/servicePrincipals/{oid}/getMemberGroups" for oid in (SP, SP2))


async def test_a_caller_that_goes_away_does_not_cancel_the_others_lookup():
    graph = FakeGraph()
    graph.gate = asyncio.Event()
    r = resolver(graph)
    first = asyncio.ensure_future(r.member_groups(TENANT, SP))
    second = asyncio.ensure_future(r.member_groups(TENANT, SP))
    await asyncio.sleep(0.01)
    first.cancel()
    graph.gate.set()
    assert await second == (GROUP_A, GROUP_B)
    assert len(graph.urls("graph")) == 1


# --- failures --------------------------------------------------------------------------------


def _token_refused(g: FakeGraph) -> None:
    g.token_answer = (401, {"error": "invalid_client", "error_description":
                            "AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x", "error_codes": [7000215]})


@pytest.mark.parametrize("breakage, message", [
    (_token_refused, "AADSTS7000215"),
    (lambda g: setattr(g, "token_answer", (200, {"token_type": "Bearer"})), "token endpoint"),
    (lambda g: setattr(g, "raise_on", "token"), "cannot reach login.microsoftonline.com"),
    (lambda g: setattr(g, "raise_on", "graph"), "cannot reach graph.microsoft.com"),
    (lambda g: g.graph_answers.append((403, {"error": {"code": "Authorization_RequestDenied",
                                                        "message": "Insufficient privileges"}})),
     "403.*Authorization_RequestDenied"),
    (lambda g: g.graph_answers.append((503, None)), "503"),
    (lambda g: g.graph_answers.append((200, {"value": "not a list"})), "not a list of group ids"),
    (lambda g: g.graph_answers.append((200, {"value": ["../../users"]})), "not a list of group ids"),
    (lambda g: g.graph_answers.append((200, None)), "not a list of group ids"),
    (lambda g: g.groups.clear(), "404.*Request_ResourceNotFound"),
])
async def test_every_failure_is_a_group_lookup_failure_and_is_not_cached(breakage, message):
    graph = FakeGraph()
    breakage(graph)
    r = resolver(graph)
    with pytest.raises(GroupLookupFailed, match=message) as failure:
        await r.member_groups(TENANT, SP)
    assert SECRET not in str(failure.value)
    assert "gateway-token" not in str(failure.value)

    healed = FakeGraph()
    r.transport = healed
    assert await r.member_groups(TENANT, SP) == (GROUP_A, GROUP_B)


async def test_graph_401_renews_the_gateways_token_once():
    graph = FakeGraph()
    expired = (401, {"error": {"code": "InvalidAuthenticationToken", "message": "Lifetime validation failed"}})
    graph.graph_answers.append(expired)
    r = resolver(graph)
    assert await r.member_groups(TENANT, SP) == (GROUP_A, GROUP_B)
    assert [c["headers"].get("Authorization") for c in graph.calls if "getMemberGroups" in c["url"]] == [
        "Bearer gateway-token-1", "Bearer gateway-token-2"]

    graph.graph_answers += [expired, expired]
    with pytest.raises(GroupLookupFailed, match="401"):
        await r.member_groups(TENANT, SP2)


# --- the gateway's credential ------------------------------------------------------------------


def test_the_secret_never_shows_in_reprs():
    c = credential()
    assert SECRET not in repr(c)
    assert SECRET not in repr(GroupResolver(c, FakeGraph()))


@pytest.fixture
def certificate(tmp_path) -> tuple[SigningKey, Path, Path]:
    key = SigningKey.generate(common_name="nhi-gateway")
    key_path, cert_path = tmp_path / "gw.key.pem", tmp_path / "gw.pem"
    key.save(key_path, cert_path)
    return key, cert_path, key_path


async def test_certificate_credential_sends_a_client_assertion_and_no_secret(certificate):
    key, cert_path, key_path = certificate
    cred = GraphCredential(tenant_id=TENANT, client_id=GATEWAY_APP,
                           certificate=CertificateCredential.load(cert_path, key_path))
    graph = FakeGraph()
    await GroupResolver(cred, graph).member_groups(TENANT, SP)
    form = graph.calls[0]["form"]
    assert "client_secret" not in form
    assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    header = jwt.get_unverified_header(form["client_assertion"])
    assert header["x5t"] == key.x5t and header["x5t#S256"] == key.x5t_s256
    body = jwt.decode(form["client_assertion"], key.public_key, algorithms=["RS256"], audience=TOKEN_ENDPOINT)
    assert body["iss"] == body["sub"] == GATEWAY_APP
    assert 300 <= body["exp"] - body["iat"] <= 600


def test_certificate_with_the_key_in_the_same_file(certificate, tmp_path):
    key, cert_path, key_path = certificate
    both = tmp_path / "both.pem"
    both.write_bytes(cert_path.read_bytes() + key_path.read_bytes())
    assert CertificateCredential.load(both).x5t == key.x5t


def test_a_key_that_does_not_belong_to_the_certificate_is_refused(certificate, tmp_path):
    _, cert_path, _ = certificate
    other = SigningKey.generate(common_name="other")
    other.save(tmp_path / "other.key.pem", tmp_path / "other.pem")
    with pytest.raises(CredentialError, match="does not belong"):
        CertificateCredential.load(cert_path, tmp_path / "other.key.pem")


@pytest.mark.parametrize("cli, env, problem", [
    ({}, {}, None),
    ({}, {ENV_CLIENT_SECRET: SECRET}, ENV_CLIENT_ID),
    ({"client_id": GATEWAY_APP}, {ENV_CLIENT_SECRET: SECRET}, ENV_TENANT_ID),
    ({"client_id": GATEWAY_APP, "tenant_id": TENANT}, {}, ENV_CLIENT_SECRET),
    ({}, {ENV_CLIENT_ID: GATEWAY_APP, ENV_TENANT_ID: TENANT, ENV_CLIENT_SECRET: SECRET, ENV_CERTIFICATE: "x.pem"},
     "keep one"),
    ({"client_id": "not-a-guid", "tenant_id": TENANT}, {ENV_CLIENT_SECRET: SECRET}, "GUID"),
    ({"certificate": "/nonexistent/gw.pem", "client_id": GATEWAY_APP, "tenant_id": TENANT}, {}, "cannot read"),
])
def test_credential_settings_say_what_is_missing(cli, env, problem):
    if problem is None:
        assert credential_from_settings(environ=env, **cli) is None
        return
    with pytest.raises(CredentialError, match=problem) as e:
        credential_from_settings(environ=env, **cli)
    assert SECRET not in str(e.value)


def test_command_line_values_win_over_the_environment():
    env = {ENV_CLIENT_ID: "11111111-1111-4111-8111-111111111111", ENV_TENANT_ID: TENANT.upper(),
           ENV_CLIENT_SECRET: SECRET}
    c = credential_from_settings(client_id=GATEWAY_APP, environ=env)
    assert (c.client_id, c.tenant_id, c.client_secret, c.kind) == (GATEWAY_APP, TENANT, SECRET, "client secret")


# --- which requests depend on groups ---------------------------------------------------------

POLICY = GROUP_RULES_HEAD + f"""\
  - id: caller-in-b-no-apps
    action: deny
    when: {{app_ids: [{CALLER_APP}], groups: [{GROUP_B}]}}
    operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/applications/**"]}}]
  - id: users-by-app
    action: allow
    when: {{app_ids: [{CALLER_APP}]}}
    operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/users/**"]}}]
"""


@pytest.mark.parametrize("method, path, principal, expected", [
    ("GET", "/v1.0/groups", app_principal(), True),
    ("GET", "/v1.0/applications/x", app_principal(), True),  # a deny rule on groups could apply
    ("GET", "/v1.0/applications/x", Principal(TENANT, SP, "11111111-2222-4333-8444-555555555555"), False),
    ("GET", "/v1.0/users", app_principal(), False),  # no group rule names this operation
    ("POST", "/v1.0/groups", app_principal(), False),
    ("POST", "/v1.0/$batch", app_principal(), True),  # inner requests may meet a group rule
    ("GET", "/v1.0/groups", None, False),
])
def test_only_requests_a_group_rule_could_decide_depend_on_groups(method, path, principal, expected):
    rules = GroupRules(parse_policy(POLICY))
    assert bool(rules)
    assert rules.could_apply(principal, op(method, path)) is expected


def test_a_policy_without_group_rules_never_depends_on_groups():
    head, _, _ = POLICY.partition("rules:\n")
    rules = GroupRules(parse_policy(head + "rules: []\n"))
    assert not rules
    assert rules.could_apply(app_principal(), op("GET", "/v1.0/groups")) is False
