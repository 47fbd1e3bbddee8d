"""Recordings on disk: layout, rotation that never renames, whole records only, crash recovery."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from mitmproxy import certs
from mitmproxy.io import tnetstring
from mitmproxy.test import tflow

from nhi_gateway.recording import files as recordings
from nhi_gateway.recording.files import (
    RecordEncoder,
    RecordingName,
    RecordingWriter,
    find,
    list_recordings,
    parse_day,
    parse_name,
    parse_size,
    part_path,
    recording_base,
    recover_recent,
    recover_torn_tail,
    scan,
)

from ..support.recordings import flows_in, record, write_rotated

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
OID = "0b1c2d3e-0000-4000-8000-000000000042"
APP_ID = "5e0b1683-de22-5eac-9334-fb85a741f6ff"
WHEN = datetime(2026, 11, 1, 14, 5, tzinfo=UTC)
MITMDUMP = Path(sys.executable).parent / "mitmdump"


def principal(**kw) -> dict:
    return {"tenant_id": TENANT, "object_id": OID, "app_id": APP_ID, "display_name": "mcp-directory", **kw}


# --- layout --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "hourly", "expected"),
    [
        (principal(), False, f"2026-11-01/{TENANT}/mcp-directory--{OID}.mitm"),
        (principal(), True, f"2026-11-01/{TENANT}/mcp-directory--{OID}.14h.mitm"),
        (principal(display_name=""), False, f"2026-11-01/{TENANT}/{APP_ID}--{OID}.mitm"),
        (principal(display_name="../../etc/passwd"), False, f"2026-11-01/{TENANT}/etc-passwd--{OID}.mitm"),
        (principal(display_name="My App / prod"), False, f"2026-11-01/{TENANT}/My-App-prod--{OID}.mitm"),
        (principal(object_id="x.y/../z"), False, f"2026-11-01/{TENANT}/mcp-directory--x-y-z.mitm"),
        (principal(tenant_id="../.."), False, f"2026-11-01/unknown-tenant/mcp-directory--{OID}.mitm"),
        (None, False, "2026-11-01/anonymous.mitm"),
        ({}, True, "2026-11-01/anonymous.14h.mitm"),
    ],
)
def test_layout_app_and_day(tmp_path, who, hourly, expected):
    assert recording_base(tmp_path, who, WHEN, hourly) == tmp_path / expected


def test_the_day_is_the_utc_day(tmp_path):
    from datetime import timedelta, timezone

    late_in_new_york = datetime(2026, 11, 1, 22, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert recording_base(tmp_path, None, late_in_new_york).parent.name == "2026-11-02"


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        (f"mcp-directory--{OID}.mitm", RecordingName("mcp-directory", OID, None, 0)),
        (f"mcp-directory--{OID}.3.mitm", RecordingName("mcp-directory", OID, None, 3)),
        (f"mcp-directory--{OID}.09h.12.mitm", RecordingName("mcp-directory", OID, 9, 12)),
        (f"my--app.v2--{OID}.mitm", RecordingName("my--app.v2", OID, None, 0)),
        ("anonymous.mitm", RecordingName("anonymous", "", None, 0)),
        ("anonymous.14h.2.mitm", RecordingName("anonymous", "", 14, 2)),
        ("notes.txt", None),
        (f"mcp-directory--{OID}.mitm.torn", None),
        (f"mcp-directory--{OID}.0.mitm", None),
    ],
)
def test_names_parse_back(name, parsed):
    assert parse_name(name) == parsed


def test_part_paths():
    base = Path("/r/2026-11-01/t/app--oid.mitm")
    assert part_path(base, 0) == base
    assert part_path(base, 2) == Path("/r/2026-11-01/t/app--oid.2.mitm")


@pytest.mark.parametrize(("text", "size"), [("64m", 64 << 20), ("64MiB", 64 << 20), ("512k", 512 << 10),
                                           ("1g", 1 << 30), ("1000", 1000)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "0", "-1", "12x", "1.5m"])
def test_parse_size_refuses(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_parse_day():
    today = date(2026, 11, 1)
    assert parse_day("today", today) == today
    assert parse_day("yesterday", today) == date(2026, 10, 31)
    assert parse_day("2026-10-02", today) == date(2026, 10, 2)
    assert parse_day("all", today) is None
    with pytest.raises(ValueError, match="expected today"):
        parse_day("last week", today)


# --- writing and rotation ------------------------------------------------------------------------


def test_each_record_is_in_the_file_as_soon_as_append_returns(tmp_path):
    writer = RecordingWriter()
    base = tmp_path / "d" / "a--b.mitm"
    data = record(1)
    path = writer.append(base, data)
    # Not closed, not flushed by anyone: another reader already sees the whole flow.
    assert path.read_bytes() == data
    assert [f.comment for f in flows_in(path)] == ["flow 1"]
    writer.close()


def test_one_write_call_per_flow(tmp_path, monkeypatch):
    """A flow is never handed to the OS in pieces (a kill between pieces would tear it)."""
    calls = []
    real_write = os.write
    monkeypatch.setattr(recordings.os, "write", lambda fd, data: calls.append(len(data)) or real_write(fd, data))
    writer = RecordingWriter()
    big = record(body=os.urandom(300_000))
    writer.append(tmp_path / "a--b.mitm", big)
    writer.close()
    assert calls == [len(big)]


def test_rotates_by_size_without_renaming(tmp_path):
    one = len(record(0))
    writer = RecordingWriter(max_bytes=one * 3 + 10)
    base = tmp_path / "2026-11-01" / "t" / "app--oid.mitm"
    paths = [writer.append(base, record(n)) for n in range(10)]
    first_file_bytes = base.read_bytes()
    writer.close()

    assert [p.name for p in paths] == ["app--oid.mitm"] * 3 + ["app--oid.1.mitm"] * 3 + \
        ["app--oid.2.mitm"] * 3 + ["app--oid.3.mitm"]
    assert base.read_bytes() == first_file_bytes  # the first file was not touched again
    comments = []
    for part in sorted(base.parent.glob("*.mitm"), key=recordings.sort_key):
        assert part.stat().st_size <= one * 3 + 10
        comments += [f.comment for f in flows_in(part)]
    assert comments == [f"flow {n}" for n in range(10)]  # in order, each once


def test_a_flow_larger_than_the_limit_gets_a_file_of_its_own(tmp_path):
    writer = RecordingWriter(max_bytes=1000)
    base = tmp_path / "app--oid.mitm"
    small, big = record(0), record(1, body=b"x" * 5000)
    assert [writer.append(base, r).name for r in (small, big, small)] == \
        ["app--oid.mitm", "app--oid.1.mitm", "app--oid.2.mitm"]
    writer.close()


def test_a_new_writer_continues_the_newest_part(tmp_path):
    one = len(record(0))
    base = tmp_path / "app--oid.mitm"
    w1 = RecordingWriter(max_bytes=one * 2)
    for n in range(3):
        w1.append(base, record(n))  # part 0 full, part 1 holds one flow
    w1.close()
    w2 = RecordingWriter(max_bytes=one * 2)
    assert w2.append(base, record(3)).name == "app--oid.1.mitm"
    assert w2.append(base, record(4)).name == "app--oid.2.mitm"
    w2.close()


def test_files_and_directories_are_private(tmp_path):
    writer = RecordingWriter()
    path = writer.append(tmp_path / "d" / "a--b.mitm", record())
    writer.close()
    assert path.stat().st_mode & 0o077 == 0


def test_fsync_interval(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(recordings.os, "fsync", lambda fd: synced.append(fd))
    now = [100.0]
    writer = RecordingWriter(fsync_interval=5, clock=lambda: now[0])
    base = tmp_path / "a--b.mitm"
    writer.append(base, record(0))
    synced.clear()  # creating the file syncs its directory
    writer.append(base, record(1))
    assert synced == []  # within the interval: left to the OS
    now[0] += 5
    writer.append(base, record(2))
    assert len(synced) == 1
    writer.append(base, record(3))
    writer.close()
    assert len(synced) == 2  # the unsynced flow is synced at close


def test_fsync_interval_zero_syncs_every_flow(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(recordings.os, "fsync", lambda fd: synced.append(fd))
    writer = RecordingWriter(fsync_interval=0)
    base = tmp_path / "a--b.mitm"
    writer.append(base, record(0))
    synced.clear()
    for n in range(3):
        writer.append(base, record(n))
    assert len(synced) == 3
    writer.close()


def test_only_max_open_files_stay_open(tmp_path):
    writer = RecordingWriter(max_open=2)
    bases = [tmp_path / f"app{n}--oid.mitm" for n in range(4)]
    for b in bases * 2:
        writer.append(b, record())
    assert len(writer._open) == 2
    writer.close()
    for b in bases:
        assert len(flows_in(b)) == 2


# --- crash recovery ------------------------------------------------------------------------------


def write_flows(path: Path, n: int) -> list[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [record(i) for i in range(n)]
    path.write_bytes(b"".join(records))
    return records


@pytest.mark.parametrize("cut", [1, 50, "all-but-prefix", "half-prefix"])
def test_a_torn_tail_is_moved_aside_and_the_file_reads_again(tmp_path, cut):
    path = tmp_path / "2026-11-01" / "t" / "app--oid.mitm"
    records = write_flows(path, 3)
    last = records[-1]
    prefix_len = last.index(b":") + 1
    keep = {"all-but-prefix": prefix_len, "half-prefix": 1}[cut] if isinstance(cut, str) else len(last) - cut
    data = b"".join(records[:2]) + last[:keep]
    path.write_bytes(data)
    assert scan(path).problem == "torn"

    assert recover_torn_tail(path) == keep
    assert scan(path).whole and scan(path).records == 2
    assert path.with_name(path.name + ".torn").read_bytes() == last[:keep]  # kept as evidence
    assert [f.comment for f in flows_in(path)] == ["flow 0", "flow 1"]


def test_the_next_start_recovers_torn_files_of_the_newest_days(tmp_path):
    old = tmp_path / "2026-10-01" / "t" / "app--oid.mitm"
    recent = [tmp_path / "2026-10-31" / "anonymous.mitm", tmp_path / "2026-11-01" / "t" / "app--oid.3.mitm"]
    for path in [old, *recent]:
        records = write_flows(path, 2)
        path.write_bytes(records[0] + records[1][:-7])
    assert sorted(recover_recent(tmp_path)) == sorted(recent)
    for path in recent:
        assert mitmdump_reads(path)
    assert scan(old).problem == "torn"  # days before are not scanned at start (the writer still fixes them)


def test_the_writer_recovers_a_torn_file_before_appending(tmp_path):
    path = tmp_path / "app--oid.mitm"
    records = write_flows(path, 2)
    path.write_bytes(records[0] + records[1][:-3])
    writer = RecordingWriter()
    assert writer.append(path, record(9)) == path
    writer.close()
    assert [f.comment for f in flows_in(path)] == ["flow 0", "flow 9"]


def test_a_corrupt_file_is_left_alone_and_new_flows_go_to_the_next_part(tmp_path):
    path = tmp_path / "app--oid.mitm"
    records = write_flows(path, 2)
    corrupt = records[0] + b"garbage!" + records[1]
    path.write_bytes(corrupt)
    assert scan(path).problem == "corrupt"
    assert recover_torn_tail(path) == 0
    writer = RecordingWriter()
    assert writer.append(path, record(5)).name == "app--oid.1.mitm"
    writer.close()
    assert path.read_bytes() == corrupt


def test_a_failed_write_leaves_no_half_flow_behind_the_next_one(tmp_path, monkeypatch):
    path = tmp_path / "app--oid.mitm"
    writer = RecordingWriter()
    writer.append(path, record(0))
    real_write = os.write

    def disk_full_halfway(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recordings.os, "write", disk_full_halfway)
    with pytest.raises(OSError):
        writer.append(path, record(1))
    monkeypatch.setattr(recordings.os, "write", real_write)
    writer.append(path, record(2))
    writer.close()
    assert [f.comment for f in flows_in(path)] == ["flow 0", "flow 2"]


def mitmdump_reads(path: Path) -> bool:
    out = subprocess.run([str(MITMDUMP), "-nr", str(path)], capture_output=True, text=True, timeout=60)
    return out.returncode == 0


def test_stock_mitmdump_reads_every_rotated_file(tmp_path):
    write_rotated(tmp_path)
    files = sorted(tmp_path.glob("*.mitm"))
    assert len(files) == 3
    assert all(mitmdump_reads(f) for f in files)


def test_scan_counts_whole_records(tmp_path):
    path = tmp_path / "x.mitm"
    write_flows(path, 4)
    assert scan(path) == recordings.Scan(records=4, clean_end=path.stat().st_size, size=path.stat().st_size)
    empty = tmp_path / "empty.mitm"
    empty.write_bytes(b"")
    assert scan(empty).whole and scan(empty).records == 0


# --- encoding ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain() -> list[certs.Cert]:
    key, ca = certs.create_ca("nhi-gateway tests", "test CA", 2048)
    leaf = certs.dummy_cert(key, ca, "graph.microsoft.com", [])
    return [leaf, certs.Cert(ca)]


def tls_flow(chain, n: int = 0, server=None):
    """A flow over TLS whose server sent a certificate chain; ``server``: share that connection."""
    f = tflow.tflow(resp=True)
    if server is not None:
        f.client_conn, f.server_conn = server
    else:
        f.server_conn.certificate_list = list(chain)
        f.server_conn.sni = "graph.microsoft.com"
    f.comment = f"flow {n}"
    return f


def encoded(encoder: RecordEncoder, f) -> bytes:
    state = f.get_state()
    del state["client_conn"], state["server_conn"]
    return encoder.encode(state, f.client_conn, f.server_conn)


def as_written(state):
    """Decoded as mitmproxy's FlowWriter writes it (tuples come back as lists)."""
    return tnetstring.loads(tnetstring.dumps(state))


