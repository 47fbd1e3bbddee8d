"""Report mode: a rule (or the whole policy) that says ``mode: report`` forwards what it would
refuse or hold, and every record of the request says so; rules that enforce still decide."""

from __future__ import annotations

import pytest
from mitmproxy.test import tflow

from nhi_gateway.addons.audit import audit_record
from nhi_gateway.cli.main import main
from nhi_gateway.identity.principal import AuthMethod, Principal, TokenSource
from nhi_gateway.policy.decision import Action, set_decision
from nhi_gateway.policy.loader import PolicyError, parse_policy
from nhi_gateway.policy.operation import Operation
from nhi_gateway.recording.flows import REPORT_MARK, flow_comment, flow_mark, search_keys

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
MCP = "5e0b1683-de22-5eac-9334-fb85a741f6ff"
APPROVER = "0f573d36-fa84-5b0a-917c-50d218f4571b"
WHO = Principal(TENANT, "0b1c2d3e-0000-4000-8000-000000000042", MCP, "mcp-directory",
                auth_method=AuthMethod.CERTIFICATE, token_sources=(TokenSource.BEARER,))

HEAD = f"""\
version: 1
identity: {{tenants: [{TENANT}], bearer: {{audiences: [https://graph.microsoft.com],
           issuers: ["https://sts.windows.net/{{tenantid}}/"]}}}}
upstreams: [{{host: graph.microsoft.com}}]
masking: {{default_profile: pii, profiles: {{pii: {{fields: [mail]}}}}}}
"""
RULES = f"""\
rules:
  - id: read
    action: allow
    when: {{app_ids: [{MCP}]}}
    operations: [{{host: graph.microsoft.com, methods: [GET, POST], paths: ["/users/**", "/applications/**"]}}]
  - id: no-deletes
    action: deny
    mode: report
    operations: [{{host: graph.microsoft.com, methods: [DELETE], paths: ["/users/**"]}}]
  - id: no-minting
    action: deny
    operations: [{{host: graph.microsoft.com, methods: [POST], paths: ["/applications/{{id}}/addPassword"]}}]
  - id: minting-report
    action: deny
    mode: report
    operations: [{{host: graph.microsoft.com, methods: [POST], paths: ["/applications/**"]}}]
  - id: hold-writes
    action: approve
    mode: report
    operations: [{{host: graph.microsoft.com, methods: [POST], paths: ["/users/**"]}}]
    approval: {{approvers: {{users: [{APPROVER}]}}}}
"""


def op(method: str, target: str) -> Operation:
    return Operation.from_request(method, "https", "graph.microsoft.com", 443, target)


@pytest.fixture(scope="module")
def policy():
    return parse_policy(HEAD + RULES, "p.yaml")


def test_a_reporting_deny_rule_forwards_and_says_what_it_would_do(policy):
    d = policy.decide(WHO, op("DELETE", "/v1.0/users/x"))
    # No rule allows a DELETE: forwarded only because the refusal came from a reporting rule and
    # the enforcing rules allow... they do not here: the default refusal enforces.
    assert d.action is Action.DENY and "no rule allows" in d.reason
    allowed_delete = parse_policy(HEAD + RULES.replace("methods: [GET, POST]", "methods: [GET, POST, DELETE]"), "p.yaml")
    d = allowed_delete.decide(WHO, op("DELETE", "/v1.0/users/x"))
    assert d.allowed and d.rule_id == "read" and d.mask_profile == "pii"
    assert d.reported == {"would": "deny", "rule": "no-deletes", "reason": "denied by rule 'no-deletes'"}
    assert d.reason == "allowed by rule 'read'; would deny by rule 'no-deletes' (report mode)"
    assert d.verdict().action is Action.DENY and d.verdict().rule_id == "no-deletes"


def test_an_enforcing_deny_still_refuses_next_to_a_reporting_one(policy):
    d = policy.decide(WHO, op("POST", "/v1.0/applications/x/addPassword"))
    assert d.action is Action.DENY and d.rule_id == "no-minting" and d.reported is None
    d = policy.decide(WHO, op("POST", "/v1.0/applications/x/removePassword"))
    assert d.allowed and d.reported["rule"] == "minting-report"


def test_a_reporting_approve_rule_does_not_hold(policy):
    d = policy.decide(WHO, op("POST", "/v1.0/users/x/revokeSignInSessions"))
    assert d.allowed and d.reported["would"] == "hold" and d.reported["rule"] == "hold-writes"
    assert d.verdict().action is Action.APPROVE


def test_policy_mode_report_covers_deny_and_approve_rules_and_the_default_refusal():
    p = parse_policy(HEAD + "mode: report\n" + RULES.replace("    mode: report\n", ""), "p.yaml")
    assert {r.id for r in p.rules if r.report_only} == {"no-deletes", "no-minting", "minting-report", "hold-writes"}
    d = p.decide(WHO, op("GET", "/v1.0/groups"))
    assert d.allowed and d.mask_profile == "pii"  # masked as any allowed answer without a rule of its own
    assert d.reported == {"would": "deny", "rule": "", "reason": "no rule allows GET graph.microsoft.com /v1.0/groups"}
    assert d.reason.startswith("would deny (no rule allows it)")
    assert p.decide(None, op("GET", "/v1.0/users")).allowed  # anonymous too: only rules report
    assert "REPORT MODE: the policy is in mode: report" in p.report_notice()
    # A rule may still enforce in a reporting policy.
    p = parse_policy(HEAD + "mode: report\n" + RULES.replace(
        "  - id: no-minting\n    action: deny\n", "  - id: no-minting\n    action: deny\n    mode: enforce\n"), "p.yaml")
    assert p.decide(WHO, op("POST", "/v1.0/applications/x/addPassword")).rule_id == "no-minting"
    assert not p.decide(WHO, op("POST", "/v1.0/applications/x/addPassword")).allowed


