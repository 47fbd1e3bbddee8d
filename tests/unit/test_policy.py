"""Policy files: precise errors, and the decisions the gateway takes from them."""

from __future__ import annotations

import contextlib
import random
import re
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nhi_gateway.policy.decision import Action, Stage
from nhi_gateway.policy.operation import Operation
from nhi_gateway.policy.loader import PolicyError, PolicyStore, load_policy, parse_policy
from nhi_gateway.policy.model import (
    ClientSecretGrants,
    OperationMatch,
    PathPattern,
    Policy,
    PrincipalMatch,
    Rule,
    TokenRequirement,
)
from nhi_gateway.identity.principal import AuthMethod, Principal, TokenSource

from ..support.documents import text_mutations
from ..support.policies import op

POLICIES = Path(__file__).resolve().parents[2] / "policies"
TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
OTHER_TENANT = "0f0e0d0c-0000-4000-8000-00000000000f"
MCP_DIRECTORY = "5e0b1683-de22-5eac-9334-fb85a741f6ff"
APP_B = "11111111-2222-4333-8444-555555555555"
GROUP_A = "aaaaaaaa-0000-4000-8000-00000000000a"
GROUP_B = "bbbbbbbb-0000-4000-8000-00000000000b"
GRAPH = "graph.microsoft.com"
LOGIN = "login.microsoftonline.com"
MI = "/subscriptions/0b7c1e2a-0000-4000-8000-000000000001/resourceGroups/agents/providers/Microsoft.ManagedIdentity/userAssignedIdentities/mcp-mi"
MI_HOST = "/subscriptions/0b7c1e2a-0000-4000-8000-000000000001/resourcegroups/agents/providers/Microsoft.Web/sites/mcp"

# 13 lines; rules added by policy_text() start on line 14.
HEAD = f"""\
version: 1
identity:
  tenants: [{TENANT}, {OTHER_TENANT}]
  bearer:
    audiences: [https://graph.microsoft.com]
    issuers: ["https://login.microsoftonline.com/{{tenantid}}/v2.0"]
upstreams:
  - host: graph.microsoft.com
  - host: login.microsoftonline.com
    token: none
masking:
  profiles:
    pii: {{fields: [mail]}}
"""


def policy_text(rules: str) -> str:
    return HEAD + "rules:\n" + textwrap.dedent(rules).lstrip("\n")


def policy(rules: str) -> Policy:
    return parse_policy(policy_text(rules), "test.yaml")


def principal(app=MCP_DIRECTORY, oid="0b1c2d3e-0000-4000-8000-000000000042", tid=TENANT, groups=(), roles=(),
              **more):
    return Principal(
        tenant_id=tid, object_id=oid, app_id=app, display_name="mcp-directory", groups=groups, roles=roles,
        **more,
    )


CERT = AuthMethod.CERTIFICATE
SECRET = AuthMethod.CLIENT_SECRET
PROXY, BEARER = TokenSource.PROXY, TokenSource.BEARER


@pytest.fixture(scope="module")
def example() -> Policy:
    return load_policy(POLICIES / "example.yaml")


# --- the shipped policies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        f"/v1.0/applications/{MCP_DIRECTORY}/addPassword",
        f"/v1.0/applications(appId='{MCP_DIRECTORY}')/addPassword",
        f"/V1.0/Applications/{MCP_DIRECTORY.upper()}/ADDPASSWORD",
        f"/beta/applications/{MCP_DIRECTORY}/addPassword/",
        f"//v1.0/applications//{MCP_DIRECTORY}/addPassword",
        f"/v1.0/users/../applications/{MCP_DIRECTORY}/addPassword",
        f"/v1.0/applications/{MCP_DIRECTORY}/%61ddPassword",
        f"/v1.0/servicePrincipals(appId='{MCP_DIRECTORY}')/addKey",
    ],
)
@pytest.mark.parametrize("caller", [principal(), principal(app=APP_B)])
def test_every_spelling_of_add_password_is_denied_for_everyone(example, target, caller):
    d = example.decide(caller, op("POST", target))
    assert (d.action, d.rule_id, d.status, d.code) == (
        Action.DENY,
        "no-credential-minting",
        403,
        "Authorization_RequestDenied",
    )
    assert d.reason == "denied by rule 'no-credential-minting'"


@pytest.mark.parametrize(
    "target",
    [
        "/v1.0/users",
        "/v1.0/users/adele@contoso.com",
        "/v1.0/users('adele@contoso.com')",
        "/v1.0/Users/Adele%40contoso.com",
        "/beta/users/x/memberOf/microsoft.graph.group",
        "/v1.0/users/$count",
        "/v1.0/groups",
        "/v1.0/groups/g1/members",
        f"/v1.0/applications(appId='{MCP_DIRECTORY}')",
        "/v1.0/users?$select=displayName,mail&$top=5",
    ],
)
def test_mcp_directory_reads_the_directory_masked(example, target):
    d = example.decide(principal(), op("GET", target))
    assert (d.action, d.stage, d.rule_id, d.mask_profile, d.status) == (
        Action.ALLOW,
        Stage.POLICY,
        "directory-read",
        "directory-pii",
        0,
    )
    assert d.principal == principal().to_dict()
    assert d.operation == str(op("GET", target))


@pytest.mark.parametrize(
    ("method", "target", "caller"),
    [
        ("GET", "/v1.0/users", principal(app=APP_B)),  # another app
        ("GET", "/v1.0/users", None),  # no token
        ("DELETE", "/v1.0/users/x", principal()),  # not a read
        ("PATCH", "/v1.0/users/x", principal()),
        ("GET", "/v1.0/servicePrincipals", principal()),  # not in the rule
        ("GET", "/v1.0/me", principal()),
        ("GET", "/users", principal()),  # unversioned
    ],
)
def test_example_refuses_everything_else(example, method, target, caller):
    d = example.decide(caller, op(method, target))
    assert (d.action, d.rule_id, d.status, d.code) == (Action.DENY, None, 403, "Authorization_RequestDenied")
    assert d.reason == f"no rule allows {op(method, target)}"


def test_example_token_endpoint_is_anonymous_only(example):
    token = op("POST", f"/{TENANT}/oauth2/v2.0/token", host=LOGIN)
    assert example.decide(None, token).rule_id == "token-endpoint"
    assert example.decide(None, token).principal is None
    assert not example.decide(principal(), token).allowed


def test_directory_reader_starter_keeps_each_token_to_its_source():
    """The usual pair: the proxy credentials carry a token for the gateway's own API (v2), the
    bearer the Graph token (v1); neither list names the other's audience, and both are required."""
    ident = load_policy(POLICIES / "directory-reader.yaml").identity
    assert {"https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000"} <= ident.bearer.audiences
    assert [i.template for i in ident.bearer.issuers] == ["https://sts.windows.net/{tenantid}/"]
    assert not ident.proxy.graph_token and "api://nhi-gateway" in ident.proxy.audiences
    assert not ident.proxy.audiences & ident.bearer.audiences
    assert [i.template for i in ident.proxy.issuers] == ["https://login.microsoftonline.com/{tenantid}/v2.0"]
    assert load_policy(POLICIES / "directory-reader.yaml").upstream(GRAPH).token is TokenRequirement.BOTH