def test_a_record_holds_the_whole_flow_connections_included(tmp_path, chain):
    encoder = RecordEncoder()
    first = tls_flow(chain, 1)
    second = tls_flow(chain, 2, server=(first.client_conn, first.server_conn))
    for f in (first, second):
        data = encoded(encoder, f)
        assert tnetstring.loads(data) == as_written(f.get_state())
    path = tmp_path / "a--b.mitm"
    path.write_bytes(encoded(encoder, first) + encoded(encoder, second))
    back = flows_in(path)
    assert [f.comment for f in back] == ["flow 1", "flow 2"]
    assert all(f.server_conn.certificate_list == chain for f in back)
    assert mitmdump_reads(path)


@pytest.mark.parametrize(
    "change",
    [
        lambda conn, chain: setattr(conn, "timestamp_end", conn.timestamp_start + 5),
        lambda conn, chain: setattr(conn, "error", "connection reset"),
        lambda conn, chain: setattr(conn, "sni", "login.microsoftonline.com"),
        lambda conn, chain: conn.certificate_list.pop(),  # in place
        lambda conn, chain: conn.alpn_offers.append(b"h2"),  # in place
    ],
    ids=["closed", "error", "sni", "certificate-list", "alpn-offers"],
)
def test_a_connection_that_changes_is_written_as_it_is_now(chain, change):
    encoder = RecordEncoder()
    f = tls_flow(chain)
    f.server_conn.alpn_offers = [b"http/1.1"]
    encoded(encoder, f)
    change(f.server_conn, chain)
    assert tnetstring.loads(encoded(encoder, f))["server_conn"] == as_written(f.server_conn.get_state())