@pytest.mark.parametrize("text, message", [
    (HEAD + "mode: watch\nrules: []\n", "p.yaml:6:7: mode must be one of enforce, report, not 'watch'"),
    (HEAD + RULES.replace("  - id: read\n    action: allow\n", "  - id: read\n    action: allow\n    mode: report\n"),
     "p.yaml:9:11: rule 'read': mode: report applies to deny and approve rules"),
])
def test_mode_mistakes_are_refused_with_their_place(text, message):
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    assert str(e.value).startswith(message)


def test_an_enforcing_policy_has_no_notice(policy):
    assert parse_policy(HEAD + "rules: []\n", "p.yaml").report_notice() is None
    assert "3 rules only report: no-deletes, minting-report, hold-writes" in policy.report_notice()


def test_the_recording_and_the_audit_line_say_would_deny(policy):
    d = policy.decide(WHO, op("POST", "/v1.0/applications/x/removePassword"))
    flow = tflow.tflow(resp=True)
    set_decision(flow, d)
    assert flow_mark(d) == REPORT_MARK == ":warning:"
    assert flow_comment(d).startswith("WOULD DENY by rule minting-report · forwarded (report mode) · rule read")
    assert search_keys(d)["nhi.would"] == "deny minting-report"
    record = audit_record(flow)
    assert record["decision"] == "allow" and record["report"]["would"] == "deny"
    assert "would deny by rule 'minting-report'" in record["reason"]
    set_decision(flow, policy.decide(WHO, op("GET", "/v1.0/users")))
    assert audit_record(flow)["report"] is None


def test_lint_lists_what_only_reports(capsys, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + RULES)
    assert main(["policy", "lint", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: note: 3 rules only report (mode: report), refusing and holding nothing: no-deletes, " \
           "minting-report, hold-writes" in out


def test_a_batch_is_forwarded_and_marked_as_its_reported_inner_requests(policy):
    import json

    from nhi_gateway.policy.batch import inner_decision, judge_batch

    body = json.dumps({"requests": [
        {"id": "1", "method": "GET", "url": "/users"},
        {"id": "2", "method": "POST", "url": "/applications/x/removePassword",
         "headers": {"Content-Type": "application/json"}, "body": {}}]}).encode()
    d = judge_batch(policy, WHO, op("POST", "/v1.0/$batch"), body, "application/json")
    assert d.allowed and d.reported["would"] == "deny" and d.reported["rule"] == "minting-report"
    inner = d.extra["batch"]
    assert "report" not in inner[0] and inner[1]["report"]["rule"] == "minting-report"
    assert inner_decision(d, inner[1]).reported["would"] == "deny"
    assert flow_mark(d) == REPORT_MARK
    # An enforcing refusal inside still refuses the whole batch.
    body = json.dumps({"requests": [{"id": "1", "method": "POST", "url": "/applications/x/addPassword",
                                     "headers": {"Content-Type": "application/json"}, "body": {}}]}).encode()
    assert not judge_batch(policy, WHO, op("POST", "/v1.0/$batch"), body, "application/json").allowed


def test_lint_does_not_call_a_rule_shadowed_by_one_that_only_reports(capsys, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + f"""\
rules:
  - id: read
    action: allow
    when: {{app_ids: [{MCP}]}}
    operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/users"]}}]
  - id: nothing
    action: deny
    mode: report
    operations: [{{host: graph.microsoft.com, methods: ["*"], paths: ["/**"]}}]
""")
    assert main(["policy", "lint", "--strict", str(path)]) == 0
    assert "warning" not in capsys.readouterr().out


def test_lint_warns_when_report_mode_would_forward_unmasked_answers(capsys, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(HEAD.replace("default_profile: pii, ", "") + "mode: report\nrules: []\n")
    assert main(["policy", "lint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning: mode: report forwards requests no rule allows, and with no masking.default_profile" in out
    assert "note: mode: report: a request no rule allows is forwarded and reported" in out


def test_metrics_count_what_would_have_been_refused(policy):
    from nhi_gateway.addons.metrics import GatewayMetrics, Metrics

    metrics = GatewayMetrics()
    counter = Metrics(metrics, lambda: {r.id for r in policy.rules})
    for target in ("/v1.0/applications/x/removePassword", "/v1.0/users"):
        flow = tflow.tflow(resp=True)
        set_decision(flow, policy.decide(WHO, op("POST" if "Password" in target else "GET", target)))
        counter.response(flow)
    text = metrics.exposition().decode()
    assert 'nhi_reported_total{rule="minting-report",would="deny"} 1.0' in text
    assert 'nhi_requests_total{decision="allow",rule="read",stage="policy"} 2.0' in text
