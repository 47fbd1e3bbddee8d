"""``nhi-gateway audit`` on the trail a real gateway wrote: ``verify`` names any edited, deleted,
inserted or reordered line (exit 1), a crash's torn last line is told apart (exit 3), and the
filters print exactly the matching lines, byte for byte, or a table."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from ..support.e2e import GRAPH, cli, session_for
from .conftest import REFUSING_RULE, start_with_a_deny_rule, stop


@pytest.fixture(scope="module")
def trail(tmp_path_factory, lookalike, tokens):
    """A gateway's audit trail holding an allowed, a refused and a bad-token request (by marker)."""
    gw = start_with_a_deny_rule(tmp_path_factory.mktemp("audit-cli"), lookalike)
    marks = {kind: uuid.uuid4().hex for kind in ("allowed", "refused", "bad-token")}
    try:
        client = session_for(gw)
        bearer = {"Authorization": f"Bearer {tokens()}"}
        user = lookalike.app("mcp-directory")["object_id"]
        assert client.get(f"{GRAPH}/v1.0/users?m={marks['allowed']}", headers=bearer, timeout=20).status_code == 200
        assert client.delete(f"{GRAPH}/v1.0/users/{user}?m={marks['refused']}", headers=bearer,
                             timeout=20).status_code == 403
        assert client.get(f"{GRAPH}/v1.0/users?m={marks['bad-token']}", headers={"Authorization": "Bearer x"},
                          timeout=20).status_code == 401
        for n in range(3):  # more lines, so tampering in the middle has lines on both sides
            assert client.get(f"{GRAPH}/v1.0/groups?n={n}", headers=bearer, timeout=20).status_code == 200
    finally:
        stop(gw.proc)
    return gw.recordings / "audit.jsonl", marks, lookalike.app("mcp-directory")


def lines_of(path) -> list[bytes]:
    return path.read_bytes().splitlines()


def tampered(tmp_path, source, change) -> str:
    lines = lines_of(source)
    change(lines)
    path = tmp_path / "tampered.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


# --- verify --------------------------------------------------------------------------------------


def test_verify_an_intact_trail(trail):
    path, _, _ = trail
    out = cli("audit", "verify", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(lines_of(path))} lines, chain intact" in out.stdout


def test_verify_prints_the_head_and_an_anchored_head_detects_a_cut_tail(trail, tmp_path):
    """A chain verifies from its start whatever was cut off its end: the head printed earlier and
    kept elsewhere is what shows the truncation, or a rewrite from some line on."""
    path, _, _ = trail
    out = cli("audit", "verify", str(path))
    head = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("head "))
    seq, digest = head.split(":")
    assert int(seq) == len(lines_of(path)) and len(digest) == 64

    assert cli("audit", "verify", "--expect-head", head, str(path)).returncode == 0
    cut = tampered(tmp_path, path, lambda lines: lines.pop())  # the last line deleted: still a valid chain
    assert cli("audit", "verify", cut).returncode == 0
    out = cli("audit", "verify", "--expect-head", head, cut)
    assert out.returncode == 1 and "cut off its end" in out.stdout
    earlier = f"{int(seq) - 1}:{digest}"  # an anchor whose line says something else now
    out = cli("audit", "verify", "--expect-head", earlier, str(path))
    assert out.returncode == 1 and "rewritten" in out.stdout
    out = cli("audit", "verify", "--expect-head", "12:not-a-hash", str(path))
    assert out.returncode != 0 and "SEQ:SHA256" in out.stderr


def test_verify_finds_the_default_file_under_recordings(trail):
    path, _, _ = trail
    out = cli("audit", "verify", "--recordings", str(path.parent))
    assert out.returncode == 0, out.stderr
    out = cli("audit", "verify", cwd=path.parent.parent)  # ./recordings/audit.jsonl
    assert out.returncode == 0, out.stderr


def edit_decision(lines):
    rec = json.loads(lines[2])
    rec["decision"] = "allow" if rec["decision"] == "deny" else "deny"
    lines[2] = json.dumps(rec, separators=(",", ":")).encode()


def delete_line(lines):
    del lines[2]


def swap_lines(lines):
    lines[1], lines[2] = lines[2], lines[1]


def insert_copy(lines):
    lines.insert(2, lines[1])


@pytest.mark.parametrize(
    ("change", "line", "kind"),
    [(edit_decision, 3, "edited"), (delete_line, 3, "deleted"), (swap_lines, 2, "reordered"),
     (insert_copy, 3, "inserted")],
    ids=["edited", "deleted", "reordered", "inserted"],
)
def test_verify_names_the_line_that_was_changed(trail, tmp_path, change, line, kind):
    path, _, _ = trail
    assert len(lines_of(path)) == 6
    target = tampered(tmp_path, path, change)
    out = cli("audit", "verify", target)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{target}:line {line}: {kind}:" in out.stdout
    assert "the chain is broken" in out.stderr