def test_connections_are_remembered_for_a_bounded_number(chain):
    encoder = RecordEncoder(max_connections=4)
    for n in range(20):
        encoded(encoder, tls_flow(chain, n))  # a new client and server connection each
    assert len(encoder._parts) == 4


# --- finding -------------------------------------------------------------------------------------


def test_list_and_find_an_app_of_a_day(tmp_path):
    writer = RecordingWriter(max_bytes=len(record(0)))
    day1 = datetime(2026, 11, 1, tzinfo=UTC)
    day2 = datetime(2026, 11, 2, tzinfo=UTC)
    other = principal(display_name="mail-bot", object_id="0b1c2d3e-0000-4000-8000-000000000099")
    for when, who in [(day1, principal()), (day1, principal()), (day1, other), (day2, principal()), (day1, None)]:
        writer.append(recording_base(tmp_path, who, when), record())
    writer.close()

    found = list_recordings(tmp_path, date(2026, 11, 1))
    assert [(r.app, r.object_id, len(r.files)) for r in found] == [
        ("anonymous", "", 1), ("mail-bot", other["object_id"], 1), ("mcp-directory", OID, 2)]
    assert len(list_recordings(tmp_path)) == 4

    files = find(tmp_path, "MCP-Directory", date(2026, 11, 1))
    assert [f.name for f in files] == [f"mcp-directory--{OID}.mitm", f"mcp-directory--{OID}.1.mitm"]
    assert find(tmp_path, OID, date(2026, 11, 2)) == [recording_base(tmp_path, principal(), day2)]
    assert len(find(tmp_path, OID, None)) == 3
    assert find(tmp_path, "nobody", None) == []
    assert find(tmp_path, str(files[1]), None) == [files[1]]  # a file path is taken as it is
    assert len(find(tmp_path, str(tmp_path / "2026-11-01"), None)) == 4  # so is a directory


def test_sync_due_syncs_files_that_stopped_receiving_flows(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(recordings.os, "fsync", lambda fd: synced.append(fd))
    now = [0.0]
    writer = RecordingWriter(fsync_interval=1, clock=lambda: now[0])
    writer.append(tmp_path / "a--b.mitm", record(0))
    writer.append(tmp_path / "a--b.mitm", record(1))
    synced.clear()
    writer.sync_due()
    assert synced == []  # not yet due
    now[0] = 1.0
    writer.sync_due()
    assert len(synced) == 1
    writer.sync_due()
    assert len(synced) == 1  # nothing new since
    writer.close()