def test_a_policy_in_the_old_form_says_how_to_write_the_new_one():
    old = HEAD.replace("  bearer:\n    audiences:", "  audiences:").replace("    issuers:", "  issuers:", 1)
    with pytest.raises(PolicyError) as e:
        parse_policy(old + "rules: []\n", "old.yaml")
    assert (e.value.line, e.value.column) == (4, 3)
    assert "per token source" in e.value.message
    for needed in ("bearer:", "proxy:", "audiences:", "issuers:", "graph_token: true", "policies/example.yaml"):
        assert needed in e.value.hint


def test_example_identity_and_upstreams(example):
    ident = example.identity
    assert ident.tenants == frozenset({TENANT})
    assert "https://graph.microsoft.com" in ident.bearer.audiences
    # The demo's MCP server puts its Graph token in the proxy credentials too, and says so.
    assert ident.proxy.graph_token and "https://graph.microsoft.com" in ident.proxy.audiences
    assert not ident.bearer.graph_token
    assert ident.trust_for(TokenSource.PROXY) is ident.proxy and ident.trust_for(TokenSource.BEARER) is ident.bearer
    assert ident.leeway_seconds == 60
    assert ident.client_secret_grants is ClientSecretGrants.FLAG
    by_template = {i.template: i for i in ident.bearer.issuers}
    v1 = by_template["https://sts.windows.net/{tenantid}/"]
    assert (
        v1.discovery(TENANT) == f"https://login.microsoftonline.com/{TENANT}/.well-known/openid-configuration"
    )
    assert v1.issuer(TENANT) == f"https://sts.windows.net/{TENANT}/"
    v2 = by_template["https://login.microsoftonline.com/{tenantid}/v2.0"]
    assert (
        v2.discovery(TENANT)
        == f"https://login.microsoftonline.com/{TENANT}/v2.0/.well-known/openid-configuration"
    )
    assert example.upstream("Graph.Microsoft.com.").token is TokenRequirement.ANY
    assert example.upstream(LOGIN).token is TokenRequirement.NONE
    assert example.upstream("evil.example") is None
    assert example.upstream("not a host") is None
    assert "secretText" in example.mask_profiles["directory-pii"].fields
    assert example.source.endswith("example.yaml")


def test_deny_all_denies(example):
    deny_all = load_policy(POLICIES / "deny-all.yaml")
    assert deny_all.rules == ()
    for caller in (None, principal()):
        assert not deny_all.decide(caller, op("GET", "/v1.0/users")).allowed
    assert deny_all.upstream(GRAPH) is not None


STARTERS = ["example.yaml", "deny-all.yaml", "directory-reader.yaml", "credential-rotation.yaml"]


@pytest.mark.parametrize("name", STARTERS)
def test_starter_policies_load_warn_nothing_and_name_the_schema(name):
    from nhi_gateway.policy.lint import policy_warnings

    text = (POLICIES / name).read_text()
    assert text.startswith("# yaml-language-server: $schema=./policy.schema.json\n")
    assert policy_warnings(load_policy(POLICIES / name)) == []


@pytest.mark.parametrize(
    ("target", "rule", "allowed"),
    [
        ("/v1.0/applications?$select=id,displayName", "directory-read", True),
        ("/v1.0/applications?$select=keyCredentials", "no-key-material", False),
        ("/v1.0/applications?select=KEYCREDENTIALS", "no-key-material", False),
        ("/v1.0/groups?$expand=owners($select=keyCredentials)", "no-key-material", False),
        ("/v1.0/users?$select=*", "no-key-material", False),
        ("/v1.0/users?$top=999", "directory-read", True),
        ("/v1.0/users?$top=1000", "directory-read", False),  # refused, naming the rule and limit
    ],
)
def test_example_odata_limits(example, target, rule, allowed):
    d = example.decide(principal(), op("GET", target))
    assert (d.allowed, d.rule_id) == (allowed, rule), d.reason
    if not allowed:
        assert "odata." in d.reason


def test_the_example_schedule_rule_works_once_uncommented():
    text = (POLICIES / "example.yaml").read_text()
    head, marker, commented = text.partition("  # - id: directory-read-office-hours")
    assert marker
    rule = re.sub(r"(?m)^  # ?", "  ", marker + commented.partition("\n\n")[0] + "\n")
    p = parse_policy(head + rule, "example.yaml")
    devices = op("GET", "/v1.0/devices")
    assert p.decide(principal(), devices, datetime(2025, 7, 7, 8, tzinfo=UTC)).rule_id == "directory-read-office-hours"
    assert not p.decide(principal(), devices, datetime(2025, 7, 7, 17, tzinfo=UTC)).allowed  # 19:00 CEST
    assert not p.decide(principal(), devices, datetime(2025, 7, 5, 8, tzinfo=UTC)).allowed  # Saturday
    assert not p.decide(principal(), devices, datetime(2027, 1, 4, 8, tzinfo=UTC)).allowed  # expired


def test_the_example_approve_rule_works_once_uncommented():
    text = (POLICIES / "example.yaml").read_text()
    head, marker, commented = text.partition("  # - id: rotate-with-approval")
    assert marker
    rule = re.sub(r"(?m)^  # ?", "  ", marker + commented.partition("\n\n")[0] + "\n")
    p = parse_policy(head + rule, "example.yaml")
    add = op("POST", "/v1.0/applications/x/addPassword")
    assert p.decide(principal(auth_method=CERT), add).rule_id == "no-credential-minting"  # deny wins
    without_deny = parse_policy((head + rule).replace(
        '          - "/applications/{id}/addPassword"\n', "", 1), "example.yaml")
    d = without_deny.decide(principal(auth_method=CERT), add)
    assert (d.action, d.rule_id) == (Action.APPROVE, "rotate-with-approval")
    approval = without_deny.rule("rotate-with-approval").approval
    assert (approval.timeout_seconds, approval.max_grant_seconds) == (600, 3600)
    assert approval.users and approval.groups
    assert not without_deny.decide(principal(auth_method=SECRET), add).needs_approval


READER = "5e0b1683-de22-5eac-9334-fb85a741f6ff"
ROTATOR = "7d2c4b1e-5f3a-4c6d-8e9f-0a1b2c3d4e5f"


@pytest.mark.parametrize(
    ("method", "target", "caller", "expected"),
    [
        ("GET", "/v1.0/users?$top=10", principal(auth_method=CERT), ("allow", "directory-read")),
        ("GET", "/v1.0/servicePrincipals/x", principal(auth_method=CERT), ("allow", "directory-read")),
        ("GET", "/v1.0/users", principal(auth_method=SECRET), ("deny", None)),  # certificate only
        ("GET", "/beta/users", principal(auth_method=CERT), ("deny", None)),  # v1.0 only
        ("GET", "/v1.0/users?$top=5000", principal(auth_method=CERT), ("deny", "directory-read")),
        ("GET", "/v1.0/groups/g?$expand=members", principal(auth_method=CERT), ("deny", "directory-read")),
        ("GET", "/v1.0/applications?$select=passwordCredentials", principal(auth_method=CERT),
         ("deny", "no-credential-material")),
        ("PATCH", "/v1.0/users/x", principal(auth_method=CERT), ("deny", "no-writes")),
        ("POST", "/v1.0/applications/x/addPassword", principal(auth_method=CERT), ("deny", "no-writes")),
        ("GET", "/v1.0/users", principal(app=APP_B, auth_method=CERT), ("deny", None)),
    ],
)
def test_directory_reader_starter(method, target, caller, expected):
    p = load_policy(POLICIES / "directory-reader.yaml")
    d = p.decide(caller, op(method, target))
    assert (str(d.action), d.rule_id) == expected, d.reason
    if d.allowed:
        assert d.mask_profile == "directory-pii"
    assert p.identity.client_secret_grants is ClientSecretGrants.REFUSE


