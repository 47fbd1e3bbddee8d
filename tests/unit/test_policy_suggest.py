"""``nhi-gateway policy suggest``: a least-privilege policy from recorded traffic, which lints and
under which a replay of the same traffic changes no allowed decision."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from mitmproxy import io

from nhi_gateway.identity.principal import Principal
from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.policy.lint import policy_warnings
from nhi_gateway.policy.loader import load_policy
from nhi_gateway.policy.observed import from_audit_record, from_flow
from nhi_gateway.policy.suggest import is_key, template
from nhi_gateway.recording.audit import AuditLog

from ..support.policies import EXAMPLE_POLICY, GRAPH_HOST, LOGIN_HOST, op
from ..support.traffic import (
    APP_OBJECT,
    MCP,
    MCP_PRINCIPAL,
    RECORDED_AT,
    ROTATION_BOT,
    TENANT,
    USER,
    allowed,
    denied,
    policy_cli,
    recorded,
    write_flows,
)

ADELE = "0f573d36-fa84-5b0a-917c-50d218f4571b"


@pytest.mark.parametrize("segment, key", [
    (USER, True), ("adele@contoso.com", True), ("appid=5a8f0000-0000-0000-0000-000000000001", True),
    ("42", True), ("aqmkadawatnizmyrxxx-0123456789abcdefghijkl", True), ("b!abcdefghij_k", True),
    ("contoso.onmicrosoft.com", False), ("users", False), ("memberof", False), ("microsoft.graph.group", False),
    ("$count", False), ("$ref", False), ("addpassword", False), ("oauth2", False), ("v2.0", False),
    ("oauth2permissiongrants", False),
])
def test_keys_become_id_and_names_stay(segment, key):
    assert is_key(segment) is key


@pytest.mark.parametrize("method, target, expected", [
    ("GET", f"/v1.0/users/{USER}", "/v1.0/users/{id}"),
    ("GET", "/v1.0/users('adele@contoso.com')/memberOf", "/v1.0/users/{id}/memberof"),
    ("POST", f"/beta/applications(appId='{MCP}')/addPassword", "/beta/applications/{id}/addpassword"),
    ("GET", "/v1.0/groups/$count", "/v1.0/groups/$count"),
    ("GET", "/v1.0/users?$top=5", "/v1.0/users"),
])
def test_a_template_keeps_the_version_and_the_names(method, target, expected):
    seen = from_flow(recorded(method, target, Decision(Action.ALLOW, Stage.POLICY, "ok",
                                                        principal=MCP_PRINCIPAL.to_dict())))
    assert seen is not None and template(seen) == expected


# --- a recording of mixed traffic ---------------------------------------------------------------


def approval_api_call():
    d = Decision(Action.ALLOW, Stage.POLICY, "approval API: list", operation="GET approvals-api /approvals",
                 principal=MCP_PRINCIPAL.to_dict(), extra={"approvals_api": "list"})
    f = recorded("GET", "/approvals", d, host="approvals.nhi-gateway.invalid")
    f.request.scheme, f.request.port = "http", 1
    return f


APPROVED = {"approval": {"id": "apr-1", "state": "approved", "reason": "CHG-1",
                         "approver": {"object_id": ADELE, "tenant_id": TENANT, "display_name": "Adele Vance"}},
            "approver": f"Adele Vance ({ADELE})"}


@pytest.fixture
def traffic(tmp_path) -> Path:
    later = RECORDED_AT + timedelta(hours=2)
    day = tmp_path / "recordings" / "2025-07-07" / TENANT
    write_flows(day / "mcp-directory.mitm", [
        allowed("GET", "/v1.0/users?$top=5&$select=displayName,id"),
        allowed("GET", f"/v1.0/users/{USER}"),
        allowed("GET", "/v1.0/users/adele@contoso.com", at=later),
        allowed("GET", f"/v1.0/groups/{USER}/members"),
        denied("DELETE", f"/v1.0/users/{USER}"),
        denied("POST", f"/v1.0/applications/{APP_OBJECT}/addPassword", rule="no-credential-minting"),
        recorded("GET", "/v1.0/devices", Decision.deny(Stage.IDENTITY, 401, "InvalidAuthenticationToken", "x",
                                                       check="signature")),
        approval_api_call(),
    ])
    write_flows(day / "rotation-bot.mitm", [
        allowed("POST", f"/v1.0/applications/{APP_OBJECT}/addPassword", who=ROTATION_BOT, rule="secret-rotation",
                **APPROVED),
    ])
    write_flows(tmp_path / "recordings" / "2025-07-07" / "anonymous.mitm", [
        allowed("POST", f"/{TENANT}/oauth2/v2.0/token", who=None, rule="token-endpoint", host=LOGIN_HOST,
                grant={"kind": "client_secret", "client_id": MCP, "tenant": TENANT}),
    ])
    return tmp_path / "recordings"


@pytest.fixture
def base(tmp_path) -> Path:
    """The example policy as the traffic above was decided under it: like the demo's copy, its
    no-credential-minting rule holds for mcp-directory, and rotation-bot's addPassword waits for
    a person (rule secret-rotation)."""
    text = EXAMPLE_POLICY.read_text().replace("  - id: no-credential-minting\n", "  - id: no-credential-minting\n"
                                       f"    when: {{app_ids: [{MCP}]}}\n", 1)
    path = tmp_path / "base.yaml"
    path.write_text(text)
    return path


def suggest(capsys, tmp_path, *argv) -> tuple[Path, str]:
    out = tmp_path / "suggested.yaml"
    code, _, err = policy_cli(capsys, "suggest", *argv, "-o", str(out))
    assert code == 0, err
    return out, out.read_text()


def test_the_suggestion_lints_and_replays_with_no_change_of_an_allowed_flow(capsys, tmp_path, traffic, base):
    path, text = suggest(capsys, tmp_path, "--base", str(base), str(traffic))
    policy = load_policy(path)
    assert policy_warnings(policy) == []
    code, out, _ = policy_cli(capsys, "lint", "--strict", str(path))
    assert code == 0, out
    code, out, _ = policy_cli(capsys, "replay", "-v", "--policy", str(path), str(traffic))
    assert "CHANGED" not in out and code == 0, out
    # Exactly the promise: every flow allowed before is decided the same way (and masked alike).
    for flow in (f for p in traffic.rglob("*.mitm") for f in io.FlowReader(p.open("rb")).stream()):
        seen = from_flow(flow)
        if seen is None or not seen.allowed:
            continue
        new = policy.decide(seen.principal, seen.op, seen.at)
        expected = Action.APPROVE if seen.approved_by else Action.ALLOW
        assert new.action is expected, (seen.op, new.reason)
        assert new.mask_profile == "directory-pii"


def test_one_rule_per_identity_with_what_it_was_seen_doing(capsys, tmp_path, traffic, base):
    path, text = suggest(capsys, tmp_path, "--base", str(base), str(traffic))
    policy = load_policy(path)
    mcp = policy.rule("suggested-mcp-directory")
    assert mcp is not None and mcp.action is Action.ALLOW
    assert mcp.when.app_ids == frozenset({MCP})
    assert "mcp-directory" in mcp.description
    assert sorted(p.text for o in mcp.operations for p in o.paths) == [
        "/v1.0/groups/{id}/members", "/v1.0/users", "/v1.0/users/{id}"]
    assert {m for o in mcp.operations for m in o.methods} == {"GET"}
    assert re.search(r"- /v1.0/users/\{id\} +# 2 requests, first 2025-07-07T09:30:00Z, last 2025-07-07T11:30:00Z\n", text)
    # The $select properties seen become allow_select (names as Graph compares them, case-insensitively).
    assert re.search(r"- /v1.0/users +# 1 request, first 2025-07-07T09:30:00Z\n +odata:\n +allow_select: "
                     r"\[displayname, id\]\n", text)
    users = next(o for o in mcp.operations if any(p.text == "/v1.0/users" for p in o.paths))
    assert users.odata is not None
    # The person-approved operation stays behind a person, the one who approved it.
    bot = policy.rule("suggested-rotation-bot-approved")
    assert bot is not None and bot.action is Action.APPROVE and bot.approval.users == frozenset({ADELE})
    assert policy.rule("suggested-token-endpoint").when.anonymous
    # The base's deny rules stay as guard rails; its allow rules do not.
    assert policy.rule("no-credential-minting") is not None and policy.rule("directory-read") is None


@pytest.mark.parametrize("method, target, who", [
    ("DELETE", f"/v1.0/users/{USER}", MCP_PRINCIPAL),  # refused when recorded: never suggested
    ("GET", "/v1.0/devices", MCP_PRINCIPAL),  # refused at the identity stage
    ("GET", "/v1.0/applications", MCP_PRINCIPAL),  # never seen
    ("POST", f"/v1.0/users/{USER}", MCP_PRINCIPAL),  # seen with GET only
    ("GET", f"/beta/users/{USER}", MCP_PRINCIPAL),  # seen on v1.0 only
    ("GET", f"/v1.0/users/{USER}/memberOf", MCP_PRINCIPAL),  # nothing broader than seen
    ("GET", "/v1.0/users", ROTATION_BOT),  # another identity's operation
])
def test_what_was_not_seen_allowed_is_refused(capsys, tmp_path, traffic, base, method, target, who):
    path, _ = suggest(capsys, tmp_path, "--base", str(base), str(traffic))
    assert load_policy(path).decide(who, op(method, target), RECORDED_AT).action is Action.DENY


def test_include_denied_suggests_what_was_refused_too(capsys, tmp_path, traffic, base):
    path, _ = suggest(capsys, tmp_path, "--base", str(base), "--include-denied", str(traffic))
    policy = load_policy(path)
    assert policy.decide(MCP_PRINCIPAL, op("DELETE", f"/v1.0/users/{USER}"), RECORDED_AT).allowed
    # ... but a kept deny rule still wins: the refusal by no-credential-minting stays a refusal.
    minting = policy.decide(MCP_PRINCIPAL, op("POST", f"/v1.0/applications/{APP_OBJECT}/addPassword"), RECORDED_AT)
    assert minting.rule_id == "no-credential-minting" and not minting.allowed


def test_principal_since_and_until_narrow_what_is_read(capsys, tmp_path, traffic, base):
    path, _ = suggest(capsys, tmp_path, "--base", str(base), "--principal", "mcp-*", str(traffic))
    policy = load_policy(path)
    assert [r.id for r in policy.rules if r.id.startswith("suggested-")] == ["suggested-mcp-directory"]
    path, _ = suggest(capsys, tmp_path, "--base", str(base), "--principal", MCP,
                      "--since", "2025-07-07T10:00Z", str(traffic))
    rule = load_policy(path).rule("suggested-mcp-directory")
    assert [p.text for o in rule.operations for p in o.paths] == ["/v1.0/users/{id}"]
    code, _, err = policy_cli(capsys, "suggest", "--until", "2025-07-07T09:00Z", str(traffic))
    assert code == 2 and "no allowed requests match" in err


def test_widen_allows_whole_collections(capsys, tmp_path, traffic, base):
    path, _ = suggest(capsys, tmp_path, "--base", str(base), "--widen", str(traffic))
    policy = load_policy(path)
    assert policy.decide(MCP_PRINCIPAL, op("GET", f"/v1.0/users/{USER}/memberOf"), RECORDED_AT).allowed
    assert not policy.decide(MCP_PRINCIPAL, op("DELETE", f"/v1.0/users/{USER}"), RECORDED_AT).allowed


def test_without_a_base_the_identity_and_upstreams_come_from_what_was_seen(capsys, tmp_path, traffic):
    path, _ = suggest(capsys, tmp_path, str(traffic))
    policy = load_policy(path)
    assert policy.identity.tenants == frozenset({TENANT})
    assert {u.host: str(u.token) for u in policy.upstreams} == {GRAPH_HOST: "any", LOGIN_HOST: "none"}
    assert policy.decide(MCP_PRINCIPAL, op("GET", "/v1.0/users?$select=displayName,id"), RECORDED_AT).allowed


def test_suggest_from_the_audit_trail(capsys, tmp_path, base):
    common = {"time": "2025-07-07T09:30:00.000001Z", "principal": MCP_PRINCIPAL.to_dict(), "stage": "policy",
            "check": "", "status": 200}
    lines = [
        {**common, "method": "GET", "url": f"https://graph.microsoft.com/v1.0/users/{USER}?$select=mail",
         "decision": "allow", "rule": "directory-read"},
        {**common, "method": "DELETE", "url": f"https://graph.microsoft.com/v1.0/users/{USER}", "decision": "deny"},
        {**common, "method": "GET", "url": "http://approvals.nhi-gateway.invalid:1/approvals", "decision": "allow",
         "operation": "GET approvals-api /approvals"},
        {**common, "event": "approval_requested", "method": "POST", "url": "https://graph.microsoft.com/v1.0/x",
         "decision": "approve"},
        {**common, "principal": ROTATION_BOT.to_dict(), "method": "POST", "decision": "allow",
         "rule": "secret-rotation", "url": f"https://graph.microsoft.com/v1.0/applications/{APP_OBJECT}/addPassword",
         "approver": f"Adele Vance ({ADELE})"},
    ]
    audit = tmp_path / "audit.jsonl"
    with AuditLog(audit) as log:
        for line in lines:
            log.append(dict(line))
    assert from_audit_record(lines[2]) is None and from_audit_record(lines[3]) is None
    path, _ = suggest(capsys, tmp_path, "--base", str(base), "--audit", str(audit))
    policy = load_policy(path)
    assert policy.decide(MCP_PRINCIPAL, op("GET", f"/v1.0/users/{USER}?$select=mail"), RECORDED_AT).allowed
    assert not policy.decide(MCP_PRINCIPAL, op("DELETE", f"/v1.0/users/{USER}"), RECORDED_AT).allowed
    held = policy.decide(ROTATION_BOT, op("POST", f"/v1.0/applications/{APP_OBJECT}/addPassword"), RECORDED_AT)
    assert held.action is Action.APPROVE and policy.rule(held.rule_id).approval.users == frozenset({ADELE})


@pytest.mark.parametrize("argv, message", [
    ([], "give recordings"),
    (["--audit", "a.jsonl", "r.mitm"], "one of the two"),
    (["--since", "yesterday-ish", "x"], "expected a time"),
])
def test_suggest_usage_errors_exit_2(capsys, argv, message):
    code, _, err = policy_cli(capsys, "suggest", *argv)
    assert code == 2 and message in err


# --- replay agrees with the gateway about approvals ----------------------------------------------


def test_replay_of_approved_flows_and_approval_api_calls_under_the_same_policy_changes_nothing(capsys, tmp_path):
    policy = tmp_path / "approve.yaml"
    policy.write_text(EXAMPLE_POLICY.read_text().replace("\n  # - id: rotate-with-approval", """
  - id: secret-rotation
    action: approve
    when: {app_ids: [a00780c4-4e70-52ba-ab0f-9b41ac40647f]}
    operations: [{host: graph.microsoft.com, methods: [POST], paths: ["/applications/{id}/addPassword"]}]
    approval: {approvers: {users: [0f573d36-fa84-5b0a-917c-50d218f4571b]}}
  # - id: rotate-with-approval""", 1).replace("  - id: no-credential-minting\n", "  - id: no-credential-minting\n"
                                           "    when: {auth_methods: [client_secret]}\n", 1))
    timed_out = {"approval": {"id": "apr-2", "state": "timed_out", "approver": None, "reason": ""}}
    refused = Decision.deny(Stage.POLICY, 403, "Authorization_RequestDenied", "approval timed out",
                            rule_id="secret-rotation", principal=ROTATION_BOT.to_dict(), extra=timed_out)
    path = write_flows(tmp_path / "r.mitm", [
        allowed("POST", f"/v1.0/applications/{APP_OBJECT}/addPassword", who=ROTATION_BOT, rule="secret-rotation",
                **APPROVED),
        recorded("POST", f"/v1.0/applications/{APP_OBJECT}/addPassword", refused),
        approval_api_call(),
    ])
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(policy), str(path))
    assert code == 0 and "CHANGED" not in out, out
    assert "a call to the gateway's approval API" in out
    assert "2 re-decided, 0 would change" in out
    # An approval-held operation that a new policy simply allows is a change, and says so.
    loose = tmp_path / "loose.yaml"
    loose.write_text(policy.read_text().replace("    action: approve\n    when: {app_ids",
                                                "    action: allow\n    when: {app_ids", 1)
                     .replace("    approval: {approvers: {users: [0f573d36-fa84-5b0a-917c-50d218f4571b]}}\n", "", 1))
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(loose), str(path))
    assert code == 1 and "approve (secret-rotation) -> allow (secret-rotation" in out, out


