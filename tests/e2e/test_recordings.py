"""What the real gateway keeps: recordings that show what the client saw, hold no credential, rotate
by size and by hour, stay readable by stock mitmdump, and lose nothing: under load every request
is recorded and audited exactly once, and a ``kill -9`` loses at most the flows in progress."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from nhi_gateway.recording.files import scan

from ..support.e2e import GRAPH, cli, marker, session_for
from .conftest import BIN, REFUSING_RULE, gateway_running, policy_with_a_deny_rule, start_with_a_deny_rule, stop

@pytest.fixture(scope="module")
def gateway(tmp_path_factory, lookalike):
    workdir = tmp_path_factory.mktemp("recordings-gateway")
    with gateway_running(workdir, lookalike, policy=policy_with_a_deny_rule(workdir)) as gw:
        yield gw


def recorded_flows(recordings: Path) -> list:
    """Every whole flow in every recording (a torn last flow is not one)."""
    from mitmproxy import exceptions, io

    flows = []
    for path in sorted(recordings.rglob("*.mitm")):
        with open(path, "rb") as fh:
            try:
                flows.extend(io.FlowReader(fh).stream())
            except exceptions.FlowReadException:
                pass
    return flows


def mitmdump(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mitmdump"), "-nr", str(path), *args], capture_output=True, text=True,
                          timeout=120)


def mitmdump_each(paths: list[Path]) -> dict[Path, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(paths, pool.map(mitmdump, paths)))


def audit_lines(path: Path) -> list[dict]:
    out = []
    for raw in path.read_bytes().split(b"\n"):
        try:
            out.append(json.loads(raw))
        except ValueError:
            pass  # a torn last line
    return out


# --- content and layout --------------------------------------------------------------------------


def test_the_recording_shows_what_the_client_saw(gateway, lookalike, tokens):
    mark = marker()
    client = session_for(gateway)
    r = client.get(f"{GRAPH}/v1.0/users?m={mark}", headers={"Authorization": f"Bearer {tokens()}"}, timeout=20)
    assert r.status_code == 200
    assert "[masked]" in r.text  # the example policy masks mail and userPrincipalName

    app = lookalike.app("mcp-directory")
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    path = gateway.recordings / today / lookalike.tenant_id / f"mcp-directory--{app['object_id']}.mitm"
    (flow,) = [f for f in recorded_flows(path.parent) if mark in f.request.path]
    assert flow.response.get_text() == r.text  # byte for byte what the client got: masked
    assert flow.response.status_code == 200
    assert flow.request.headers["Authorization"] == "Bearer [redacted]"


def test_token_requests_and_answers_are_recorded_without_their_secrets(gateway, lookalike):
    app = lookalike.app("mcp-directory")
    mark = marker()
    client = session_for(gateway)
    r = client.post(f"https://login.microsoftonline.com/{lookalike.tenant_id}/oauth2/v2.0/token?m={mark}",
                    data={"grant_type": "client_credentials", "client_id": app["client_id"],
                          "client_secret": app["secret"], "scope": "https://graph.microsoft.com/.default"},
                    timeout=20)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    (flow,) = [f for f in recorded_flows(gateway.recordings) if mark in f.request.path]
    assert "client_secret=[redacted]" in flow.request.get_text()
    assert f"client_id={app['client_id']}" in flow.request.get_text()
    answer = json.loads(flow.response.get_text())
    assert answer["access_token"] == "[redacted]" and answer["token_type"] == "Bearer"
    on_disk = b"".join(p.read_bytes() for p in gateway.recordings.rglob("*.mitm"))
    assert app["secret"].encode() not in on_disk and token.encode() not in on_disk


def test_stock_mitmdump_filters_recordings_by_the_decision_in_metadata(gateway, lookalike, tokens):
    mark = marker()
    client = session_for(gateway)
    app = lookalike.app("mcp-directory")
    bearer = {"Authorization": f"Bearer {tokens()}"}
    assert client.get(f"{GRAPH}/v1.0/users?m={mark}", headers=bearer, timeout=20).status_code == 200
    assert client.delete(f"{GRAPH}/v1.0/users/{app['object_id']}?m={mark}", headers=bearer,
                         timeout=20).status_code == 403
    (path,) = [p for p in gateway.recording_files() if p.name.startswith("mcp-directory--")]

    out = mitmdump(path, f'~meta "nhi.rule: {REFUSING_RULE}" & ~u {mark}')
    assert out.returncode == 0, out.stderr
    assert methods_shown(out.stdout) == ["DELETE"], out.stdout
    out = mitmdump(path, f'~meta "^nhi.decision: allow$" & ~u {mark}')
    assert methods_shown(out.stdout) == ["GET"], out.stdout


def methods_shown(mitmdump_output: str) -> list[str]:
    """The request lines mitmdump printed ("127.0.0.1:4711: GET https://...")."""
    return [m[1] for m in re.finditer(r"^\S+:\d+: ([A-Z]+) https://", mitmdump_output, re.MULTILINE)]


def test_recordings_rotate_by_size_and_hour_and_each_part_opens(tmp_path, lookalike, tokens):
    gw = start_with_a_deny_rule(tmp_path / "gw", lookalike,
                                ["--recordings-max-bytes", "8k", "--recordings-rotate", "hourly"])
    marks = [marker() for _ in range(12)]
    try:
        client = session_for(gw)
        for mark in marks:
            r = client.get(f"{GRAPH}/v1.0/users?m={mark}", headers={"Authorization": f"Bearer {tokens()}"},
                           timeout=20)
            assert r.status_code == 200
    finally:
        stop(gw.proc)
    app = lookalike.app("mcp-directory")
    files = [p for p in gw.recording_files() if p.name.startswith("mcp-directory--")]
    assert len(files) >= 3, files  # 12 flows of a few KiB each in parts of at most 8 KiB
    for path in files:
        assert path.name.startswith(f"mcp-directory--{app['object_id']}.")
        assert path.name.split(".")[1].endswith("h")  # the hour comes first, then the part
        assert path.stat().st_size <= 8192 or scan(path).records == 1
        out = mitmdump(path)
        assert out.returncode == 0, out.stderr
    seen = Counter(m for f in recorded_flows(gw.recordings) for m in marks if m in f.request.path)
    assert seen == Counter(marks)

    listed = cli("recordings", "list", "--recordings", str(gw.recordings), "mcp-directory")
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if "mcp-directory" in line]
    assert app["object_id"] in row and all(str(f) in row for f in files)


# --- nothing lost --------------------------------------------------------------------------------

KINDS = ("allowed", "refused", "bad-token")


def send(client: requests.Session, kind: str, mark: str, token: str, user_id: str) -> int:
    if kind == "allowed":
        r = client.get(f"{GRAPH}/v1.0/users?$top=2&m={mark}", headers={"Authorization": f"Bearer {token}"},
                       timeout=30)
    elif kind == "refused":
        r = client.delete(f"{GRAPH}/v1.0/users/{user_id}?m={mark}", headers={"Authorization": f"Bearer {token}"},
                          timeout=30)
    else:
        r = client.get(f"{GRAPH}/v1.0/users?m={mark}", headers={"Authorization": "Bearer not-a-token"},
                       timeout=30)
    return r.status_code


EXPECTED_STATUS = {"allowed": 200, "refused": 403, "bad-token": 401}


def test_under_load_every_request_is_audited_and_recorded_exactly_once(tmp_path, lookalike, tokens):
    gw = start_with_a_deny_rule(tmp_path / "gw", lookalike)
    token = tokens()
    user_id = lookalike.app("mcp-directory")["object_id"]
    requests_sent = [(KINDS[i % 3], f"load{i:03d}-{marker()}") for i in range(300)]
    local = threading.local()

    def one(item):
        if not hasattr(local, "client"):
            local.client = session_for(gw)
        kind, mark = item
        return mark, send(local.client, kind, mark, token, user_id)

    try:
        with ThreadPoolExecutor(max_workers=10) as pool:
            statuses = dict(pool.map(one, requests_sent))
    finally:
        stop(gw.proc)

    assert [statuses[mark] for _, mark in requests_sent] == [EXPECTED_STATUS[kind] for kind, _ in requests_sent]
    marks = [mark for _, mark in requests_sent]

    audit_path = gw.recordings / "audit.jsonl"
    audited = Counter(m for line in audit_lines(audit_path) for m in marks if m in (line.get("url") or ""))
    assert audited == Counter(marks), "each request must be in the audit trail exactly once"
    decisions = {line["url"].split("m=")[1]: (line["decision"], line["status"])
                 for line in audit_lines(audit_path) if "m=load" in (line.get("url") or "")}
    rules = {line["url"].split("m=")[1]: line["rule"]
             for line in audit_lines(audit_path) if "m=load" in (line.get("url") or "")}
    for kind, mark in requests_sent:
        assert decisions[mark] == ("allow" if kind == "allowed" else "deny", EXPECTED_STATUS[kind])
        if kind == "refused":
            assert rules[mark] == REFUSING_RULE

    recorded = Counter(m for f in recorded_flows(gw.recordings) for m in marks if m in f.request.path)
    assert recorded == Counter(marks), "each request must be in the recordings exactly once"

    verify = cli("audit", "verify", str(audit_path))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for path, out in mitmdump_each(gw.recording_files()).items():
        assert out.returncode == 0, (path, out.stderr)


def test_kill_9_loses_at_most_the_flows_in_progress_and_leaves_every_file_readable(tmp_path, lookalike, tokens):
    workdir = tmp_path / "gw"
    gw = start_with_a_deny_rule(workdir, lookalike, ["--recordings-max-bytes", "160k"])  # a few parts per app
    token = tokens()
    user_id = lookalike.app("mcp-directory")["object_id"]
    answered: dict[str, int] = {}  # marks whose response reached the client
    sent: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()
    stop_sending = threading.Event()

    def client_loop(n: int) -> None:
        client = session_for(gw)
        i = 0
        while not stop_sending.is_set():
            kind = KINDS[(n + i) % 3]
            mark = f"crash{n:02d}x{i:04d}-{marker()}"
            i += 1
            with lock:
                sent.append(mark)
            try:
                status = send(client, kind, mark, token, user_id)
            except requests.RequestException:
                return  # the gateway died while this one was in progress
            with lock:
                answered[mark] = status
                if len(answered) >= 200:
                    enough.set()

    threads = [threading.Thread(target=client_loop, args=(n,), daemon=True) for n in range(10)]
    for t in threads:
        t.start()
    try:
        assert enough.wait(120), f"the load never reached 200 answers (got {len(answered)})"
        gw.proc.kill()  # SIGKILL, in the middle of the burst
        gw.proc.wait()
    finally:
        stop_sending.set()
        for t in threads:
            t.join(60)
        stop(gw.proc)
    in_progress = set(sent) - set(answered)
    assert len(in_progress) <= 10  # one per client at most

    audit_path = gw.recordings / "audit.jsonl"
    files = gw.recording_files()
    assert files
    # Every file is readable right after the crash, or cut short only at its end (the next
    # start repairs that); nothing is corrupt.
    torn = [path for path, out in mitmdump_each(files).items() if out.returncode != 0]
    for path in torn:
        assert scan(path).problem == "torn", path
    verify = cli("audit", "verify", str(audit_path))
    assert verify.returncode in (0, 3), verify.stdout + verify.stderr  # 3: only a torn last line

    # Every request that got an answer was recorded and audited, once; of the ones in progress,
    # those that were written are there once too.
    recorded = Counter(m for f in recorded_flows(gw.recordings) for m in sent if m in f.request.path)
    audited = Counter(m for line in audit_lines(audit_path) for m in sent if m in (line.get("url") or ""))
    missing_recordings = [m for m in answered if recorded[m] != 1]
    missing_audit = [m for m in answered if audited[m] != 1]
    assert not missing_recordings, f"{len(missing_recordings)} answered requests are not recorded once"
    assert not missing_audit, f"{len(missing_audit)} answered requests are not audited once"
    assert all(n == 1 for n in recorded.values()) and all(n == 1 for n in audited.values())
    statuses = {line["url"].split("m=")[1]: line["status"] for line in audit_lines(audit_path)
                if "m=crash" in (line.get("url") or "")}
    assert all(statuses[m] == status for m, status in answered.items())

    # The next start recovers: every file opens in mitmdump, the chain verifies.
    again = start_with_a_deny_rule(workdir, lookalike)
    try:
        r = session_for(again).get(f"{GRAPH}/v1.0/users?m=after-{marker()}",
                                   headers={"Authorization": f"Bearer {token}"}, timeout=20)
        assert r.status_code == 200
    finally:
        stop(again.proc)
    for path, out in mitmdump_each(again.recording_files()).items():
        assert out.returncode == 0, (path, out.stderr)
    for path in torn:
        assert path.with_name(path.name + ".torn").exists()  # the cut-off bytes are kept aside
    verify = cli("audit", "verify", str(audit_path))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    recorded_after = Counter(m for f in recorded_flows(gw.recordings) for m in answered if m in f.request.path)
    assert all(recorded_after[m] == 1 for m in answered)