MONDAY_0900_BERLIN = datetime(2025, 7, 7, 7, tzinfo=UTC)
SATURDAY_0900_BERLIN = datetime(2025, 7, 5, 7, tzinfo=UTC)


@pytest.mark.parametrize(
    ("method", "target", "caller", "at", "expected"),
    [
        ("POST", "/v1.0/applications/x/addPassword", "rotator", MONDAY_0900_BERLIN, ("approve", "rotate-client-secrets")),
        ("POST", "/v1.0/applications(appId='abc')/removePassword", "rotator", MONDAY_0900_BERLIN,
         ("approve", "rotate-client-secrets")),
        ("POST", "/v1.0/applications/x/addPassword", "rotator", SATURDAY_0900_BERLIN, ("deny", None)),  # out of hours
        ("POST", "/beta/applications/x/addPassword", "rotator", MONDAY_0900_BERLIN, ("deny", None)),
        ("POST", "/v1.0/applications/x/addPassword", "rotator-with-secret", MONDAY_0900_BERLIN,
         ("deny", "no-rotation-by-secret-holders")),
        ("POST", "/v1.0/applications/x/addPassword", "rotator-without-role", MONDAY_0900_BERLIN, ("deny", None)),
        ("POST", "/v1.0/applications/x/addKey", "rotator", MONDAY_0900_BERLIN, ("deny", "no-keys-or-federation")),
        ("POST", "/v1.0/servicePrincipals/x/addPassword", "rotator", MONDAY_0900_BERLIN, ("deny", "no-keys-or-federation")),
        ("GET", "/v1.0/applications/x", "rotator", SATURDAY_0900_BERLIN, ("allow", "read-owned-apps")),
        ("GET", "/v1.0/applications/x?$select=keyCredentials", "rotator", MONDAY_0900_BERLIN, ("deny", "read-owned-apps")),
        ("POST", "/v1.0/applications/x/addPassword", "someone-else", MONDAY_0900_BERLIN, ("deny", None)),
    ],
)
def test_credential_rotation_starter(method, target, caller, at, expected):
    callers = {
        "rotator": principal(app=ROTATOR, roles=("Application.ReadWrite.OwnedBy",), auth_method=CERT),
        "rotator-with-secret": principal(app=ROTATOR, roles=("Application.ReadWrite.OwnedBy",), auth_method=SECRET),
        "rotator-without-role": principal(app=ROTATOR, roles=("Application.ReadWrite.All",), auth_method=CERT),
        "someone-else": principal(app=APP_B, roles=("Application.ReadWrite.OwnedBy",), auth_method=CERT),
    }
    p = load_policy(POLICIES / "credential-rotation.yaml")
    d = p.decide(callers[caller], op(method, target), at)
    assert (str(d.action), d.rule_id) == expected, d.reason
    if d.needs_approval:
        assert d.extra["approval"]["groups"] == ["3c9d1f7a-2b4e-4f6a-8c0d-1e2f3a4b5c6d"]
        assert d.mask_profile is None  # the job must receive the new secret


# --- decisions -----------------------------------------------------------------------------------


def test_a_deny_anywhere_beats_an_earlier_allow():
    p = policy(
        """
        - id: read-all
          action: allow
          operations: [{host: graph.microsoft.com, methods: ["*"], paths: ["/**"]}]
        - id: no-delete
          action: deny
          operations: [{host: graph.microsoft.com, methods: [DELETE], paths: ["/users/{id}"]}]
        - id: no-delete-2
          action: deny
          operations: [{host: graph.microsoft.com, methods: [DELETE], paths: ["/users/*"]}]
        """
    )
    assert p.decide(principal(), op("DELETE", "/v1.0/users/x")).rule_id == "no-delete"
    assert p.decide(principal(), op("GET", "/v1.0/users/x")).rule_id == "read-all"


def test_the_first_matching_allow_decides():
    p = policy(
        """
        - id: narrow
          action: allow
          when: {app_ids: [%s]}
          operations: [{host: graph.microsoft.com, methods: [GET], paths: ["/users"]}]
          mask: pii
        - id: broad
          action: allow
          operations: [{host: graph.microsoft.com, methods: [GET], paths: ["/**"]}]
        """
        % MCP_DIRECTORY
    )
    d = p.decide(principal(), op("GET", "/v1.0/users"))
    assert (d.rule_id, d.mask_profile) == ("narrow", "pii")
    d = p.decide(principal(app=APP_B), op("GET", "/v1.0/users"))
    assert (d.rule_id, d.mask_profile) == ("broad", None)


def test_default_profile_applies_to_rules_without_mask():
    text = policy_text(
        """
        - id: r
          action: allow
          operations: [{host: graph.microsoft.com, methods: [GET], paths: ["/users"]}]
        """
    ).replace("masking:\n", "masking:\n  default_profile: pii\n")
    assert parse_policy(text, "t.yaml").decide(principal(), op("GET", "/v1.0/users")).mask_profile == "pii"