def test_a_base_deny_rule_that_refuses_what_was_allowed_is_left_out_and_said(capsys, tmp_path, traffic):
    # The example's own no-credential-minting refuses rotation-bot's approved addPassword: the
    # traffic was not decided under it, and the suggestion must not refuse its own evidence.
    path, text = suggest(capsys, tmp_path, "--base", str(EXAMPLE_POLICY), str(traffic))
    assert "# Left out the base's deny rule 'no-credential-minting': it refuses 1 request allowed when recorded." in text
    policy = load_policy(path)
    assert policy.rule("no-credential-minting") is None and policy.rule("no-key-material") is not None
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(path), str(traffic))
    assert code == 0, out


def test_select_becomes_allow_select_once_the_loader_accepts_it(traffic):
    """The loader has ``odata.allow_select``: the suggestion names the properties seen per operation
    (with a loader without it, allow_select_supported() is False and they would be comments)."""
    from nhi_gateway.policy.suggest import allow_select_supported, collect, suggest_rules

    assert allow_select_supported() is True
    seen = [o for p in traffic.rglob("*.mitm") for o in map(from_flow, io.FlowReader(p.open("rb")).stream()) if o]
    rules = suggest_rules(collect([o for o in seen if o.allowed]), with_select=True)
    mcp = next(r for r in rules if r["id"] == "suggested-mcp-directory")
    selecting = [o for o in mcp["operations"] if "odata" in o]
    assert [list(o["paths"]) for o in selecting] == [["/v1.0/users"]]
    assert list(selecting[0]["odata"]["allow_select"]) == ["displayname", "id"]