def test_verify_tells_a_torn_last_line_from_tampering(trail, tmp_path):
    path, _, _ = trail
    target = tmp_path / "torn.jsonl"
    shutil.copy(path, target)
    with open(target, "ab") as f:
        f.write(b'{"seq":99,"prev":"')  # a crash while the line was being written
    out = cli("audit", "verify", str(target))
    assert out.returncode == 3, out.stdout + out.stderr
    assert "torn" in out.stdout and "next start" in out.stderr


def test_verify_refuses_filters_and_a_missing_file(trail, tmp_path):
    path, _, _ = trail
    out = cli("audit", "verify", str(path), "--decision", "deny")
    assert out.returncode == 2 and "takes no filters" in out.stderr
    out = cli("audit", "verify", str(tmp_path / "nope.jsonl"))
    assert out.returncode == 2 and "no such audit file" in out.stderr


# --- filter --------------------------------------------------------------------------------------


def shown(out: subprocess.CompletedProcess, marks: dict) -> set[str]:
    assert out.returncode == 0, out.stderr
    return {kind for kind, mark in marks.items() if mark in out.stdout}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], {"allowed", "refused", "bad-token"}),
        (["--decision", "deny"], {"refused", "bad-token"}),
        (["--decision", "allow"], {"allowed"}),
        (["--principal", "MCP-Directory"], {"allowed", "refused"}),
        (["--principal", "{object_id}"], {"allowed", "refused"}),
        (["--principal", "{client_id}", "--decision", "deny"], {"refused"}),
        (["--principal", "anonymous"], {"bad-token"}),
        (["--principal", "mcp-*"], {"allowed", "refused"}),
        (["--rule", REFUSING_RULE], {"refused"}),
        (["--since", "1h"], {"allowed", "refused", "bad-token"}),
        (["--since", "{tomorrow}"], set()),
        (["--until", "2000-01-01"], set()),
        (["--since", "2000-01-01T00:00:00Z", "--until", "{tomorrow}"], {"allowed", "refused", "bad-token"}),
    ],
)
def test_filters(trail, args, expected):
    path, marks, app = trail
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    args = [a.format(object_id=app["object_id"], client_id=app["client_id"], tomorrow=tomorrow) for a in args]
    assert shown(cli("audit", *args, str(path)), marks) == expected


def test_printed_lines_are_the_stored_lines(trail):
    """Byte for byte, so what jq reads is what the chain covers."""
    path, marks, _ = trail
    out = cli("audit", "--decision", "deny", str(path))
    printed = out.stdout.encode().splitlines()
    stored = set(lines_of(path))
    assert printed and all(line in stored for line in printed)
    assert all(json.loads(line)["decision"] == "deny" for line in printed)


def test_table(trail):
    path, marks, _ = trail
    out = cli("audit", "--table", "--principal", "mcp-directory", str(path))
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["TIME", "(UTC)", "DECISION", "STATUS", "PRINCIPAL", "METHOD", "RULE", "URL"]
    (refused,) = [row for row in rows if marks["refused"] in row]
    assert refused.split()[2:7] == ["deny", "403", "mcp-directory", "DELETE", REFUSING_RULE]
    (allowed,) = [row for row in rows if marks["allowed"] in row]
    assert allowed.split()[2:5] == ["allow", "200", "mcp-directory"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "last tuesday"], "expected a time such as"),
        (["--decision", "maybe"], "invalid choice"),
        (["a.jsonl", "b.jsonl"], "at most one FILE"),
    ],
)
def test_bad_arguments_say_what_is_expected(trail, args, message):
    path, _, _ = trail
    out = cli("audit", *args, *([] if "jsonl" in "".join(args) else [str(path)]))
    assert out.returncode == 2
    assert message in out.stderr


def test_a_line_that_is_not_a_record_is_reported_not_printed(trail, tmp_path):
    path, marks, _ = trail
    target = tampered(tmp_path, path, lambda lines: lines.insert(1, b"not json"))
    out = cli("audit", target)
    assert out.returncode == 0
    assert f"{target}:2: not an audit record" in out.stderr
    assert "not json" not in out.stdout
    assert shown(out, marks) == {"allowed", "refused", "bad-token"}


def test_recordings_open_without_recordings_says_where_to_look(trail):
    path, _, _ = trail
    out = cli("recordings", "open", "nobody-by-this-name", "--recordings", str(path.parent))
    assert out.returncode == 1
    assert "no recordings of 'nobody-by-this-name'" in out.stderr and "recordings list" in out.stderr
