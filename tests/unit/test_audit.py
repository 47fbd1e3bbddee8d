import errno
import hashlib
import json
import os
import threading
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tutils

from nhi_gateway.addons.audit import url_of
from nhi_gateway.recording import audit
from nhi_gateway.recording.audit import GENESIS, AuditLog, AuditWriteError, Problem, verify_chain

JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL2dyYXBoIn0.c2lnbmF0dXJl"
PRINCIPAL = {"tenant_id": "t1", "object_id": "o1", "app_id": "a1", "display_name": "mcp-directory"}


def record(i: int = 0, **kw) -> dict:
    return {
        "flow_id": f"flow-{i}",
        "principal": PRINCIPAL,
        "method": "GET",
        "url": f"https://graph.microsoft.com/v1.0/users/{i}",
        "decision": "allow",
        "rule": "read-users",
        "stage": "policy",
        "reason": "allowed by rule read-users",
        "status": 200,
    } | kw


def write_log(path, n: int) -> list[bytes]:
    with AuditLog(path) as log:
        for i in range(n):
            log.append(record(i))
    return path.read_bytes().splitlines()


def lines_of(path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_lines_are_chained_json_records(tmp_path):
    path = tmp_path / "audit.jsonl"
    lines = write_log(path, 3)
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev"] == GENESIS == "0" * 64
    assert records[1]["prev"] == hashlib.sha256(lines[0]).hexdigest()
    assert records[2]["prev"] == hashlib.sha256(lines[1]).hexdigest()
    for i, r in enumerate(records):
        assert r["flow_id"] == f"flow-{i}"
        assert r["principal"] == PRINCIPAL
        assert (r["method"], r["decision"], r["rule"], r["stage"], r["status"]) == (
            "GET",
            "allow",
            "read-users",
            "policy",
            200,
        )
        when = datetime.fromisoformat(r["time"])
        assert r["time"].endswith("Z") and when.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - when) < timedelta(minutes=1)
    assert path.read_bytes().endswith(b"\n")
    assert verify_chain(path) == []


def test_append_returns_the_line_as_written(tmp_path):
    with AuditLog(tmp_path / "a.jsonl") as log:
        first = log.append(record(1))
        second = log.append(record(2, principal=None, decision="deny", status=403))
        assert log.head == (2, hashlib.sha256(lines_of(tmp_path / "a.jsonl")[1]).hexdigest())
    assert first["seq"] == 1 and second["seq"] == 2
    assert second["principal"] is None and second["decision"] == "deny"
    assert json.loads(lines_of(tmp_path / "a.jsonl")[1]) == second


def test_missing_fields_are_written_as_null_and_extras_are_kept(tmp_path):
    with AuditLog(tmp_path / "a.jsonl") as log:
        line = log.append({"flow_id": "f", "decision": "deny", "masked": 3})
    for name in ("principal", "method", "url", "rule", "stage", "reason", "status"):
        assert line[name] is None
    assert line["masked"] == 3


def test_time_given_as_datetime_is_written_in_utc(tmp_path):
    when = datetime(2025, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    with AuditLog(tmp_path / "a.jsonl") as log:
        line = log.append(record(time=when))
    assert line["time"] == "2025-01-02T03:04:05.000000Z"


def test_every_append_is_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(audit.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with AuditLog(tmp_path / "a.jsonl") as log:
        before = len(synced)
        log.append(record(1))
        log.append(record(2))
        fd = log._file.fileno()
        assert synced[before:] == [fd, fd]


def test_with_an_interval_appends_reach_the_os_and_a_thread_fsyncs(tmp_path, monkeypatch):
    synced = threading.Event()
    real_fsync = os.fsync
    monkeypatch.setattr(audit.os, "fsync", lambda fd: (synced.set(), real_fsync(fd)))
    path = tmp_path / "a.jsonl"
    with AuditLog(path, fsync_interval=0.05) as log:
        log.append(record(1))
        assert len(lines_of(path)) == 1  # in the file (the OS has it) before append returned
        assert synced.wait(timeout=10)  # and the background thread fsynced it


def test_a_failed_background_fsync_fails_the_next_append(tmp_path, monkeypatch):
    failed = threading.Event()

    def broken_fsync(fd):
        failed.set()
        raise OSError(5, "Input/output error")

    with AuditLog(tmp_path / "a.jsonl", fsync_interval=0.05) as log:
        monkeypatch.setattr(audit.os, "fsync", broken_fsync)
        log.append(record(1))
        assert failed.wait(timeout=10)
        for _ in range(100):  # the thread records the error just after calling fsync
            if log._sync_error is not None:
                break
            threading.Event().wait(0.01)
        with pytest.raises(AuditWriteError):
            log.append(record(2))
        monkeypatch.setattr(audit.os, "fsync", lambda fd: None)


def test_reopening_continues_the_chain(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path, 2)
    with AuditLog(path) as log:
        line = log.append(record(3))
    assert line["seq"] == 3
    assert line["prev"] == hashlib.sha256(lines_of(path)[1]).hexdigest()
    assert verify_chain(path) == []


def test_reopening_a_large_log_continues_from_its_last_line(tmp_path):
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log:
        for i in range(300):
            log.append(record(i, reason="x" * 500))
        log.append(record(300, reason="y" * 200_000))  # one line longer than a read block
    with AuditLog(path) as log:
        line = log.append(record(301))
    assert line["seq"] == 302
    assert line["prev"] == hashlib.sha256(lines_of(path)[300]).hexdigest()
    assert verify_chain(path) == []


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        (
            "https://login.microsoftonline.com/t/oauth2/v2.0/token?client_secret=s3cr3t-value",
            "s3cr3t-value",
        ),
        ("https://graph.microsoft.com/v1.0/me?access_token=tok-123", "tok-123"),
        ("https://agent:pa55word@graph.microsoft.com/v1.0/users", "pa55word"),
        (f"https://graph.microsoft.com/v1.0/users?x={JWT}", JWT),
    ],
)
def test_urls_are_written_redacted(tmp_path, url, secret):
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log:
        line = log.append(record(url=url))
    assert secret not in line["url"]
    assert secret.encode() not in path.read_bytes()
    assert "[redacted]" in line["url"]


