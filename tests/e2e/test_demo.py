"""`nhi-gateway demo`, run the way a new user runs it: one command, real processes on loopback."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nhi_gateway.masking.masks import MASK

pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    workdir = tmp_path_factory.mktemp("demo")
    done = subprocess.run(
        [sys.executable, "-m", "nhi_gateway.cli.main", "demo", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=120,
    )
    return done, workdir


def _row(output: str, label: str) -> str:
    lines = [line for line in output.splitlines() if label in line]
    assert lines, f"no table row for {label!r} in:\n{output}"
    return lines[0]


def test_demo_succeeds(demo):
    done, _ = demo
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All 6 steps had the expected outcome" in done.stdout


@pytest.mark.parametrize(
    "label, status, decision, upstream",
    [
        ("get a token (client credentials)", "200", "allow (rule token-endpoint)", "reached"),
        ("list users, token in Authorization", "200", "allow (rule directory-read)", "reached"),
        ("list users, token in proxy credentials", "200", "allow (rule directory-read)", "reached"),
        ("add a client secret to an app", "403", "deny (rule no-credential-minting)", "not reached"),
        ("list users with a tampered token", "401", "deny (check signature)", "not reached"),
        ("rotate a secret, approved by a person", "200", "allow (rule secret-rotation)", "reached"),
    ],
)
def test_each_step_shows_the_gateways_decision(demo, label, status, decision, upstream):
    done, _ = demo
    row = _row(done.stdout, label)
    assert re.search(rf"\s{status}\s", row), row
    assert f"{decision}  " in row, row
    assert re.search(rf"\s{upstream}\s", row), row
    assert "unexpected" not in row, row


def test_reads_show_masked_fields(demo):
    done, _ = demo
    row = _row(done.stdout, "list users, token in Authorization")
    assert "5 users" in row and MASK in row, row


def test_prints_how_to_open_the_recordings(demo):
    done, workdir = demo
    out = done.stdout
    recordings = sorted((workdir / "recordings").rglob("*.mitm"))
    assert recordings
    for path in recordings:
        assert str(path.relative_to(workdir / "recordings")) in out
    bin_dir = Path(sys.executable).parent
    assert re.search(rf"{re.escape(str(bin_dir / 'mitmweb'))} -n -r \S+\.mitm", out), out
    assert re.search(rf"{re.escape(str(bin_dir / 'mitmdump'))} -nr \S+\.mitm", out), out
    audit = workdir / "recordings" / "audit.jsonl"
    lines = audit.read_text().splitlines()
    assert f"{audit}  ({len(lines)} lines" in out


def test_the_printed_command_opens_the_recording(demo):
    done, _ = demo
    command = re.search(r"^\s+(\S+mitmdump -nr \S+)$", done.stdout, re.M)
    assert command, done.stdout
    shown = subprocess.run(shlex.split(command.group(1)), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "graph.microsoft.com" in shown.stdout


def test_the_approval_is_shown_from_request_to_answer(demo):
    done, workdir = demo
    out = done.stdout
    row = _row(out, "rotate a secret, approved by a person")
    assert "approved by Adele Vance" in row and f"secretText: {MASK}" in row, row
    approval = re.search(r"\$ nhi-gateway approvals approve (apr-\S+) --reason", out)
    assert approval, out
    assert "$ nhi-gateway approvals list" in out and f"approved {approval.group(1)}" in out
    records = [json.loads(line) for line in (workdir / "recordings" / "audit.jsonl").read_text().splitlines()]
    events = [r.get("event") for r in records if approval.group(1) in json.dumps(r.get("approval"))]
    assert events == ["approval_requested", "approval_approved"]


def test_audit_names_every_step(demo):
    _, workdir = demo
    records = [json.loads(line) for line in (workdir / "recordings" / "audit.jsonl").read_text().splitlines()]
    decided = {(r["method"], r["decision"], r.get("rule") or r.get("check")) for r in records}
    assert ("POST", "deny", "no-credential-minting") in decided
    assert ("GET", "deny", "signature") in decided
    assert ("GET", "allow", "directory-read") in decided


def test_services_are_stopped(demo):
    _, workdir = demo
    for ready in ("gateway.json", "lookalike/lookalike.json"):
        pid = json.loads((workdir / ready).read_text())["pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_replaying_the_demo_under_its_own_policy_changes_nothing(demo):
    """Approved flows and calls to the approval API are decided as the gateway decided them."""
    _, workdir = demo
    done = subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", "policy", "replay", "--policy",
                           str(workdir / "policy.yaml"), str(workdir / "recordings")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CHANGED" not in done.stdout and " 0 would change" in done.stdout
    assert "a call to the gateway's approval API" in done.stdout


def test_permissions_of_the_demos_identities(demo):
    _, workdir = demo
    done = subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", "permissions", "--json",
                           str(workdir / "recordings")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    advice = {i["name"]: i for i in json.loads(done.stdout)["identities"]}
    assert advice["mcp-directory"]["summary"] == (
        "holds Group.Read.All (level 3), User.Read.All (level 3); what it did needs User.ReadBasic.All (level 3)")
    assert [p["name"] for p in advice["rotation-bot"]["needed"]] == ["Application.ReadWrite.OwnedBy"]
    assert advice["rotation-bot"]["excess"] == []
