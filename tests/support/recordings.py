"""Recordings on disk without a gateway: flows as the recorder writes them, and rotated parts."""

from __future__ import annotations

from pathlib import Path

from mitmproxy import io
from mitmproxy.io import tnetstring
from mitmproxy.test import tflow

from nhi_gateway.recording.files import RecordingWriter


def record(n: int = 0, body: bytes = b"") -> bytes:
    """One flow as the recorder appends it (mitmproxy's tnetstring), its comment ``flow <n>``."""
    f = tflow.tflow(resp=True)
    f.comment = f"flow {n}"
    if body:
        f.response.content = body
    return tnetstring.dumps(f.get_state())


def write_rotated(directory: Path, count: int = 5) -> Path:
    """``count`` records of one identity, written two to a part: ``app--oid.mitm``, ``app--oid.1.mitm``, …"""
    writer = RecordingWriter(max_bytes=len(record(0)) * 2)
    base = directory / "app--oid.mitm"
    for n in range(count):
        writer.append(base, record(n))
    writer.close()
    return base


def flows_in(path: Path) -> list:
    """Every flow of one recording file; raises when the file is not whole (FlowReader stops at
    the first bad record)."""
    with open(path, "rb") as fh:
        return list(io.FlowReader(fh).stream())


def flows_under(root: Path, pattern: str = "*.mitm") -> list:
    """Every flow of every recording below ``root`` (or of the files matching ``pattern``: the
    write-ahead logs are ``*.wal``), files in the order of their paths."""
    return [flow for path in sorted(root.rglob(pattern)) for flow in flows_in(path)]