def test_tokens_quoted_in_other_fields_are_scrubbed(tmp_path):
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log:
        log.append(record(reason=f"token {JWT} has expired", detail={"token": JWT}))
    assert JWT.encode() not in path.read_bytes()
    assert verify_chain(path) == []


def tamper_edit(lines):
    rec = json.loads(lines[2])
    rec["decision"] = "deny"
    lines[2] = json.dumps(rec, separators=(",", ":")).encode()
    return lines


def tamper_edit_seq(lines):
    lines[2] = lines[2].replace(b'"seq":3', b'"seq":9')
    return lines


def tamper_delete_middle(lines):
    del lines[2]
    return lines


def tamper_delete_first(lines):
    del lines[0]
    return lines


def tamper_swap(lines):
    lines[1], lines[2] = lines[2], lines[1]
    return lines


def tamper_insert_copy(lines):
    rec = json.loads(lines[1])
    rec["flow_id"] = "forged"
    lines.insert(2, json.dumps(rec, separators=(",", ":")).encode())
    return lines


def tamper_insert_chained(lines):
    # A forger who recomputes prev and seq for the inserted line still breaks the next link.
    forged = dict(json.loads(lines[1]), seq=3, flow_id="forged")
    forged["prev"] = hashlib.sha256(lines[1]).hexdigest()
    lines.insert(2, json.dumps(forged, separators=(",", ":")).encode())
    return lines


def tamper_garbage(lines):
    lines[2] = b"not json at all"
    return lines


@pytest.mark.parametrize(
    ("tamper", "line", "kind", "named"),
    [
        (tamper_edit, 3, "edited", {3}),
        (tamper_edit_seq, 3, "edited", {3}),
        (tamper_delete_middle, 3, "deleted", {3}),
        (tamper_delete_first, 1, "deleted", {1}),
        (tamper_swap, 2, "reordered", {2, 3, 4}),
        (tamper_swap, 3, "reordered", {2, 3, 4}),
        (tamper_insert_copy, 3, "inserted", {3}),
        (tamper_insert_chained, 3, "inserted", {3}),
        (tamper_garbage, 3, "invalid", {3}),
    ],
)
def test_verify_names_the_tampered_line(tmp_path, tamper, line, kind, named):
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 5)
    assert verify_chain(path) == []
    path.write_bytes(b"\n".join(tamper(lines)) + b"\n")
    problems = verify_chain(path)
    assert (line, kind) in [(p.line, p.kind) for p in problems], problems
    assert {p.line for p in problems} == named, problems
    assert all(str(p).startswith(f"line {p.line}: ") for p in problems)


def test_problem_reads_as_one_line():
    assert str(Problem(3, "edited", "x")) == "line 3: edited: x"


def test_torn_tail_is_kept_terminated_and_acknowledged(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path, 2)
    fragment = b'{"seq":3,"prev":"ab'
    with path.open("ab") as f:
        f.write(fragment)  # the crash happened here
    assert [p.kind for p in verify_chain(path)] == ["torn"]

    with AuditLog(path) as log:
        line = log.append(record(3))
    lines = lines_of(path)
    assert lines[2] == fragment, "the torn fragment is evidence: it stays, on its own line"
    note = json.loads(lines[3])
    assert note["decision"] == "torn-tail"
    assert note["seq"] == 3
    assert note["prev"] == hashlib.sha256(lines[1]).hexdigest()
    assert note["torn"] == {"bytes": len(fragment), "sha256": hashlib.sha256(fragment).hexdigest()}
    assert line["seq"] == 4 and json.loads(lines[4]) == line
    assert verify_chain(path) == []


