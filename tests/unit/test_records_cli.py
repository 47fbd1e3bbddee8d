"""The reading commands' plain parts: joining parts for mitmweb, listing, argument handling."""

from __future__ import annotations

from datetime import UTC, datetime

from mitmproxy import io as mio

from nhi_gateway.cli import records as records_cli
from nhi_gateway.cli.main import main
from nhi_gateway.recording.files import RecordingWriter, recording_base, scan

from ..support.recordings import record, write_rotated

PRINCIPAL = {"tenant_id": "t1", "object_id": "0b1c2d3e-0000-4000-8000-000000000042", "display_name": "mcp-directory"}


def test_several_parts_and_a_torn_tail_become_one_readable_file(tmp_path):
    write_rotated(tmp_path)
    last = tmp_path / "app--oid.2.mitm"
    last.write_bytes(last.read_bytes() + record(5)[:40])  # cut short by a crash
    files = sorted(tmp_path.glob("*.mitm"), key=lambda p: (len(p.name), p.name))
    work = tmp_path / "work"
    work.mkdir()

    joined, count = records_cli._one_file(files, work)
    assert count == 5 and joined.parent == work
    assert joined.stat().st_mode & 0o077 == 0
    with open(joined, "rb") as fh:
        assert [f.comment for f in mio.FlowReader(fh).stream()] == [f"flow {n}" for n in range(5)]


def test_a_single_whole_file_is_opened_as_it_is(tmp_path):
    path = tmp_path / "app--oid.mitm"
    path.write_bytes(record(0) + record(1))
    assert records_cli._one_file([path], tmp_path) == (path, 2)
    assert scan(path).whole


def test_recordings_list(tmp_path, capsys):
    writer = RecordingWriter()
    when = datetime(2026, 11, 1, tzinfo=UTC)
    for who in (PRINCIPAL, PRINCIPAL, None):
        writer.append(recording_base(tmp_path, who, when), record(0))
    writer.close()
    assert main(["recordings", "list", "--recordings", str(tmp_path), "--date", "2026-11-01"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["DAY", "APP", "OBJECT", "ID", "FLOWS"]
    (row,) = [line for line in out if "mcp-directory" in line]
    assert row.split()[:4] == ["2026-11-01", "mcp-directory", PRINCIPAL["object_id"], "2"]
    assert main(["recordings", "list", "--recordings", str(tmp_path), "--date", "2026-11-02"]) == 1
    assert main(["recordings", "list", "--recordings", str(tmp_path), "--date", "someday"]) == 2
