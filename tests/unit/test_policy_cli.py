"""``nhi-gateway policy lint|explain|replay``, run through the real command line entry point."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from mitmproxy import io

from nhi_gateway.cli.main import main
from nhi_gateway.policy.decision import Decision, Stage
from nhi_gateway.policy.operation import Operation
from nhi_gateway.policy.loader import load_policy
from nhi_gateway.identity.principal import AuthMethod, Principal, TokenSource

from ..support.policies import EXAMPLE_POLICY, GRAPH_HOST, SHIPPED_POLICIES, policy_head
from ..support.traffic import MCP, MCP_PRINCIPAL, OID, RECORDED_AT, TENANT, policy_cli, recorded

OTHER = "11111111-2222-4333-8444-555555555555"
GROUP = "aaaaaaaa-0000-4000-8000-00000000000a"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


HEAD = policy_head(TENANT) + "rules:\n"


# --- lint -----------------------------------------------------------------------------------------


def test_lint_passes_every_shipped_policy(capsys):
    files = sorted(str(p) for p in SHIPPED_POLICIES.glob("*.yaml"))
    assert len(files) >= 5
    code, out, _ = policy_cli(capsys, "lint", *files)
    assert code == 0, out
    lines = out.splitlines()
    assert len(lines) == len(files)  # one line per file, no warnings
    for path, line in zip(files, lines, strict=True):
        assert line.startswith(f"{path}: ok: ")
    assert any("5 rules (2 allow, 2 deny, 1 approve), 2 upstreams, 1 mask profile" in line for line in lines)


def test_lint_reports_file_line_column_and_hint_and_exits_1(capsys, tmp_path):
    good = write(tmp_path, "good.yaml", HEAD + "- {id: r, action: allow, operations: [{host: graph.microsoft.com, methods: [GET], paths: [/users]}]}\n")
    bad = write(tmp_path, "bad.yaml", HEAD + "- id: r\n  acton: allow\n")
    code, out, _ = policy_cli(capsys, "lint", str(good), str(bad))
    assert code == 1
    assert f"{good}: ok: 1 rule (1 allow, 0 deny, 0 approve), 1 upstream, 0 mask profiles" in out
    assert f"{bad}:15:3: unknown key 'acton' in rule 'r'" in out
    assert "  hint: did you mean 'action'?" in out


def test_lint_of_a_missing_file(capsys, tmp_path):
    code, out, _ = policy_cli(capsys, "lint", str(tmp_path / "nope.yaml"))
    assert code == 1 and "cannot read the policy file" in out


SHADOWED = HEAD + f"""\
- id: read-everything
  action: allow
  operations: [{{host: graph.microsoft.com, methods: ["*"], paths: ["/**"]}}]
- id: read-users
  action: allow
  when: {{app_ids: [{MCP}]}}
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/users/{{id}}"]}}]
- id: no-deletes
  action: deny
  operations: [{{host: graph.microsoft.com, methods: [DELETE], paths: ["/users/**"]}}]
- id: delete-users
  action: allow
  when: {{groups: [{GROUP}]}}
  operations: [{{host: graph.microsoft.com, methods: [DELETE], paths: ["/users/{{id}}"], versions: [v1.0]}}]
- id: limited
  action: allow
  odata: {{max_top: 5}}
  operations: [{{host: graph.microsoft.com, methods: ["*"], paths: ["/**"]}}]
- id: expired
  action: allow
  schedule: {{valid_until: 2020-01-01T00:00:00Z}}
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/groups"]}}]
"""


def test_lint_warns_about_rules_that_never_decide_without_failing(capsys, tmp_path):
    path = write(tmp_path, "p.yaml", SHADOWED)
    code, out, _ = policy_cli(capsys, "lint", str(path))
    assert code == 0
    assert (f"{path}:17:3: warning: rule 'read-users' never decides: the earlier allow rule "
            "'read-everything' (line 14) matches every request it matches") in out
    assert (f"{path}:24:3: warning: rule 'delete-users' never applies: deny rule 'no-deletes' (line 21) "
            "matches every request it matches, and deny wins") in out
    assert "rule 'limited' never decides" in out  # limits narrow it, the earlier rule has none
    assert "warning: rule 'expired' expired at 2020-01-01T00:00:00+00:00" in out
    assert "warning: rule 'read-everything' never" not in out and "warning: rule 'no-deletes'" not in out
    # ... and read-everything is what it is: everything, for everyone.
    assert (f"{path}:14:3: warning: rule 'read-everything' allows every request to graph.microsoft.com "
            "for every verified caller") in out
    assert out.rstrip().endswith("6 rules (5 allow, 1 deny, 0 approve), 1 upstream, 0 mask profiles, 5 warnings")
    code, _, _ = policy_cli(capsys, "lint", "--strict", str(path))
    assert code == 1


def test_lint_does_not_warn_when_a_rule_is_only_partly_covered(capsys, tmp_path):
    path = write(tmp_path, "p.yaml", HEAD + f"""\