@pytest.mark.parametrize(
    ("when", "caller", "matches"),
    [
        ("{anonymous: true}", None, True),
        ("{anonymous: true}", principal(), False),
        ("{}", None, False),
        ("{}", principal(), True),
        (None, principal(), True),
        (None, None, False),
        ("{anonymous: false}", principal(), True),
        ("{anonymous: false}", None, False),
        (f"{{app_ids: [{MCP_DIRECTORY.upper()}]}}", principal(), True),
        (f"{{app_ids: [{APP_B}, {MCP_DIRECTORY}]}}", principal(), True),
        (f"{{app_ids: [{APP_B}]}}", principal(), False),
        (f"{{app_ids: [{MCP_DIRECTORY}]}}", principal(app=MCP_DIRECTORY.upper()), True),
        ("{object_ids: [0B1C2D3E-0000-4000-8000-000000000042]}", principal(), True),
        ("{object_ids: [0b1c2d3e-0000-4000-8000-000000000043]}", principal(), False),
        (f"{{groups: [{GROUP_A}]}}", principal(groups=(GROUP_B, GROUP_A.upper())), True),
        (f"{{groups: [{GROUP_A}]}}", principal(groups=(GROUP_B,)), False),
        (f"{{groups: [{GROUP_A}]}}", principal(), False),
        ("{roles: [User.Read.All]}", principal(roles=("user.read.all",)), True),
        ("{roles: [User.Read.All, Group.Read.All]}", principal(roles=("Group.Read.All",)), True),
        ("{roles: [User.Read.All]}", principal(roles=("User.ReadWrite.All",)), False),
        (f"{{tenants: [{TENANT}]}}", principal(), True),
        (f"{{tenants: [{TENANT}]}}", principal(tid=OTHER_TENANT), False),
        # keys are ANDed
        (f"{{app_ids: [{MCP_DIRECTORY}], groups: [{GROUP_A}]}}", principal(groups=(GROUP_A,)), True),
        (f"{{app_ids: [{MCP_DIRECTORY}], groups: [{GROUP_A}]}}", principal(), False),
        (f"{{app_ids: [{APP_B}], groups: [{GROUP_A}]}}", principal(groups=(GROUP_A,)), False),
        (
            f"{{roles: [User.Read.All], tenants: [{OTHER_TENANT}]}}",
            principal(roles=("User.Read.All",)),
            False,
        ),
        # how the identity authenticated (appidacr/azpacr)
        ("{auth_methods: [certificate]}", principal(auth_method=CERT), True),
        ("{auth_methods: [certificate]}", principal(auth_method=SECRET), False),
        ("{auth_methods: [certificate]}", principal(), False),  # unknown
        ("{auth_methods: [certificate]}", None, False),
        ("{auth_methods: [client_secret, public_client]}", principal(auth_method=SECRET), True),
        ("{auth_methods: [client_secret, public_client]}", principal(auth_method=AuthMethod.PUBLIC_CLIENT), True),
        ("{auth_methods: [unknown]}", principal(), True),
        ("{auth_methods: [' certificate ']}", principal(auth_method=CERT), True),
        # app-only or delegated
        ("{app_only: true}", principal(), True),
        ("{app_only: true}", principal(app_only=False), False),
        ("{app_only: false}", principal(app_only=False), True),
        ("{app_only: false}", principal(), False),
        ("{app_only: false}", None, False),
        # where the token was presented: any listed source
        ("{token_sources: [proxy]}", principal(token_sources=(PROXY,)), True),
        ("{token_sources: [proxy]}", principal(token_sources=(BEARER,)), False),
        ("{token_sources: [proxy]}", principal(token_sources=(BEARER, PROXY)), True),
        ("{token_sources: [proxy, bearer]}", principal(token_sources=(BEARER,)), True),
        ("{token_sources: [bearer]}", principal(), False),  # no source recorded
        # managed identities: the xms_mirid ARM id, case-insensitively
        (f"{{managed_identities: [{MI}]}}", principal(managed_identity=MI), True),
        (f"{{managed_identities: [{MI.upper()}]}}", principal(managed_identity=MI.lower()), True),
        (f"{{managed_identities: [{MI}]}}", principal(managed_identity=MI_HOST), False),
        (f"{{managed_identities: [{MI}, {MI_HOST}]}}", principal(managed_identity=MI_HOST.upper()), True),
        (f"{{managed_identities: [{MI}]}}", principal(), False),  # not a managed identity
        (f"{{managed_identities: [{MI}]}}", None, False),
        # ANDed with the others
        (
            f"{{app_ids: [{MCP_DIRECTORY}], auth_methods: [certificate], app_only: true}}",
            principal(auth_method=CERT),
            True,
        ),
        (f"{{app_ids: [{MCP_DIRECTORY}], auth_methods: [certificate]}}", principal(auth_method=SECRET), False),
        (f"{{app_ids: [{APP_B}], auth_methods: [certificate]}}", principal(auth_method=CERT), False),
        (
            f"{{managed_identities: [{MI}], token_sources: [bearer]}}",
            principal(managed_identity=MI, token_sources=(PROXY,)),
            False,
        ),
        (
            f"{{managed_identities: [{MI}], roles: [User.Read.All]}}",
            principal(managed_identity=MI, roles=("User.Read.All",)),
            True,
        ),
    ],
)
def test_when(when, caller, matches):
    when_line = f"  when: {when}\n" if when is not None else ""
    p = policy(
        "- id: r\n  action: allow\n"
        + when_line
        + "  operations: [{host: graph.microsoft.com, methods: [GET], paths: [/users]}]\n"
    )
    assert p.decide(caller, op("GET", "/v1.0/users")).allowed is matches
    assert p.rules[0].matches(caller, op("GET", "/v1.0/users")) is matches


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", ClientSecretGrants.FLAG),
        ("  client_secret_grants: allow\n", ClientSecretGrants.ALLOW),
        ("  client_secret_grants: flag\n", ClientSecretGrants.FLAG),
        ("  client_secret_grants: refuse\n", ClientSecretGrants.REFUSE),
    ],
)
def test_client_secret_grants(line, expected):
    text = policy_text(RULE).replace("upstreams:", line + "upstreams:", 1)
    assert parse_policy(text, "t.yaml").identity.client_secret_grants is expected


def test_the_example_rule_on_authentication_works_once_uncommented(example):
    """The commented rule in example.yaml is documentation: it must stay a valid rule."""
    text = (POLICIES / "example.yaml").read_text()
    head, marker, commented = text.partition("  # - id: no-writes-with-static-secrets")
    assert marker
    rule = re.sub(r"(?m)^  # ?", "  ", marker + commented.partition("\n\n")[0] + "\n")
    p = parse_policy(head + rule, "example.yaml")
    write = op("PATCH", "/v1.0/users/x")
    assert p.decide(principal(auth_method=SECRET), write).rule_id == "no-writes-with-static-secrets"
    assert p.decide(principal(), write).rule_id == "no-writes-with-static-secrets"  # unknown
    d = p.decide(principal(auth_method=CERT), write)
    assert (d.allowed, d.rule_id) == (False, None)  # no rule allows it either
    assert p.decide(principal(auth_method=SECRET), op("GET", "/v1.0/users")).rule_id == "directory-read"


@pytest.mark.parametrize(
    ("pattern", "extra", "method", "target", "matches"),
    [
        ("/users", "", "GET", "/v1.0/users", True),
        ("/users", "", "GET", "/beta/users", True),
        ("/users", "", "GET", "/users", False),
        ("/users", "versions: [v1.0]", "GET", "/beta/users", False),
        ("/users", "versions: [v1.0]", "GET", "/v1.0/users", True),
        ("/beta/users", "", "GET", "/v1.0/users", False),
        ("/beta/users", "", "GET", "/beta/users", True),
        ("/users/{id}", "", "GET", "/v1.0/users/x", True),
        ("/users/{id}", "", "GET", "/v1.0/users", False),
        ("/users/{id}", "", "GET", "/v1.0/users/x/manager", False),
        ("/users/*/manager", "", "GET", "/v1.0/users/x/manager", True),
        ("/users/*/manager", "", "GET", "/v1.0/users/x/y/manager", False),
        ("/users/**", "", "GET", "/v1.0/users", True),
        ("/users/**", "", "GET", "/v1.0/users/x/memberOf/microsoft.graph.group", True),
        ("/users/**", "", "GET", "/v1.0/usersx", False),
        ("/**", "", "GET", "/v1.0", True),
        ("/", "", "GET", "/v1.0", True),
        ("/", "", "GET", "/v1.0/users", False),
        ("/Users/$Count", "", "GET", "/v1.0/users/$COUNT", True),
        ("/applications/{id}/addPassword", "", "POST", "/v1.0/applications(appId='x')/addPassword", True),
        ("/applications/appId=x", "", "POST", "/v1.0/applications(appId='X')", True),
        ("/users", "", "DELETE", "/v1.0/users", False),
    ],
)
def test_paths(pattern, extra, method, target, matches):
    extra_line = f"    {extra}\n" if extra else ""
    p = policy(
        f"- id: r\n  action: allow\n  operations:\n  - host: graph.microsoft.com\n    methods: [GET, post]\n    paths: ['{pattern}']\n"
        + extra_line
    )
    assert p.decide(principal(), op(method, target)).allowed is matches