def test_answers_masked_under_different_profiles_keep_their_profiles(capsys, tmp_path, base):
    text = base.read_text().replace("  profiles:\n", "  profiles:\n    groups-pii: {fields: [mail]}\n", 1)
    two_masks = tmp_path / "two-masks.yaml"
    two_masks.write_text(text)
    path = write_flows(tmp_path / "r" / "a.mitm", [
        allowed("GET", "/v1.0/users"),
        allowed("GET", "/v1.0/groups", rule="groups-read", mask="groups-pii"),
    ])
    out, _ = suggest(capsys, tmp_path, "--base", str(two_masks), str(path))
    policy = load_policy(out)
    assert policy.decide(MCP_PRINCIPAL, op("GET", "/v1.0/users"), RECORDED_AT).mask_profile == "directory-pii"
    assert policy.decide(MCP_PRINCIPAL, op("GET", "/v1.0/groups"), RECORDED_AT).mask_profile == "groups-pii"
    code, out_text, _ = policy_cli(capsys, "replay", "--policy", str(out), str(path))
    assert code == 0, out_text


def test_where_several_tenants_are_trusted_the_rule_names_the_one_seen(capsys, tmp_path, traffic, base):
    other = "99999999-8888-4777-8666-555555555555"
    several = tmp_path / "several.yaml"
    several.write_text(base.read_text().replace(f"    - {TENANT}\n", f"    - {TENANT}\n    - {other}\n", 1))
    assert load_policy(several).identity.tenants == frozenset({TENANT, other})
    path, _ = suggest(capsys, tmp_path, "--base", str(several), str(traffic))
    policy = load_policy(path)
    assert policy.rule("suggested-mcp-directory").when.tenants == frozenset({TENANT})
    elsewhere = Principal(other, MCP_PRINCIPAL.object_id, MCP, "mcp-directory")
    assert not policy.decide(elsewhere, op("GET", "/v1.0/users"), RECORDED_AT).allowed
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(path), str(traffic))
    assert code == 0, out
