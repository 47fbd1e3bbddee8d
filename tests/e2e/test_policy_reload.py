"""Editing the policy of a running gateway: a valid edit takes effect within seconds; a broken edit
or a deleted file leaves the last good policy in force. Then the recording of this very traffic is
replayed under the edited policy, as CI would before an edit ships.

The real gateway process, a real client (requests) through HTTPS_PROXY with the gateway's CA.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import requests

from nhi_gateway.policy.loader import load_policy

from ..support import e2e
from ..support.e2e import GRAPH
from .conftest import EXAMPLE_POLICY, gateway_running

DEADLINE = 6.0  # seconds: the gateway polls the file every second

NO_USERS = """
  - id: no-user-reads
    description: Added while the gateway runs.
    action: deny
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users/**"]
"""


@pytest.fixture
def running(tmp_path, lookalike):
    policy = tmp_path / "policy.yaml"
    policy.write_text(EXAMPLE_POLICY.read_text())
    # Unbuffered: the test reads the gateway's log while it runs.
    with gateway_running(tmp_path / "gw", lookalike, policy=policy, env={"PYTHONUNBUFFERED": "1"}) as gw:
        yield gw, policy


def get(gw, token: str, path: str) -> requests.Response:
    mark = uuid.uuid4().hex[:8]
    sep = "&" if "?" in path else "?"
    return requests.get(f"{GRAPH}{path}{sep}m={mark}", headers={"Authorization": f"Bearer {token}"},
                        proxies={"https": gw.proxy()}, verify=gw.ca_cert, timeout=20)


def until(predicate, what: str, deadline: float = DEADLINE):
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``deadline`` seconds."""
    return e2e.until(predicate, what, deadline, interval=0.2)


def log_has(gw, text: str) -> bool:
    return text in gw.log.read_text(errors="replace")


def test_edits_take_effect_bad_edits_and_deletions_keep_the_last_good_policy(running, tokens):
    gw, policy = running
    token = tokens()
    assert get(gw, token, "/v1.0/users").status_code == 200
    assert get(gw, token, "/v1.0/groups").status_code == 200
    original = policy.read_text()

    # 1. A valid edit: user reads are denied within seconds, the rest of the policy stays.
    policy.write_text(original + NO_USERS)
    refused = until(lambda: (r := get(gw, token, "/v1.0/users")).status_code == 403 and [r],
                    "the edit denying /users took effect")[0]  # (a 403 Response is falsy)
    assert refused.json()["error"]["innerError"]["nhi-gateway"]["rule"] == "no-user-reads"
    assert get(gw, token, "/v1.0/groups").status_code == 200
    rules = len(load_policy(policy).rules)
    until(lambda: log_has(gw, f"policy reloaded from {policy}: generation 2, {rules} rules"),
          "a log line for the reload")

    # 2. A broken edit: refused, logged with file:line:column, the last good policy stays.
    broken = (original + NO_USERS).replace("action: deny\n    operations:\n      - host: graph.microsoft.com\n"
                                           "        methods: [GET]\n        paths: [\"/users/**\"]",
                                           "action: deny\n    operations:\n      - host: graph.microsoft.com\n"
                                           "        methods: [GTE]\n        paths: [\"/users/**\"]")
    assert broken != original + NO_USERS
    policy.write_text(broken)
    line = broken.splitlines().index("        methods: [GTE]") + 1
    column = broken.splitlines()[line - 1].index("GTE") + 1
    until(lambda: log_has(gw, f"{policy}:{line}:{column}: rule 'no-user-reads': operations[0].methods[0]: "
                              "unknown method 'GTE'"),
          "the broken edit was logged with its file:line:column")
    assert log_has(gw, "the last good policy (generation 2) stays in force")
    assert get(gw, token, "/v1.0/users").status_code == 403  # the last good policy: the deny holds
    assert get(gw, token, "/v1.0/groups").status_code == 200  # ... and so does everything else

    # 3. The file disappears: loudly logged, the last good policy stays.
    policy.unlink()
    until(lambda: log_has(gw, f"policy file {policy} is gone"), "the deletion was logged")
    assert get(gw, token, "/v1.0/users").status_code == 403
    assert get(gw, token, "/v1.0/groups").status_code == 200

    # 4. A valid file comes back: it takes effect.
    policy.write_text(original)
    until(lambda: get(gw, token, "/v1.0/users").status_code == 200, "the restored policy took effect")
    assert gw.proc.poll() is None  # the gateway never stopped


def test_replay_of_the_gateway_s_own_recording_lists_what_an_edit_would_change(running, tokens, tmp_path):
    gw, policy = running
    token = tokens()
    assert get(gw, token, "/v1.0/users?$top=2").status_code == 200
    assert get(gw, token, "/v1.0/groups").status_code == 200
    assert get(gw, "not-a-token", "/v1.0/users").status_code == 401  # refused before the rules
    until(lambda: len(list(gw.recordings.rglob("*.mitm"))) >= 2, "the recordings were written")

    def replay(new_policy):
        return subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", "policy", "replay", "--policy",
                               str(new_policy), str(gw.recordings)], capture_output=True, text=True, timeout=60)

    same = replay(policy)
    assert same.returncode == 0, same.stdout + same.stderr
    assert "0 would change" in same.stdout and "SKIPPED" in same.stdout

    edited = tmp_path / "edited.yaml"
    edited.write_text(policy.read_text() + NO_USERS)
    out = replay(edited)
    assert out.returncode == 1, out.stdout + out.stderr
    changed = out.stdout.split("CHANGED  ")[1:]
    assert len(changed) == 1, out.stdout
    assert "GET graph.microsoft.com /v1.0/users" in changed[0] and "by mcp-directory" in changed[0]
    assert "allow (directory-read, mask directory-pii) -> deny (no-user-reads)" in changed[0]
    assert "refused at the identity stage" in out.stdout  # the bad token: skipped, not a change
    assert "1 would change" in out.stdout


CORRUPTIONS = {
    "emptied": lambda good: b"",
    "not UTF-8": lambda good: b"\xff\xfe" + good.encode("utf-16-le")[:200],
    "cut off mid-line, as by a crash while saving": lambda good: good.encode()[: good.rindex('paths: ["/users') + 12],
    "not a policy at all": lambda good: b"just a string\n",
}


def test_a_corrupted_or_replaced_policy_file_keeps_the_last_good_policy(running, tokens):
    gw, policy = running
    token = tokens()
    good = policy.read_text() + NO_USERS
    policy.write_text(good)
    until(lambda: get(gw, token, "/v1.0/users").status_code == 403, "the deny rule took effect")

    def refusals() -> int:
        return gw.log.read_text(errors="replace").count("policy reload refused")

    for name, corrupt in CORRUPTIONS.items():
        seen = refusals()
        policy.write_bytes(corrupt(good))
        until(lambda: refusals() > seen, f"the {name} file was refused")
        assert get(gw, token, "/v1.0/users").status_code == 403, name  # the last good policy holds
        assert get(gw, token, "/v1.0/groups").status_code == 200, name
        policy.write_text(good + f"# {name}\n")  # a good file again (a new one, so it is read)

    # A directory where the file was: unreadable, refused the same way.
    seen = refusals()
    policy.unlink()
    policy.mkdir()
    until(lambda: refusals() > seen, "the directory was refused")
    assert get(gw, token, "/v1.0/users").status_code == 403
    policy.rmdir()
    policy.write_text(good)
    assert gw.proc.poll() is None