@pytest.mark.parametrize(
    ("target", "matches"),
    [
        (f"/{TENANT}/oauth2/v2.0/token", True),
        ("/common/oauth2/v2.0/token", True),
        ("/v1.0/oauth2/v2.0/token", True),
        ("/oauth2/v2.0/token", False),
    ],
)
def test_paths_on_a_host_without_versions(target, matches):
    p = policy(
        """
        - id: token
          action: allow
          when: {anonymous: true}
          operations: [{host: login.microsoftonline.com, methods: [POST], paths: ["/{tenant}/oauth2/v2.0/token"]}]
        """
    )
    assert p.decide(None, op("POST", target, host=LOGIN)).allowed is matches


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PATCH", "HEAD"])
def test_any_method(method):
    p = policy(
        '- {id: r, action: allow, operations: [{host: graph.microsoft.com, methods: ["*"], paths: [/users]}]}\n'
    )
    assert p.decide(principal(), op(method, "/v1.0/users")).allowed


def test_rules_do_not_leak_across_hosts():
    p = policy(
        "- {id: r, action: allow, operations: [{host: login.microsoftonline.com, methods: [GET], paths: ['/**']}]}\n"
    )
    assert not p.decide(principal(), op("GET", "/v1.0/users")).allowed
    assert p.decide(principal(), op("GET", "/x", host=LOGIN)).allowed


# --- the index agrees with the plain reading of the rules ----------------------------------------

_APPS = [MCP_DIRECTORY, APP_B]
_GROUPS = [GROUP_A, GROUP_B]
_SEGMENTS = ["users", "groups", "x", "$count", "*", "{id}"]
_TARGETS = [
    "/v1.0/users",
    "/v1.0/users/x",
    "/beta/users/x/$count",
    "/v1.0/groups/x",
    "/v1.0/x/users",
    "/beta",
    "/v1.0/groups/users/x/$count",
    "/users",
]


def _random_policy(rng: random.Random, n: int) -> Policy:
    rules = []
    for i in range(n):
        when_kind = rng.choice(
            ["none", "anon", "app", "group", "role", "app+group", "tenant", "auth", "app_only", "source", "mi", "mi+auth"]
        )
        when = {
            "none": PrincipalMatch(),
            "anon": PrincipalMatch(anonymous=True),
            "app": PrincipalMatch(app_ids=frozenset(rng.sample(_APPS, rng.randint(1, 2)))),
            "group": PrincipalMatch(groups=frozenset(rng.sample(_GROUPS, 1))),
            "role": PrincipalMatch(roles=frozenset({rng.choice(["r1", "r2"])})),
            "app+group": PrincipalMatch(
                app_ids=frozenset({rng.choice(_APPS)}), groups=frozenset({rng.choice(_GROUPS)})
            ),
            "tenant": PrincipalMatch(tenants=frozenset({rng.choice([TENANT, OTHER_TENANT])})),
            "auth": PrincipalMatch(auth_methods=frozenset(rng.sample(list(AuthMethod), rng.randint(1, 2)))),
            "app_only": PrincipalMatch(app_only=rng.random() < 0.5),
            "source": PrincipalMatch(token_sources=frozenset(rng.sample([PROXY, BEARER], rng.randint(1, 2)))),
            "mi": PrincipalMatch(managed_identities=frozenset({rng.choice([MI, MI_HOST]).lower()})),
            "mi+auth": PrincipalMatch(
                managed_identities=frozenset({MI.lower()}), auth_methods=frozenset({CERT})
            ),
        }[when_kind]
        segs = [rng.choice(_SEGMENTS) for _ in range(rng.randint(0, 3))]
        if rng.random() < 0.3:
            segs.append("**")
        text = "/" + "/".join(segs)
        canon = tuple("*" if s == "{id}" else s for s in segs)
        versions = rng.choice([frozenset({"v1.0"}), frozenset({"beta"}), frozenset({"v1.0", "beta"})])
        methods = rng.choice(
            [frozenset({"GET"}), frozenset({"POST"}), frozenset({"*"}), frozenset({"GET", "POST"})]
        )
        om = OperationMatch(GRAPH, methods, (PathPattern(text, canon, versions),))
        action = Action.DENY if rng.random() < 0.2 else Action.ALLOW
        rules.append(Rule(f"r{i}", action, (om,), when))
    return Policy("random", None, [], {}, rules)  # type: ignore[arg-type]


def _reference(p: Policy, who: Principal | None, o: Operation) -> str | None:
    matched = [r for r in p.rules if r.matches(who, o)]
    deny = next((r for r in matched if r.action is Action.DENY), None)
    return (deny or (matched[0] if matched else None)).id if (deny or matched) else None


_CALLERS = [
    None,
    principal(),
    principal(app=APP_B, groups=(GROUP_A,)),
    principal(groups=(GROUP_B,), roles=("r1",)),
    principal(app=APP_B, tid=OTHER_TENANT, roles=("R2",)),
    principal(auth_method=CERT, token_sources=(PROXY,), managed_identity=MI.upper()),
    principal(auth_method=SECRET, app_only=False, token_sources=(BEARER, PROXY), managed_identity=MI_HOST),
]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 60))
def test_indexed_decisions_equal_the_plain_reading(seed, n):
    rng = random.Random(seed)
    p = _random_policy(rng, n)
    for who in _CALLERS:
        for target in _TARGETS:
            for method in ("GET", "POST"):
                o = op(method, target)
                assert p.decide(who, o).rule_id == _reference(p, who, o), (who, o)


def test_five_thousand_rules_still_decide_correctly():
    rules = [
        Rule(
            f"app-{i}",
            Action.ALLOW,
            (
                OperationMatch(
                    GRAPH,
                    frozenset({"GET"}),
                    (PathPattern(f"/users/u{i}", ("users", f"u{i}"), frozenset({"v1.0"})),),
                ),
            ),
            PrincipalMatch(app_ids=frozenset({f"{i:08x}-0000-4000-8000-000000000000"})),
        )
        for i in range(5000)
    ]
    p = Policy("big", None, [], {}, rules)  # type: ignore[arg-type]
    who = principal(app=f"{4321:08x}-0000-4000-8000-000000000000")
    assert p.decide(who, op("GET", "/v1.0/users/u4321")).rule_id == "app-4321"
    assert not p.decide(who, op("GET", "/v1.0/users/u4320")).allowed
    assert [r.id for r in p.matching_rules(who, op("GET", "/v1.0/users/u4321"))] == ["app-4321"]


# --- errors --------------------------------------------------------------------------------------

RULE = "- id: r\n  action: allow\n  operations:\n  - host: graph.microsoft.com\n    methods: [GET]\n    paths: [/users]\n"


