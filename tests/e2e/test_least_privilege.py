"""The path to least privilege, end to end, with the demo's own workload (an MCP server driven by an
MCP client session, through the real gateway, to the look-alike Entra and Graph):

1. the example policy in report mode: the workload runs, what a rule would refuse is forwarded and
   reported (audit line, recording), and a forged token is still refused;
2. ``policy suggest`` writes a least-privilege policy from the recordings; it lints;
3. ``policy replay`` of the same recordings under it changes no decision;
4. the gateway enforces it: what the workload did still works, a request outside it is refused and
   never reaches Graph.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests
from mitmproxy import io

from nhi_gateway.demo.workload import run_workload, steps

from .conftest import EXAMPLE_POLICY, start_gateway, stop

pytestmark = pytest.mark.timeout(240)
CLI = [sys.executable, "-m", "nhi_gateway.cli.main"]


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120)


def report_mode(policy: Path, out: Path) -> Path:
    text = policy.read_text()
    assert "\nversion: 1\n" in text
    out.write_text(text.replace("\nversion: 1\n", "\nversion: 1\nmode: report\n", 1))
    return out


def workload_env(gateway, lookalike) -> dict[str, str]:
    app = lookalike.app("mcp-directory")
    return {"HTTPS_PROXY": gateway.proxy(), "SSL_CERT_FILE": gateway.ca_cert, "REQUESTS_CA_BUNDLE": gateway.ca_cert,
            "AZURE_TENANT_ID": lookalike.tenant_id, "AZURE_CLIENT_ID": app["client_id"],
            "AZURE_CLIENT_SECRET": app["secret"]}


def token_for(gateway, lookalike) -> str:
    app = lookalike.app("mcp-directory")
    proxies = {"https": gateway.proxy()}
    r = requests.post(f"https://login.microsoftonline.com/{lookalike.tenant_id}/oauth2/v2.0/token",
                      data={"grant_type": "client_credentials", "client_id": app["client_id"],
                            "client_secret": app["secret"], "scope": "https://graph.microsoft.com/.default"},
                      proxies=proxies, verify=gateway.ca_cert, timeout=20)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


def graph(gateway, token: str, method: str, path: str, **kw) -> requests.Response:
    return requests.request(method, f"https://graph.microsoft.com{path}", headers={"Authorization": f"Bearer {token}"},
                            proxies={"https": gateway.proxy()}, verify=gateway.ca_cert, timeout=20, **kw)


def test_report_mode_then_suggest_replay_and_enforce(tmp_path, lookalike):
    app = lookalike.app("mcp-directory")
    # 1. Watch: the example policy, every deny and hold only reported.
    watching = report_mode(EXAMPLE_POLICY, tmp_path / "report.yaml")
    gw = start_gateway(tmp_path / "watch", lookalike, policy=watching)
    try:
        audit = gw.recordings / "audit.jsonl"
        with open(tmp_path / "mcp.log", "w") as errlog:
            outcomes = run_workload(workload_env(gw, lookalike), steps(app["application_object_id"]), audit,
                                    lookalike.state_dir / "received.jsonl", errlog)
        # The request checks never only report: a target the gateway cannot read is still refused.
        mark = uuid.uuid4().hex[:12]
        r = graph(gw, token_for(gw, lookalike), "GET", f"/v1.0/users%2F..%2Fgroups?m={mark}")
        assert r.status_code == 400, r.text
        assert not any(mark in line.get("path", "") for line in lookalike.received())
    finally:
        stop(gw.proc)
    assert "REPORT MODE: the policy is in mode: report" in gw.log.read_text()
    by_tool = {o.step.tool: o for o in outcomes}
    assert by_tool["list_users"].status == 200 and by_tool["list_users"].forwarded
    # What no-credential-minting would refuse went through (Graph itself answers: mcp-directory
    # holds no permission for it), and says so everywhere.
    minting = by_tool["add_app_password"]
    assert minting.forwarded and minting.action == "allow", minting
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    reported = [r for r in records if r.get("report")]
    assert [(r["method"], r["decision"], r["report"]["would"], r["report"]["rule"]) for r in reported] == [
        ("POST", "allow", "deny", "no-credential-minting")]
    assert "would deny by rule 'no-credential-minting'" in reported[0]["reason"]
    flows = [f for p in gw.recording_files() for f in io.FlowReader(p.open("rb")).stream()]
    [flow] = [f for f in flows if f.id == reported[0]["flow_id"]]
    assert flow.marked == ":warning:" and flow.comment.startswith("WOULD DENY by rule no-credential-minting")
    # Token verification never only reports: the tampered token was refused and not forwarded.
    tampered = by_tool["list_users_with_bad_token"]
    assert tampered.status == 401 and not tampered.forwarded

    # 2. Suggest a least-privilege policy from what was recorded; it lints.
    suggested = tmp_path / "suggested.yaml"
    done = cli("policy", "suggest", "--base", str(watching), str(gw.recordings), "-o", str(suggested))
    assert done.returncode == 0, done.stderr
    done = cli("policy", "lint", "--strict", str(suggested))
    assert done.returncode == 0, done.stdout
    assert "mode: report" not in suggested.read_text()  # the suggestion enforces

    # 3. Replay the same recordings under it: no decision changes.
    done = cli("policy", "replay", "--policy", str(suggested), str(gw.recordings))
    assert done.returncode == 0 and "0 would change" in done.stdout, done.stdout

    # 4. Enforce it.
    gw = start_gateway(tmp_path / "enforce", lookalike, policy=suggested)
    try:
        assert "REPORT MODE" not in gw.log.read_text()
        token = token_for(gw, lookalike)
        assert graph(gw, token, "GET", "/v1.0/users?$top=5").status_code == 200  # what it did, still works
        for method, path in (("GET", "/v1.0/groups"), ("GET", f"/v1.0/users/{uuid.uuid4()}"),
                             ("POST", f"/v1.0/applications/{app['application_object_id']}/addPassword")):
            mark = uuid.uuid4().hex[:12]
            target = f"{path}{'&' if '?' in path else '?'}m={mark}"
            r = graph(gw, token, method, target, json={} if method == "POST" else None)
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["code"] == "Authorization_RequestDenied"
            assert not any(mark in line.get("path", "") for line in lookalike.received()), (method, path)
    finally:
        stop(gw.proc)