def test_torn_first_line_is_recovered(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"seq":1,"pr')
    with AuditLog(path) as log:
        line = log.append(record(1))
    lines = lines_of(path)
    assert json.loads(lines[1])["prev"] == GENESIS
    assert line["seq"] == 2
    assert verify_chain(path) == []


def test_whole_record_missing_only_its_newline_joins_the_chain(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 3)
    path.write_bytes(path.read_bytes()[:-1])  # the crash took only the final newline
    with AuditLog(path) as log:
        line = log.append(record(4))
    assert lines_of(path)[:3] == lines
    assert line["seq"] == 4 and line["prev"] == hashlib.sha256(lines[2]).hexdigest()
    assert verify_chain(path) == []


def test_a_torn_line_without_its_acknowledgement_is_reported(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 3)
    lines.insert(1, b'{"seq":2,"pr')
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert (2, "invalid") in [(p.line, p.kind) for p in verify_chain(path)]


def test_refuses_to_continue_a_log_whose_last_line_is_not_a_record(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path, 2)
    with path.open("ab") as f:
        f.write(b"edited by hand\n")
    with pytest.raises(AuditWriteError, match="not an audit record"):
        AuditLog(path)


def test_os_error_raises_audit_write_error_and_the_log_recovers(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    real_fsync = os.fsync
    with AuditLog(path) as log:
        log.append(record(1))

        def full_disk(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(audit.os, "fsync", full_disk)
        with pytest.raises(AuditWriteError, match="No space left"):
            log.append(record(2))
        monkeypatch.setattr(audit.os, "fsync", real_fsync)
        line = log.append(record(3))
    assert line["seq"] == 3  # the line of the failed write reached the page cache
    assert verify_chain(path) == []


def test_partial_write_is_recovered_as_a_torn_tail(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log:
        log.append(record(1))
        real = log._file

        class ShortWrite:
            def write(self, data):
                real.write(bytes(data[:10]))
                raise OSError(errno.EIO, "Input/output error")

            fileno = real.fileno
            close = real.close

        monkeypatch.setattr(log, "_file", ShortWrite())
        with pytest.raises(AuditWriteError):
            log.append(record(2))
        line = log.append(record(3))
    lines = lines_of(path)
    assert json.loads(lines[2])["decision"] == "torn-tail"
    assert line["seq"] == 3
    assert verify_chain(path) == []


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"seq": 7}, id="seq"),
        pytest.param({"prev": GENESIS}, id="prev"),
        pytest.param({"extra": object()}, id="not-json"),
        pytest.param({"status": float("nan")}, id="nan"),
        pytest.param({"time": datetime(2025, 1, 1)}, id="naive-time"),
    ],
)
def test_bad_records_raise_audit_write_error_and_write_nothing(tmp_path, bad):
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log:
        log.append(record(1))
        with pytest.raises(AuditWriteError):
            log.append(record(2) | bad)
        log.append(record(3))
    assert [json.loads(x)["seq"] for x in lines_of(path)] == [1, 2]
    assert verify_chain(path) == []


def test_cannot_open_raises_audit_write_error(tmp_path):
    with pytest.raises(AuditWriteError):
        AuditLog(tmp_path / "missing-dir" / "a.jsonl")


def test_a_second_writer_is_refused(tmp_path):
    path = tmp_path / "a.jsonl"
    with AuditLog(path), pytest.raises(AuditWriteError, match="another writer"):
        AuditLog(path)
    with AuditLog(path) as log:  # released on close
        log.append(record(1))


def test_append_after_close_raises(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl")
    log.close()
    with pytest.raises(AuditWriteError, match="closed"):
        log.append(record(1))


def test_new_log_is_private(tmp_path):
    path = tmp_path / "a.jsonl"
    with AuditLog(path):
        pass
    assert path.stat().st_mode & 0o077 == 0


def test_audit_and_masking_load_without_mitmproxy():
    # The command-line tools verify chains and mask documents without a proxy.
    code = (
        "import sys, nhi_gateway.recording.audit, nhi_gateway.masking.masks; "
        "sys.exit(any(m.split('.')[0] == 'mitmproxy' for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- reading and searching ------------------------------------------------------------------------

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T09:30", datetime(2026, 11, 1, 9, 30, tzinfo=UTC)),
        ("2026-11-01T09:30:00Z", datetime(2026, 11, 1, 9, 30, tzinfo=UTC)),
        ("2026-11-01T10:30:00+01:00", datetime(2026, 11, 1, 9, 30, tzinfo=UTC)),
        ("90s", NOW - timedelta(seconds=90)),
        ("15m", NOW - timedelta(minutes=15)),
        ("2h", NOW - timedelta(hours=2)),
        ("7d", NOW - timedelta(days=7)),
    ],
)
def test_parse_time(text, expected):
    assert audit.parse_time(text, now=NOW) == expected