def _replace(old: str, new: str, rules: str = RULE) -> str:
    text = policy_text(rules)
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("text", "line", "col", "message"),
    [
        # YAML syntax
        ("version: 1\nidentity: [a\n", 3, 1, "YAML syntax error: expected ',' or ']'"),
        ("version: 1\nidentity:\n\ttenants: []\n", 3, 1, "YAML syntax error: found character '\\t'"),
        ("version: 1\nversion: 1\n", 2, 1, 'YAML syntax error: found duplicate key "version"'),
        ("version: 1\nidentity: x: y\n", 2, 12, "YAML syntax error: mapping values are not allowed here"),
        ("version: 1\nidentity: *missing\n", 2, 11, "YAML syntax error: found undefined alias"),
        (
            "version: 1\n---\nversion: 1\n",
            2,
            1,
            "YAML syntax error: expected a single document in the stream, but found another document",
        ),
        ("version: 1\nx: \x00\n", 2, 4, "YAML cannot contain this character"),
        # empty and shape
        ("", 1, 1, "the policy file is empty"),
        ("# only a comment\n\n", 1, 1, "the policy file is empty"),
        ("- a\n- b\n", 1, 1, "the policy must be a mapping, not a list"),
        ("version: 1\n", 1, 1, "the policy is missing the required key 'identity'"),
        # top level
        (_replace("version: 1", "version: 2"), 1, 10, "unsupported policy version 2"),
        (_replace("version: 1", "version: '1'"), 1, 10, "unsupported policy version '1'"),
        (
            _replace("rules:", "rule:"),
            14,
            1,
            "unknown key 'rule' in the policy; allowed keys: version, identity, upstreams, masking, approvals, "
            "rules",
        ),
        # identity
        (
            _replace(f"[{TENANT}, ", "[contoso.onmicrosoft.com, "),
            3,
            13,
            "identity.tenants[0]: 'contoso.onmicrosoft.com' is not a GUID",
        ),
        (
            _replace(f", {OTHER_TENANT}]", ", 72f988bf-0000-4000-8000-00000000001]"),
            3,
            51,
            "identity.tenants[1]: '72f988bf-0000-4000-8000-00000000001' is not a GUID",
        ),
        (_replace(f"[{TENANT}, {OTHER_TENANT}]", "[]"), 3, 12, "identity.tenants must not be empty"),
        (
            _replace(f"[{TENANT}, {OTHER_TENANT}]", TENANT),
            3,
            12,
            "identity.tenants must be a list, not a string",
        ),
        (
            _replace("    audiences: [https://graph.microsoft.com]\n", ""),
            4,
            3,
            "identity.bearer is missing the required key 'audiences'",
        ),
        (
            _replace("    audiences:", "    audience:"),
            5,
            5,
            "unknown key 'audience' in identity.bearer; allowed keys: audiences, issuers",
        ),
        (
            _replace('["https://login', '["http://login'),
            6,
            15,
            "identity.bearer.issuers[0]: 'http://login.microsoftonline.com/{tenantid}/v2.0' is not an https URL",
        ),
        (_replace("{tenantid}/v2.0", "{tid}/v2.0"), 6, 15, "identity.bearer.issuers[0]: unknown placeholder {tid}"),
        (
            _replace("  bearer:", "  leeway_seconds: '60'\n  bearer:"),
            4,
            19,
            "identity.leeway_seconds must be a whole number, not a string",
        ),
        (
            _replace("  bearer:", "  leeway_seconds: 301\n  bearer:"),
            4,
            19,
            "identity.leeway_seconds must be between 0 and 300, not 301",
        ),
        (
            _replace("  bearer:", "  leeway_seconds: true\n  bearer:"),
            4,
            19,
            "identity.leeway_seconds must be a whole number, not a boolean",
        ),
        # identity: each token source has its own trust
        (
            _replace("  bearer:\n    audiences:", "  audiences:").replace("    issuers:", "  issuers:", 1),
            4,
            3,
            "identity.audiences: audiences and issuers are now given per token source",
        ),
        (
            _replace("  bearer:\n    audiences: [https://graph.microsoft.com]\n", "  issuers:").replace(
                '  issuers:    issuers:', "  issuers:", 1),
            4,
            3,
            "identity.issuers: audiences and issuers are now given per token source",
        ),
        (
            _replace("  bearer:", "  proxy:"),
            5,
            17,
            "identity.proxy.audiences: 'https://graph.microsoft.com' is Microsoft Graph's audience",
        ),
        (
            _replace("  bearer:", "  proxy:\n    graph_token: true\n    audiences: [api://nhi-gateway]\n"
                                  "    issuers: ['https://login.microsoftonline.com/{tenantid}/v2.0']\n  bearer:"),
            5,
            18,
            "identity.proxy.graph_token is true, but identity.proxy.audiences lists none of Microsoft Graph's",
        ),
        (
            _replace("  bearer:", "  bearer:\n    graph_token: true"),
            5,
            5,
            "unknown key 'graph_token' in identity.bearer; allowed keys: audiences, issuers",
        ),
        (
            _replace("  - host: graph.microsoft.com\n", "  - host: graph.microsoft.com\n    token: both\n"),
            9,
            12,
            "upstreams[0].token: 'both' needs a token in the proxy credentials",
        ),
        (
            _replace("  bearer:\n    audiences: [https://graph.microsoft.com]\n"
                     '    issuers: ["https://login.microsoftonline.com/{tenantid}/v2.0"]\n', ""),
            2,
            1,
            "identity accepts no token: it names no token source",
        ),
        # upstreams
        (
            _replace("    token: none", "    token: nobody"),
            10,
            12,
            "upstreams[1].token must be one of any, proxy, bearer, both, none, not 'nobody'",
        ),
        (
            _replace("  - host: login.microsoftonline.com", "  - host: https://login.microsoftonline.com/"),
            9,
            11,
            "upstreams[1].host: 'https://login.microsoftonline.com/' is not a host name",
        ),
        (
            _replace("  - host: login.microsoftonline.com", "  - host: Graph.Microsoft.com."),
            9,
            11,
            "upstreams[1]: host 'graph.microsoft.com' is listed twice",
        ),
        # masking
        (
            _replace("pii: {fields: [mail]}", "pii: {field: [mail]}"),
            13,
            11,
            "unknown key 'field' in masking profile 'pii'; allowed keys: fields",
        ),
        (
            _replace("  profiles:", "  default_profile: pi\n  profiles:"),
            12,
            20,
            "masking.default_profile: unknown mask profile 'pi'",
        ),
        # rules
        (
            _replace("  action: allow", "  acton: allow"),
            16,
            3,
            "unknown key 'acton' in rule 'r'; allowed keys: id, description, action, when, operations, odata, "
            "schedule, approval, mask",
        ),
        (_replace("  action: allow\n", ""), 15, 3, "rule 'r' is missing the required key 'action'"),
        (
            _replace("  action: allow", "  action: permit"),
            16,
            11,
            "rule 'r': action must be one of allow, deny, approve, not 'permit'",
        ),
        (_replace("  action: allow", "  action:"), 16, 3, "rule 'r': 'action' has no value"),
        (_replace("- id: r", "- id: my rule"), 15, 7, "rule 'my rule': invalid rule id 'my rule'"),
        (policy_text(RULE + RULE), 21, 7, "duplicate rule id 'r'"),
        (
            _replace("  action: allow", "  action: allow\n  mask: secrets"),
            17,
            9,
            "rule 'r': mask: unknown mask profile 'secrets'",
        ),
        (
            _replace("  action: allow", "  action: deny\n  mask: pii"),
            17,
            9,
            "rule 'r': 'mask' has no effect on a deny rule",
        ),
        (
            policy_text("- id: r\n  action: allow\n  operations: []\n"),
            17,
            15,
            "rule 'r': operations must not be empty",
        ),
        # when
        (
            _replace("  action: allow", "  action: allow\n  when: {app_id: [x]}"),
            17,
            10,
            "unknown key 'app_id' in rule 'r': when; allowed keys: anonymous, app_ids",
        ),
        (
            _replace("  action: allow", "  action: allow\n  when: {anonymous: yes}"),
            17,
            21,
            "rule 'r': when.anonymous must be true or false, not a string",
        ),
        (
            _replace("  action: allow", f"  action: allow\n  when: {{anonymous: true, app_ids: [{APP_B}]}}"),
            17,
            36,
            "'app_ids' cannot be combined with anonymous: true",
        ),
        (
            _replace("  action: allow", "  action: allow\n  when: {app_ids: [mcp-directory]}"),
            17,
            20,
            "rule 'r': when.app_ids[0]: 'mcp-directory' is not a GUID",
        ),
        (
            _replace("  action: allow", "  action: allow\n  when: {groups: []}"),
            17,
            18,
            "rule 'r': when.groups must not be empty",
        ),
        (
            _replace("  action: allow", f"  action: allow\n  when: {{tenants: [{APP_B}]}}"),
            17,
            20,
            f"tenant '{APP_B}' is not in identity.tenants",
        ),
        (
            _replace("  action: allow", "  action: allow\n  when: {auth_methods: [cert]}"),
            17,
            25,
            "rule 'r': when.auth_methods[0] must be one of certificate, client_secret, public_client, "
            "unknown, not 'cert'",
        ),
        (
            _replace("  action: allow", "  action: allow\n  when: {auth_methods: [certificate, federated]}"),
            17,
            38,
            "rule 'r': when.auth_methods[1]: 'federated' is not told apart by Entra's tokens",
        ),
        (
            _replace("  action: allow", "  action: allow\n  when: {auth_methods: certificate}"),
            17,
            24,
            "rule 'r': when.auth_methods must be a list, not a string",
        ),
        (
            _replace("  action: allow", "  action: allow\n  when: {auth_methods: []}"),
            17,
            24,
            "rule 'r': when.auth_methods must not be empty",
        ),
        (
            _replace("  action: allow", "  action: allow\n  when: {app_only: 'yes'}"),
            17,
            20,
            "rule 'r': when.app_only must be true or false, not a string",
        ),
        (
            _replace("  action: allow", "  action: allow\n  when: {token_sources: [header]}"),
            17,
            26,
            "rule 'r': when.token_sources[0] must be one of proxy, bearer, not 'header'",
        ),
        (
            _replace("  action: allow", "  action: allow\n  when: {managed_identities: [mcp-mi]}"),
            17,
            31,
            "rule 'r': when.managed_identities[0]: 'mcp-mi' is not an Azure resource id",
        ),
        (
            _replace("  action: allow", f"  action: allow\n  when:\n    managed_identities:\n    - {MI}\n    - /subscriptions/x"),
            20,
            7,
            "rule 'r': when.managed_identities[1]: '/subscriptions/x' is not an Azure resource id",
        ),
        (
            _replace("  action: allow", "  action: allow\n  when: {anonymous: true, auth_methods: [certificate]}"),
            17,
            41,
            "'auth_methods' cannot be combined with anonymous: true",
        ),
        (
            _replace("  action: allow", "  action: allow\n  when: {authmethods: [certificate]}"),
            17,
            10,
            "unknown key 'authmethods' in rule 'r': when",
        ),
        (
            _replace("  bearer:", "  client_secret_grants: deny\n  bearer:"),
            4,
            25,
            "identity.client_secret_grants must be one of allow, flag, refuse, not 'deny'",
        ),
        (
            _replace("  bearer:", "  client_secret_grants: false\n  bearer:"),
            4,
            25,
            "identity.client_secret_grants must be a string, not a boolean",
        ),
        # operations
        (
            _replace("  - host: graph.microsoft.com\n    methods", "  - host: evil.example\n    methods"),
            18,
            11,
            "rule 'r': operations[0]: host 'evil.example' is not listed under upstreams",
        ),
        (
            _replace("methods: [GET]", "methods: [GTE]"),
            19,
            15,
            "rule 'r': operations[0].methods[0]: unknown method 'GTE'",
        ),
        (
            _replace("methods: [GET]", "methods: GET"),
            19,
            14,
            "rule 'r': operations[0].methods must be a list, not a string",
        ),
        (
            _replace("    paths: [/users]\n", ""),
            18,
            5,
            "rule 'r': operations[0] is missing the required key 'paths'",
        ),
        (
            _replace("paths: [/users]", "paths: [/users/**/x]"),
            20,
            13,
            "bad path pattern '/users/**/x': '**' must be the last segment",
        ),
        (_replace("paths: [/users]", "paths: [users]"), 20, 13, "path pattern 'users' must start with '/'"),
        (
            _replace("paths: [/users]", "paths: [/users, '/users/{id']"),
            20,
            21,
            "bad path pattern '/users/{id': wildcard inside segment '{id'",
        ),
        (_replace("paths: [/users]", "paths: [/users/a*]"), 20, 13, "wildcard inside segment 'a*'"),
        (_replace("paths: [/users]", "paths: [/users/]"), 20, 13, "trailing '/'"),
        (_replace("paths: [/users]", "paths: [//users]"), 20, 13, "empty segment"),
        (_replace("paths: [/users]", "paths: [/users/../groups]"), 20, 13, "'..' segment"),
        (_replace("paths: [/users]", "paths: [/users/%41]"), 20, 13, "percent-encoding in '%41'"),
        (_replace("paths: [/users]", "paths: [\"/users('x')\"]"), 20, 13, "OData key syntax in 'users('x')'"),
        (
            _replace("paths: [/users]", "paths: [/v1.0/users]\n    versions: [beta]"),
            20,
            13,
            "names a version and the operation has versions too",
        ),
        (
            _replace("paths: [/users]", "paths: [/users]\n    versions: [v2.0]"),
            21,
            16,
            "versions[0] must be one of v1.0, beta, not 'v2.0'",
        ),
        (
            _replace(
                "  - host: graph.microsoft.com\n    methods",
                "  - host: login.microsoftonline.com\n    methods",
            ).replace("paths: [/users]", "paths: [/users]\n    versions: [v1.0]"),
            21,
            15,
            "versions apply to Graph hosts only",
        ),
    ],
)
def test_errors_say_where_and_what(text, line, col, message):
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "policy.yaml")
    err = e.value
    assert (err.line, err.column) == (line, col), str(err)
    assert str(err).startswith(f"policy.yaml:{line}:{col}: "), str(err)
    assert message in err.message, str(err)