- id: a
  action: allow
  when: {{app_ids: [{MCP}]}}
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/users"]}}]
- id: b
  action: allow
  when: {{app_ids: [{MCP}, {OTHER}]}}
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/users"]}}]
- id: c
  action: allow
  when: {{app_ids: [{MCP}]}}
  operations: [{{host: graph.microsoft.com, methods: [GET, POST], paths: ["/users"]}}]
- id: d
  action: deny
  schedule: {{hours: "00:00-06:00", timezone: UTC}}
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/**"]}}]
- id: e
  action: allow
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/groups/{{id}}"], versions: [beta]}}]
- id: f
  action: allow
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/groups/**"], versions: [v1.0]}}]
""")
    code, out, _ = policy_cli(capsys, "lint", str(path))
    assert code == 0 and "warning" not in out, out


def test_lint_reports_every_error_in_one_run(capsys, tmp_path):
    text = HEAD + f"""\
- id: ok-rule
  action: allow
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: [/users]}}]
- id: typo
  acton: allow
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: [/users]}}]
- id: bad-method
  action: allow
  operations: [{{host: graph.microsoft.com, methods: [FETCH], paths: [/users]}}]
- id: ok-rule
  action: deny
  when: {{app_ids: [not-a-guid]}}
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: [/users]}}]
"""
    path = write(tmp_path, "many.yaml", text)
    code, out, _ = policy_cli(capsys, "lint", str(path))
    assert code == 1
    assert f"{path}:18:3: unknown key 'acton' in rule 'typo'" in out
    assert f"{path}:22:54: rule 'bad-method': operations[0].methods[0]: unknown method 'FETCH'" in out
    assert f"{path}:23:7: duplicate rule id 'ok-rule'" in out
    assert f"{path}:25:20: rule 'ok-rule': when.app_ids[0]: 'not-a-guid' is not a GUID" in out
    assert f"{path}: 4 errors" in out


def test_lint_reports_an_error_outside_the_rules_and_a_yaml_error(capsys, tmp_path):
    bad_section = write(tmp_path, "s.yaml", HEAD.replace("issuers:", "isuers:"))
    code, out, _ = policy_cli(capsys, "lint", str(bad_section))
    assert code == 1 and "unknown key 'isuers' in identity.proxy" in out and "1 error" in out
    # Errors in several sections, at once, each where it is.
    several = write(tmp_path, "several.yaml", HEAD.replace("issuers:", "isuers:").replace(
        "  - host: graph.microsoft.com\n", "  - host: graph.microsoft.com\n    token: sometimes\n").replace(
        "rules:\n", "masking: {profiles: {p: {fields: [mail], detectors: [psychic]}}}\nrules:\n"))
    code, out, _ = policy_cli(capsys, "lint", str(several))
    assert code == 1, out
    assert f"{several}:10:5: unknown key 'isuers' in identity.proxy" in out
    assert "upstreams[0].token must be one of any, proxy, bearer, both, none, not 'sometimes'" in out
    assert "unknown detector 'psychic'" in out
    assert f"{several}: 3 errors" in out
    # ... and the rules' own errors too, in the same run.
    with_rule = write(tmp_path, "with-rule.yaml", several.read_text() + "- id: r\n  acton: allow\n")
    code, out, _ = policy_cli(capsys, "lint", str(with_rule))
    assert "unknown key 'acton' in rule 'r'" in out and f"{with_rule}: 4 errors" in out, out
    broken = write(tmp_path, "y.yaml", HEAD + "- id: [\n")
    code, out, _ = policy_cli(capsys, "lint", str(broken))
    assert code == 1 and "YAML syntax error" in out


def test_lint_does_not_need_the_pseudonym_key(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("NHI_LINT_TEST_KEY", raising=False)
    text = HEAD.replace("rules:\n", """masking:
  pseudonym_key_env: NHI_LINT_TEST_KEY
  profiles:
    p: {fields: {mail: pseudonym}}
rules:
- {id: r, action: allow, mask: p, when: {app_ids: [%s]}, operations: [{host: graph.microsoft.com, methods: [GET], paths: [/users]}]}
""" % MCP)
    path = write(tmp_path, "pseudo.yaml", text)
    code, out, _ = policy_cli(capsys, "lint", str(path))
    assert code == 0, out
    assert "note: NHI_LINT_TEST_KEY is not set here, so the pseudonym key was not checked" in out
    assert f"{path}: ok: 1 rule" in out
    code, out, _ = policy_cli(capsys, "explain", str(path), "--as", f"app={MCP}", "GET", "https://graph.microsoft.com/v1.0/users")
    assert code == 0, out


def test_lint_shadowing_hints_follow_the_precedence(capsys, tmp_path):
    path = write(tmp_path, "p.yaml", SHADOWED)
    _, out, _ = policy_cli(capsys, "lint", str(path))
    blocks = out.split(f"{path}:")
    deny = next(b for b in blocks if "rule 'delete-users' never applies" in b)
    assert "deny wins over allow wherever the rules are in the file, so reordering changes nothing" in deny
    same = next(b for b in blocks if "rule 'read-users' never decides" in b)
    assert "the first in file order decides, so moving 'read-users' above 'read-everything'" in same


APPROVE_RULE = f"""\
- id: rotate
  action: approve
  operations: [{{host: graph.microsoft.com, methods: [POST], paths: ["/applications/{{id}}/addPassword"]}}]
  approval: {{approvers: {{users: [{OID}]}}}}
"""
API = "7aebfec0-9a46-5038-80cb-18b0fabd868c"


@pytest.mark.parametrize("approvals, warning", [
    ("", "nobody can approve them: approvals.client_id is not set"),
    (f"approvals: {{client_id: {API}, scope: Approvals.Decide}}\n",
     "approved with a plain sign-in: approvals sets neither require_auth_context nor require_mfa"),
    (f"approvals: {{client_id: {API}, require_auth_context: c1}}\n", None),
    (f"approvals: {{client_id: {API}, app_id_uri: 'api://{API}', require_mfa: true}}\n", None),
])
def test_lint_warns_when_approvers_cannot_sign_in_or_need_no_step_up(capsys, tmp_path, approvals, warning):
    path = write(tmp_path, "p.yaml", HEAD.replace("rules:\n", approvals + "rules:\n") + APPROVE_RULE)
    code, out, _ = policy_cli(capsys, "lint", str(path))
    assert code == 0, out
    if warning is None:
        assert "warning" not in out, out
    else:
        line = 14 + approvals.count("\n")
        assert f"{path}:{line}:3: warning: rule 'rotate' " in out and warning in out, out


@pytest.mark.parametrize("approvals, message", [
    ("{client_id: not-a-guid}", "approvals.client_id: 'not-a-guid' is not a GUID"),
    (f"{{client_id: {API}, require_auth_context: mfa}}", "is not an authentication context id"),
    (f"{{client_id: {API}, scope: 'Approvals Decide'}}", "is not a scope name"),
    ("{app_id_uri: 'api://x'}", "approvals.app_id_uri needs approvals.client_id"),
    (f"{{client_id: {API}, require_mfa: yes-please}}", "require_mfa"),
])
def test_lint_refuses_an_approvals_section_it_cannot_use(capsys, tmp_path, approvals, message):
    path = write(tmp_path, "p.yaml", HEAD.replace("rules:\n", f"approvals: {approvals}\nrules:\n") + APPROVE_RULE)
    code, out, err = policy_cli(capsys, "lint", str(path))
    assert code == 1 and message in out + err, out + err


# --- explain --------------------------------------------------------------------------------------

AS_MCP = f"app={MCP},oid={OID},tenant={TENANT}"


def test_explain_an_allow(capsys):
    code, out, _ = policy_cli(capsys, "explain", str(EXAMPLE_POLICY), "--as", AS_MCP, "GET",
                       "https://graph.microsoft.com/v1.0/users?$top=5")
    assert code == 0
    assert f"principal: app={MCP} oid={OID} tenant={TENANT} auth=unknown sources=bearer app_only=true" in out
    assert "operation: GET graph.microsoft.com /v1.0/users  ?$top=5" in out
    line = next(n for n, text in enumerate(EXAMPLE_POLICY.read_text().splitlines(), 1) if "- id: directory-read" in text)
    assert f"decision:  ALLOW by rule 'directory-read' ({EXAMPLE_POLICY}:{line}:5), mask profile directory-pii" in out
    assert "reason:    allowed by rule 'directory-read'" in out
    # the other rules that named this request, and what they made of it
    assert "no-key-material" in out and "does not apply: the request keeps within its odata limits" in out
    assert "-> directory-read" in out


def test_explain_a_deny_names_the_rule_and_every_rule_that_matched(capsys):
    code, out, _ = policy_cli(capsys, "explain", str(EXAMPLE_POLICY), "--as", AS_MCP, "POST",
                       f"https://graph.microsoft.com/v1.0/applications(appId='{MCP}')/addPassword")
    assert code == 1
    assert "decision:  DENY, rule 'no-credential-minting'" in out
    assert "reason:    denied by rule 'no-credential-minting'" in out


def test_explain_a_broken_odata_limit(capsys):
    code, out, _ = policy_cli(capsys, "explain", str(EXAMPLE_POLICY), "--as", AS_MCP, "GET",
                       "https://graph.microsoft.com/v1.0/users?$top=5000")
    assert code == 1
    assert "rule 'directory-read' would, but $top=5000 is more than 999 (odata.max_top)" in out
    assert "directory-read" in out and "does not apply: $top=5000 is more than 999" in out


def test_explain_an_approve_exits_3(capsys):
    path = SHIPPED_POLICIES / "credential-rotation.yaml"
    code, out, _ = policy_cli(capsys, "explain", str(path), "--as",
                       "app=7d2c4b1e-5f3a-4c6d-8e9f-0a1b2c3d4e5f,roles=Application.ReadWrite.OwnedBy,auth=certificate",
                       "POST", "https://graph.microsoft.com/v1.0/applications/x/addPassword",
                       "--at", "2025-07-07T09:00:00+02:00")
    assert code == 3
    assert "decision:  APPROVE by rule 'rotate-client-secrets'" in out
    assert "approval:  users=- groups=3c9d1f7a-2b4e-4f6a-8c0d-1e2f3a4b5c6d timeout=900s max_grant=1800s" in out
    code, out, _ = policy_cli(capsys, "explain", str(path), "--as",
                       "app=7d2c4b1e-5f3a-4c6d-8e9f-0a1b2c3d4e5f,roles=Application.ReadWrite.OwnedBy,auth=certificate",
                       "POST", "https://graph.microsoft.com/v1.0/applications/x/addPassword",
                       "--at", "2025-07-05T09:00:00+02:00")  # a Saturday
    assert code == 1
    assert "not in force (schedule: mon,tue,wed,thu,fri 08:00-18:00 Europe/Berlin)" in out


def test_explain_anonymous(capsys):
    code, out, _ = policy_cli(capsys, "explain", str(EXAMPLE_POLICY), "--as", "anonymous", "POST",
                       f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token")
    assert code == 0 and "principal: anonymous (no token)" in out and "rule 'token-endpoint'" in out
    code, out, _ = policy_cli(capsys, "explain", str(EXAMPLE_POLICY), "--as", "anonymous", "GET",
                       "https://graph.microsoft.com/v1.0/users")
    assert code == 1 and "DENY before any rule (identity stage, 401 InvalidAuthenticationToken)" in out


def _unsigned_token(**claims) -> str:
    def part(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"{part({'typ': 'JWT', 'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


def test_explain_reads_a_jwt_without_verifying_it_and_says_so(capsys):
    token = _unsigned_token(tid=TENANT, oid=OID, appid=MCP, appidacr="2", idtyp="app", ver="1.0",
                            roles=["User.Read.All"], app_displayname="mcp-directory")
    code, out, _ = policy_cli(capsys, "explain", str(EXAMPLE_POLICY), "--as", token, "GET", "https://graph.microsoft.com/v1.0/groups")
    assert code == 0
    assert "name=mcp-directory app=" in out and "auth=certificate" in out and "roles=User.Read.All" in out
    assert "UNVERIFIED: decoded for explain only; its signature, issuer, audience and lifetime were not checked" in out


def test_explain_reads_a_recorded_principal_or_claims_from_a_json_file(capsys, tmp_path):
    recorded = Principal(TENANT, OID, MCP, "mcp-directory", auth_method=AuthMethod.CERTIFICATE,
                         token_sources=(TokenSource.PROXY,))
    path = write(tmp_path, "who.json", json.dumps(recorded.to_dict()))
    code, out, _ = policy_cli(capsys, "explain", str(EXAMPLE_POLICY), "--as", str(path), "GET", "https://graph.microsoft.com/v1.0/users")
    assert code == 0 and "sources=proxy" in out and "UNVERIFIED" not in out
    claims = write(tmp_path, "claims.json", json.dumps({"tid": TENANT, "oid": OID, "appid": OTHER}))
    code, out, _ = policy_cli(capsys, "explain", str(EXAMPLE_POLICY), "--as", str(claims), "GET", "https://graph.microsoft.com/v1.0/users")
    assert code == 1 and "UNVERIFIED" in out


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://evil.example/x", "host 'evil.example' is not an upstream named in the policy"),
        ("http://graph.microsoft.com/v1.0/users", "plain HTTP to 'graph.microsoft.com' is refused"),
        ("https://graph.microsoft.com:8443/v1.0/users", "port 8443 of 'graph.microsoft.com' is not allowed"),
        ("https://graph.microsoft.com/v1.0/users/%2F..", "the request target cannot be judged safely: encoded slash"),
    ],
)
def test_explain_shows_refusals_made_before_any_rule(capsys, url, reason):
    code, out, _ = policy_cli(capsys, "explain", str(EXAMPLE_POLICY), "--as", AS_MCP, "GET", url)
    assert code == 1 and reason in out and "before any rule" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--as", "app=x,colour=blue", "GET", "https://graph.microsoft.com/v1.0/users"], "cannot read 'colour=blue'"),
        (["--as", "auth=cert", "GET", "https://graph.microsoft.com/v1.0/users"], "auth must be one of"),
        (["--as", "sources=header", "GET", "https://graph.microsoft.com/v1.0/users"], "sources are proxy and/or bearer"),
        (["--as", "bob", "GET", "https://graph.microsoft.com/v1.0/users"], "expected 'anonymous'"),
        (["--as", "eyJhbGciOiJSUzI1NiJ9.e30.x", "GET", "https://graph.microsoft.com/v1.0/users"], "has no tid or oid claim"),
        (["--as", AS_MCP, "GET", "graph.microsoft.com/v1.0/users"], "give a full URL"),
    ],
)
def test_explain_usage_errors_exit_2(capsys, argv, message):
    code, _, err = policy_cli(capsys, "explain", str(EXAMPLE_POLICY), *argv)
    assert code == 2 and message in err


def test_explain_a_broken_policy_exits_2_with_its_position(capsys, tmp_path):
    path = write(tmp_path, "p.yaml", HEAD + "- id: r\n  action: permit\n  operations: []\n")
    code, _, err = policy_cli(capsys, "explain", str(path), "--as", "anonymous", "GET", "https://graph.microsoft.com/")
    assert code == 2 and f"{path}:15:11:" in err


def test_explain_time_needs_an_offset():
    with pytest.raises(SystemExit) as e:
        main(["policy", "explain", str(EXAMPLE_POLICY), "--as", "anonymous", "GET", "https://graph.microsoft.com/",
              "--at", "2025-07-07T09:00"])
    assert e.value.code == 2


# --- replay ---------------------------------------------------------------------------------------

def decided(policy, method: str, target: str, who=MCP_PRINCIPAL, host: str = GRAPH_HOST) -> Decision:
    return policy.decide(who, Operation.from_request(method, "https", host, 443, target), RECORDED_AT)


@pytest.fixture
def recording(tmp_path) -> Path:
    """Traffic decided under example.yaml, written with mitmproxy's FlowWriter."""
    example = load_policy(EXAMPLE_POLICY)
    flows = [
        recorded("GET", "/v1.0/users?$top=5", decided(example, "GET", "/v1.0/users?$top=5")),
        recorded("GET", "/v1.0/groups", decided(example, "GET", "/v1.0/groups")),
        recorded("POST", "/v1.0/applications/x/addPassword", decided(example, "POST", "/v1.0/applications/x/addPassword")),
        recorded("DELETE", "/v1.0/users/x", decided(example, "DELETE", "/v1.0/users/x")),
        # refused before the rules: never counted as a change
        recorded("GET", "/v1.0/users", Decision.deny(Stage.IDENTITY, 401, "InvalidAuthenticationToken",
                                                     "bearer token refused: signature", check="signature")),
        recorded("GET", "/v1.0/users", None),
        # allowed by the rules, withheld by masking afterwards
        recorded("GET", "/v1.0/users/y", Decision.deny(Stage.MASKING, 502, "BadGateway", "withheld",
                                                       check="masking", rule_id="directory-read",
                                                       principal=MCP_PRINCIPAL.to_dict())),
    ]
    day = tmp_path / "recordings" / "2025-07-07" / TENANT
    day.mkdir(parents=True)
    with open(day / f"mcp-directory--{OID}.mitm", "wb") as f:
        writer = io.FlowWriter(f)
        for flow in flows:
            writer.add(flow)
    return tmp_path / "recordings"


def test_replay_under_the_same_policy_changes_nothing(capsys, recording):
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(EXAMPLE_POLICY), str(recording))
    assert code == 0, out
    assert "CHANGED" not in out
    assert out.count("SKIPPED") == 2
    assert "refused at the identity stage (signature) before any rule" in out
    assert "no decision was recorded" in out
    assert "replayed 7 flows from 1 files" in out and "5 re-decided, 0 would change" in out


def test_replay_lists_each_flow_whose_decision_would_change(capsys, recording, tmp_path):
    stricter = EXAMPLE_POLICY.read_text().replace('          - "/groups/**"\n', "", 1)  # no more group reads
    assert stricter != EXAMPLE_POLICY.read_text()
    looser = stricter.replace("      - host: graph.microsoft.com\n        methods: [GET]\n        # No version",
                              "      - host: graph.microsoft.com\n        methods: [GET, DELETE]\n        # No version", 1)
    assert looser != stricter
    new = write(tmp_path, "new.yaml", looser)
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(new), str(recording))
    assert code == 1
    changed = [block for block in out.split("CHANGED  ")[1:]]
    assert len(changed) == 2, out
    groups = next(b for b in changed if "/v1.0/groups" in b)
    assert "by mcp-directory" in groups
    assert "allow (directory-read, mask directory-pii) -> deny (no rule)" in groups
    assert "new reason: no rule allows GET graph.microsoft.com /v1.0/groups" in groups
    assert "mcp-directory--" in groups  # which recording
    delete = next(b for b in changed if "DELETE" in b)
    assert "deny (no rule) -> allow (directory-read, mask directory-pii)" in delete
    assert "2 would change" in out and "2 skipped" in out


def test_replay_counts_a_new_mask_profile_as_a_change(capsys, recording, tmp_path):
    text = EXAMPLE_POLICY.read_text().replace("    mask: directory-pii\n", "", 1).replace("  default_profile: directory-pii\n", "", 1)
    new = write(tmp_path, "unmasked.yaml", text)
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(new), str(recording))
    assert code == 1
    assert "allow (directory-read, mask directory-pii) -> allow (directory-read)" in out


def test_replay_when_an_upstream_is_dropped(capsys, recording, tmp_path):
    text = EXAMPLE_POLICY.read_text()
    new = write(tmp_path, "no-graph.yaml", text[: text.index("\nrules:") + 1].replace(
        "  - host: graph.microsoft.com\n    token: any\n", "") + "rules: []\n")
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(new), str(recording))
    assert code == 1
    assert "allow (directory-read, mask directory-pii) -> deny (upstream)" in out


def test_replay_decides_at_the_recorded_time(capsys, recording, tmp_path):
    office_hours = EXAMPLE_POLICY.read_text().replace(
        "    odata:\n      max_top: 999\n",
        "    odata:\n      max_top: 999\n    schedule: {days: [mon-fri], hours: ['08:00-18:00'], timezone: UTC}\n", 1)
    new = write(tmp_path, "office.yaml", office_hours)
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(new), str(recording))
    assert code == 0, out  # recorded on a Monday at 09:30 UTC
    night = write(tmp_path, "night.yaml", office_hours.replace("08:00-18:00", "20:00-24:00"))
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(night), str(recording))
    assert code == 1 and "allow (directory-read, mask directory-pii) -> deny (no rule)" in out


def test_replay_input_errors_exit_2(capsys, tmp_path, recording):
    code, _, err = policy_cli(capsys, "replay", "--policy", str(EXAMPLE_POLICY), str(tmp_path / "missing"))
    assert code == 2 and "no such file or directory" in err
    text = EXAMPLE_POLICY.read_text()
    bad = write(tmp_path, "bad.yaml", text.replace("\nversion: 1\n", "\nversion: 2\n"))
    line = text.splitlines().index("version: 1") + 1
    code, _, err = policy_cli(capsys, "replay", "--policy", str(bad), str(recording))
    assert code == 2 and f"{bad}:{line}:10: unsupported policy version 2" in err


def test_replay_reads_a_truncated_recording_up_to_the_last_whole_flow(capsys, recording):
    path = next(recording.rglob("*.mitm"))
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    code, out, err = policy_cli(capsys, "replay", "--policy", str(EXAMPLE_POLICY), str(path))
    assert code == 0
    assert "replayed 6 flows from 1 files" in out


def test_replay_judges_a_recorded_batch_again_request_by_request(capsys, tmp_path):
    from nhi_gateway.policy.batch import judge_batch

    example = load_policy(EXAMPLE_POLICY)
    body = json.dumps({"requests": [{"id": "1", "method": "GET", "url": "/users"},
                                    {"id": "2", "method": "GET", "url": "groups?$top=3"}]}).encode()
    outer = Operation.from_request("POST", "https", GRAPH_HOST, 443, "/v1.0/$batch")
    old = judge_batch(example, MCP_PRINCIPAL, outer, body, "application/json")
    assert old.allowed
    flow = recorded("POST", "/v1.0/$batch", old)
    flow.request.headers["content-type"] = "application/json"
    flow.request.content = body
    path = tmp_path / "batch.mitm"
    with open(path, "wb") as f:
        io.FlowWriter(f).add(flow)
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(EXAMPLE_POLICY), str(path))
    assert code == 0 and "1 re-decided, 0 would change" in out, out
    no_groups = write(tmp_path, "no-groups.yaml", EXAMPLE_POLICY.read_text().replace('          - "/groups/**"\n', "", 1))
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(no_groups), str(path))
    assert code == 1
    assert "CHANGED  flow" in out and "POST graph.microsoft.com /v1.0/$batch" in out
    assert "allow (batch of 2) -> deny (batch of 2; refused: 2)" in out
    assert "new reason: " in out and "2" in out.split("new reason: ", 1)[1].splitlines()[0]


def test_replay_judges_every_token_a_recorded_request_presented(capsys, tmp_path):
    """A request that carried two tokens is re-decided for each (issue 13, item 2): a policy that
    keeps client secrets out refuses it when either token came from a secret."""
    from dataclasses import replace

    proxy = replace(MCP_PRINCIPAL, token_sources=(TokenSource.PROXY,), auth_method=AuthMethod.CLIENT_SECRET)
    both = replace(MCP_PRINCIPAL, token_sources=(TokenSource.BEARER, TokenSource.PROXY),
                   presented=(proxy, MCP_PRINCIPAL))
    assert Principal.from_dict(both.to_dict()).every_token() == (proxy, MCP_PRINCIPAL)
    example = load_policy(EXAMPLE_POLICY)
    decision = decided(example, "GET", "/v1.0/users").but(principal=both.to_dict())
    day = tmp_path / "recordings" / "2025-07-07" / TENANT
    day.mkdir(parents=True)
    with open(day / f"mcp-directory--{OID}.mitm", "wb") as f:
        io.FlowWriter(f).add(recorded("GET", "/v1.0/users", decision))
    strict = write(tmp_path, "strict.yaml", EXAMPLE_POLICY.read_text().replace(
        "  - id: directory-read\n", "  - id: no-secrets\n    action: deny\n    when: {auth_methods: [client_secret]}\n"
        "    operations:\n      - host: graph.microsoft.com\n        methods: [\"*\"]\n        paths: [\"/**\"]\n"
        "  - id: directory-read\n", 1))
    code, out, _ = policy_cli(capsys, "replay", "--policy", str(strict), str(tmp_path / "recordings"))
    assert code == 1, out
    assert "deny (no-secrets)" in out and "the proxy token (client_secret)" in out


def test_explain_judges_a_batch_from_its_body_as_the_gateway_does(capsys, tmp_path):
    body = write(tmp_path, "batch.json", json.dumps({"requests": [
        {"id": "1", "method": "GET", "url": "/users"},
        {"id": "2", "method": "POST", "url": "/applications/x/addPassword",
         "headers": {"Content-Type": "application/json"}, "body": {}}]}))
    argv = ["explain", str(EXAMPLE_POLICY), "--as", f"app={MCP},auth=client_secret", "POST",
            "https://graph.microsoft.com/v1.0/$batch"]
    code, out, _ = policy_cli(capsys, *argv, "--body", str(body))
    assert code == 1
    assert "decision:  DENY (403 Authorization_RequestDenied)" in out
    assert re.search(r"\n  1  ALLOW +GET graph.microsoft.com /v1.0/users rule 'directory-read'", out), out
    assert re.search(r"\n  2  DENY +POST graph.microsoft.com /v1.0/applications/x/addpassword rule "
                     r"'no-credential-minting'", out), out
    body.write_text(json.dumps({"requests": [{"id": "1", "method": "GET", "url": "/users"}]}))
    code, out, _ = policy_cli(capsys, *argv, "--body", str(body))
    assert code == 0 and "decision:  ALLOW" in out
    code, _, err = policy_cli(capsys, *argv)
    assert code == 2 and "give its body with --body FILE" in err


LITERAL_OBJECT = HEAD + f"""\
- id: protected-app
  action: deny
  operations: [{{host: graph.microsoft.com, methods: [POST], paths: ["/applications/{OTHER}/addPassword"]}}]
- id: any-app
  action: allow
  operations: [{{host: graph.microsoft.com, methods: [POST], paths: ["/applications/{{id}}/addPassword"]}}]
"""


def test_lint_warns_about_rules_on_literal_objects_the_deployment_cannot_resolve(capsys, tmp_path, monkeypatch):
    """Without the gateway's Graph credential, a request naming that application by appId or
    uniqueName cannot be related to the id the rule names: lint says so (issue 18, item 1)."""
    for name in ("NHI_GRAPH_CLIENT_ID", "NHI_GRAPH_TENANT_ID", "NHI_GRAPH_CLIENT_SECRET", "NHI_GRAPH_CERTIFICATE",
                 "NHI_GRAPH_CERTIFICATE_KEY"):
        monkeypatch.delenv(name, raising=False)
    path = write(tmp_path, "p.yaml", LITERAL_OBJECT)
    code, out, _ = policy_cli(capsys, "lint", str(path))
    assert code == 0
    assert f"{path}:14:3: warning: rule 'protected-app' names an object by id" in out
    assert "no Graph credential is configured" in out and "refused (503)" in out
    assert "rule 'any-app'" not in out
    monkeypatch.setenv("NHI_GRAPH_CLIENT_ID", OTHER)
    monkeypatch.setenv("NHI_GRAPH_TENANT_ID", TENANT)
    monkeypatch.setenv("NHI_GRAPH_CLIENT_SECRET", "not-a-real-secret")
    code, out, _ = policy_cli(capsys, "lint", str(path))
    assert "warning" not in out


def test_explain_says_when_the_gateway_would_resolve_the_object_first(capsys, tmp_path):
    path = write(tmp_path, "p.yaml", LITERAL_OBJECT)
    code, out, _ = policy_cli(capsys, "explain", str(path), "--as", f"app={MCP},oid={OID},tenant={TENANT}", "POST",
                       f"https://graph.microsoft.com/v1.0/applications(appId='{MCP}')/addPassword")
    assert "object:    applications by appid" in out and "'protected-app'" in out