@pytest.mark.parametrize("bad", ["yesterday-ish", "15 minutes", "2026-13-01", ""])
def test_parse_time_says_what_it_expects(bad):
    with pytest.raises(ValueError, match="expected a time such as"):
        audit.parse_time(bad, now=NOW)


def line(decision="allow", rule="read-users", principal=PRINCIPAL, time="2026-11-01T10:00:00.000000Z"):
    return {"seq": 1, "prev": GENESIS, "time": time, "decision": decision, "rule": rule, "principal": principal}


@pytest.mark.parametrize(
    ("query", "rec", "matches"),
    [
        (audit.AuditQuery(), line(), True),
        (audit.AuditQuery(decision="deny"), line(), False),
        (audit.AuditQuery(decision="deny"), line(decision="deny"), True),
        (audit.AuditQuery(rule="read-users"), line(), True),
        (audit.AuditQuery(rule="other"), line(), False),
        (audit.AuditQuery(principal="MCP-Directory"), line(), True),
        (audit.AuditQuery(principal="o1"), line(), True),
        (audit.AuditQuery(principal="a1"), line(), True),
        (audit.AuditQuery(principal="mcp-*"), line(), True),
        (audit.AuditQuery(principal="mcp"), line(), False),  # a name, not a substring
        (audit.AuditQuery(principal="anonymous"), line(principal=None), True),
        (audit.AuditQuery(principal="mcp-directory"), line(principal=None), False),
        (audit.AuditQuery(since=datetime(2026, 11, 1, 10, tzinfo=UTC)), line(), True),  # inclusive
        (audit.AuditQuery(since=datetime(2026, 11, 1, 10, 0, 1, tzinfo=UTC)), line(), False),
        (audit.AuditQuery(until=datetime(2026, 11, 1, 10, tzinfo=UTC)), line(), False),  # exclusive
        (audit.AuditQuery(until=datetime(2026, 11, 1, 11, tzinfo=UTC)), line(), True),
        (audit.AuditQuery(since=NOW), line(time="garbled"), False),
        (audit.AuditQuery(decision="deny", principal="o1"), line(decision="deny", principal=None), False),
    ],
)
def test_query_matches(query, rec, matches):
    assert query.matches(rec) is matches


def test_read_records_gives_exact_bytes_and_keeps_a_torn_tail(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 2)
    with open(path, "ab") as f:
        f.write(b'{"seq":3,"pre')
    got = list(audit.read_records(path))
    assert [(n, raw) for n, raw, _ in got] == [(1, lines[0]), (2, lines[1]), (3, b'{"seq":3,"pre')]
    assert [rec["seq"] if rec else None for _, _, rec in got] == [1, 2, None]


@pytest.mark.parametrize(("at", "copy_of"), [(2, 1), (3, 2), (6, 3)])
def test_an_exact_copy_of_a_line_is_named_as_inserted(tmp_path, at, copy_of):
    path = tmp_path / "a.jsonl"
    lines = write_log(path, 5)
    lines.insert(at - 1, lines[copy_of - 1])
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert [(p.line, p.kind) for p in verify_chain(path)] == [(at, "inserted")]
    assert f"an exact copy of line {copy_of}" in str(verify_chain(path)[0])


# --- the URL of an audit line: mitmproxy's pretty_url, read cheaply where it can be -------------

_hosts = st.sampled_from(["graph.microsoft.com", "login.microsoftonline.com", "127.0.0.1", "[::1]", "xn--bcher-kva.example"])


@given(scheme=st.sampled_from(["https", "http"]), host=_hosts, port=st.sampled_from([443, 80, 8443]),
       host_header=st.one_of(st.none(), _hosts, st.builds(lambda h, p: f"{h}:{p}", _hosts, st.sampled_from([443, 80, 8443]))),
       path=st.sampled_from(["/v1.0/users?$top=5", "*", "/", "/v1.0/me/messages?$filter=a%20eq%20b"]))
def test_an_audit_line_names_the_url_as_mitmproxy_s_pretty_url_does(scheme, host, port, host_header, path):
    headers = http.Headers([(b"host", host_header.encode())] if host_header is not None else [])
    request = tutils.treq(scheme=scheme.encode(), host=host.strip("[]"), port=port, path=path.encode(),
                          authority=b"", headers=headers)
    assert url_of(request) == request.pretty_url