@pytest.mark.parametrize(
    ("old", "new", "hint"),
    [
        ("rules:", "rule:", "did you mean 'rules'?"),
        ("  action: allow", "  acton: allow", "did you mean 'action'?"),
        ("methods: [GET]", "methods: [GTE]", "did you mean 'GET'?"),
        ("  action: allow", "  action: allow\n  when: {authmethods: [certificate]}", "did you mean 'auth_methods'?"),
        ("  action: allow", "  action: allow\n  when: {auth_methods: [certifcate]}", "did you mean 'certificate'?"),
        ("  action: allow", "  action: allow\n  when: {auth_methods: [federated]}", "write certificate"),
        ("  action: allow", "  action: allow\n  when: {managed_identities: [x]}", "xms_mirid"),
        ("  bearer:", "  client_secret_grants: refused\n  bearer:", "did you mean 'refuse'?"),
        ("  action: allow", "  action: alow", "did you mean 'allow'?"),
        (f"[{TENANT}, ", "[contoso.onmicrosoft.com, ", "not a name or domain"),
        ("paths: [/users]", "paths: [\"/users('x')\"]", "/users/{id} matches /users('x')"),
    ],
)
def test_errors_say_what_to_do(old, new, hint):
    with pytest.raises(PolicyError) as e:
        parse_policy(_replace(old, new), "p.yaml")
    assert hint in e.value.hint
    assert f"\n  hint: {e.value.hint}" in str(e.value)


def test_rule_ids_are_unique_and_the_error_points_at_the_first():
    with pytest.raises(PolicyError) as e:
        parse_policy(policy_text(RULE + RULE), "p.yaml")
    assert e.value.hint == "the first rule with this id is at line 15"


def test_unreadable_file(tmp_path):
    with pytest.raises(PolicyError) as e:
        load_policy(tmp_path / "missing.yaml")
    assert (e.value.line, e.value.column) == (0, 0)
    assert str(e.value).startswith(f"{tmp_path / 'missing.yaml'}: cannot read the policy file")


def test_non_utf8_file_reports_the_position(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"version: 1\nidentity:\n  x: caf\xe9\n")
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert (e.value.line, e.value.column) == (3, 9)
    assert "not UTF-8" in e.value.message


def test_merge_keys_and_anchors_are_read():
    text = _replace("  action: allow", "  action: allow\n  when: &who {app_ids: [%s]}" % MCP_DIRECTORY)
    text += "- id: r2\n  action: allow\n  when: *who\n  operations:\n  - {host: graph.microsoft.com, methods: [GET], paths: [/groups]}\n"
    p = parse_policy(text, "p.yaml")
    assert p.decide(principal(), op("GET", "/v1.0/groups")).rule_id == "r2"
    assert not p.decide(principal(app=APP_B), op("GET", "/v1.0/groups")).allowed


def test_a_merged_key_error_still_has_a_position():
    text = HEAD.replace("masking:", "base: &b {zzz: 1}\nmasking:")
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    assert e.value.line >= 1 and "unknown key 'base'" in e.value.message


def _mutations(text: str) -> st.SearchStrategy[str]:
    pieces = st.sampled_from(
        [
            "",
            ":",
            "- ",
            "{",
            "[",
            "'",
            '"',
            "\t",
            "\n",
            "  ",
            "*a",
            "&a ",
            "!!str ",
            "<<: ",
            "~",
            "1",
            "true",
            "@",
            "%",
            "\x00",
            "é",
            "\ufeff",
        ]
    )

    return text_mutations(text, pieces, longest_cut=8)


@settings(max_examples=300, deadline=None)
@given(
    _mutations(
        policy_text(RULE)
        + "    versions: [v1.0]\n- id: d\n  action: deny\n  when: {groups: [%s]}\n  operations: [{host: login.microsoftonline.com, methods: ['*'], paths: ['/**']}]\n"
        % GROUP_A
    )
)
def test_no_input_raises_anything_but_policy_error(text):
    try:
        parse_policy(text, "fuzz.yaml")
    except PolicyError as e:
        assert e.line >= 1 and e.column >= 1
        assert str(e).startswith(f"fuzz.yaml:{e.line}:{e.column}: ")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_no_text_raises_anything_but_policy_error(text):
    with contextlib.suppress(PolicyError):
        parse_policy(text, "fuzz.yaml")


def test_deep_nesting_is_a_policy_error():
    with pytest.raises(PolicyError):
        parse_policy("a: " + "[" * 5000 + "]" * 5000, "deep.yaml")


# --- reloading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("from_policy", [False, True])
def test_reload_keeps_the_last_good_policy(tmp_path, from_policy):
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text(RULE))
    store = PolicyStore(load_policy(path) if from_policy else path)
    assert store.path == path
    first = store.current
    assert store.generation == 1
    assert first.decide(principal(), op("GET", "/v1.0/users")).allowed

    path.write_text(policy_text(RULE).replace("action: allow", "action: alow"))
    with pytest.raises(PolicyError) as e:
        store.reload()
    assert e.value.source == str(path) and e.value.line == 16
    assert store.current is first
    assert store.generation == 1

    path.write_text(policy_text(RULE).replace("action: allow", "action: deny"))
    second = store.reload()
    assert store.current is second is not first
    assert store.generation == 2
    assert not store.current.decide(principal(), op("GET", "/v1.0/users")).allowed


def test_a_store_cannot_start_without_a_good_policy(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\n")
    with pytest.raises(PolicyError):
        PolicyStore(path)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("version: 1\nidentity:\n\ttenants: []\n", "indent YAML with spaces, not tabs"),
        ("version: 1\nversion: 1\n", "each key may appear only once in a mapping"),
        ("version: 1\n---\nversion: 1\n", "remove the '---' line"),
        ("", "start with 'version: 1'"),
    ],
)
def test_yaml_errors_say_what_to_do(text, hint):
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    assert hint in e.value.hint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("? [a]\n: 1\n", "the policy: keys must be strings, not a list"),
        ("!custom x\n", "the policy must be a mapping, not a value with a custom tag"),
        (
            _replace("  bearer:", "  leeway_seconds: 2001-12-14\n  bearer:"),
            "must be a whole number, not a date",
        ),
        (
            _replace("  bearer:", "  leeway_seconds: !!binary aGVsbG8=\n  bearer:"),
            "must be a whole number, not binary data",
        ),
    ],
)
def test_odd_yaml_values_are_named_plainly(text, message):
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    assert message in e.value.message


def test_mask_profile_names_are_exact():
    text = _replace(
        "    pii: {fields: [mail]}",
        "    Directory-PII: {fields: [mail]}",
        RULE.replace("  action: allow", "  action: allow\n  mask: Directory-PII"),
    )
    p = parse_policy(text, "p.yaml")
    assert p.decide(principal(), op("GET", "/v1.0/users")).mask_profile == "Directory-PII"
    with pytest.raises(PolicyError, match="unknown mask profile 'directory-pii'"):
        parse_policy(text.replace("mask: Directory-PII", "mask: directory-pii"), "p.yaml")


def test_a_bug_in_the_loader_still_surfaces_as_a_policy_error(monkeypatch):
    from nhi_gateway.policy import loader as policy_module

    def broken(self):
        raise KeyError("oops")

    monkeypatch.setattr(policy_module._Loader, "load", broken)
    with pytest.raises(PolicyError) as e:
        parse_policy(policy_text(RULE), "p.yaml")
    assert (e.value.line, e.value.column) == (1, 1)
    assert "KeyError" in e.value.message and "bug" in e.value.hint
