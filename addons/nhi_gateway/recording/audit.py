"""The audit trail: one JSON line per decision, hash-chained.

Each line is a JSON object with ``seq`` (1, 2, 3, ...), ``prev`` (hex SHA-256 of the previous
line's exact bytes, without its newline; 64 zeros for the first line) and the record fields.
Changing, removing, inserting or reordering a line breaks the chain at that line, and
:func:`verify_chain` names it. The chain is tamper-evident, not tamper-proof: whoever can rewrite
the whole file from some point on can recompute every hash after it, and removing lines from the
end leaves no trace. Anchor :attr:`AuditLog.head` somewhere else to close both gaps.

Every line is handed to the operating system (one unbuffered ``write``) before
:meth:`AuditLog.append` returns, so a killed gateway loses at most the line being written. With
``fsync_interval=0`` each line is also fsynced before ``append`` returns; with an interval, a
background thread fsyncs at most that often, so the event loop never waits for the disk (a power
loss can then cost the last interval; a failed fsync makes the next ``append`` fail, closed). A torn last line is kept (it is evidence), terminated, and
acknowledged by the next record (``decision: "torn-tail"``), which carries its hash and length.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nhi_gateway.recording.redaction import redact_url, scrub_text

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
RECORD_FIELDS = (
    "time",
    "flow_id",
    "principal",
    "method",
    "url",
    "decision",
    "rule",
    "stage",
    "reason",
    "status",
)
TORN_TAIL = "torn-tail"
_TAIL_BLOCK = 64 * 1024


class AuditWriteError(OSError):
    """The audit line could not be made durable: the gateway must refuse the request."""


@dataclass(frozen=True)
class Problem:
    line: int  # 1-based line number in the file
    kind: str  # edited, deleted, inserted, reordered, invalid, torn
    detail: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.kind}: {self.detail}"


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _rfc3339(value: object) -> object:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("audit time must be timezone-aware")
        return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return value


def _parse_record(raw: bytes) -> dict | None:
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(rec, dict):
        return None
    seq, prev = rec.get("seq"), rec.get("prev")
    if type(seq) is not int or not isinstance(prev, str) or len(prev) != 64:
        return None
    return rec


class AuditCopy:
    """Each audit line, byte for byte as written (so the chain verifies there too), also sent to
    standard output or syslog for a SIEM. The file stays the record: a copy that fails is logged
    (once until it works again) and never refuses a request; ``audit verify --expect-head``
    against the head the SIEM received shows whether the file lost its tail."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._failing = False
        if target == "stdout":
            self._send = self._stdout
        elif target == "syslog" or target.startswith("syslog:"):
            import logging.handlers
            import socket

            where = target.partition(":")[2]
            if not where:
                address: object = "/dev/log"
            elif where.startswith("/"):
                address = where
            else:
                host, _, port = where.rpartition(":")
                address = (host or where, int(port) if host else 514)
            self._syslog = logging.handlers.SysLogHandler(
                address=address, facility=logging.handlers.SysLogHandler.LOG_AUTH,
                socktype=socket.SOCK_DGRAM)
            self._send = self._to_syslog
        else:
            raise ValueError(f"--audit-copy {target!r}: expected stdout, syslog, syslog:/path or syslog:HOST:PORT")

    def _stdout(self, line: bytes) -> None:
        out = sys.stdout.buffer
        out.write(line)
        out.flush()

    def _to_syslog(self, line: bytes) -> None:
        record = logging.LogRecord("nhi_gateway.audit", logging.INFO, "", 0,
                                   "nhi-gateway: " + line.decode("utf-8", "replace").rstrip("\n"), None, None)
        self._syslog.emit(record)

    def send(self, line: bytes) -> None:
        try:
            self._send(line)
        except Exception as e:  # noqa: BLE001 - the file holds the line; the copy is best effort
            if not self._failing:
                logger.error("audit copy to %s failed: %s (the audit file keeps every line)", self.target, e)
            self._failing = True
        else:
            self._failing = False


class AuditLog:
    """Appends hash-chained JSON lines to ``path``, continuing an existing chain.

    One writer per file: a second ``AuditLog`` on the same path (in this or another process)
    fails with :class:`AuditWriteError` instead of forking the chain.
    """

    def __init__(self, path: str | os.PathLike[str], fsync_interval: float = 0.0):
        self.path = Path(path)
        self.fsync_interval = fsync_interval
        self._dirty = threading.Event()
        self._sync_error: OSError | None = None
        self._syncer: threading.Thread | None = None
        self._lock = threading.Lock()
        self._file: Any = None
        self._broken = False  # a write failed: reopen (and recover the tail) before the next
        self._closed = False
        self._seq = 0
        self._prev = GENESIS
        self.copies: list[AuditCopy] = []  # each line, as written, also to a SIEM (stdout, syslog)
        self._open()

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, sha256)`` of the last line written: publish it elsewhere to anchor the chain."""
        return self._seq, self._prev

    def _open(self) -> None:
        try:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            f = os.fdopen(fd, "a+b", buffering=0)
        except OSError as e:
            raise AuditWriteError(f"cannot open audit log {self.path}: {e}") from e
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as e:
                    raise AuditWriteError(
                        f"audit log {self.path} is already open by another writer"
                    ) from e
            if created:
                # The new file's directory entry must survive a crash as well as its lines.
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            last, torn = _read_tail(f)
            self._seq, self._prev = 0, GENESIS
            if last is not None:
                line_no, raw = last
                rec = _parse_record(raw)
                if rec is None:
                    where = f"{self.path}:{line_no}" if line_no else f"{self.path} (last line)"
                    raise AuditWriteError(
                        f"{where}: the last complete line is not an audit record; the log may "
                        "have been edited: verify the chain before writing to it again"
                    )
                self._seq, self._prev = rec["seq"], line_hash(raw)
            self._file = f
            if torn is not None:
                rec = _parse_record(torn)
                if rec and rec["seq"] == self._seq + 1 and rec["prev"] == self._prev:
                    # The whole record reached the disk, only its newline did not.
                    self._write(b"\n", advance_to=torn)
                else:
                    self._acknowledge_torn(torn)
        except BaseException:
            f.close()
            self._file = None
            raise

    def _acknowledge_torn(self, torn: bytes) -> None:
        reason = (
            f"the previous line ({len(torn)} bytes) was cut short, most likely by a crash "
            "while it was being written; it is kept as it was found"
        )
        line = self._encode(
            {
                "flow_id": None,
                "principal": None,
                "method": None,
                "url": None,
                "decision": TORN_TAIL,
                "rule": None,
                "stage": "audit",
                "reason": reason,
                "status": None,
                "torn": {"bytes": len(torn), "sha256": line_hash(torn)},
            }
        )
        # The newline that ends the torn fragment and the note go out in one write.
        self._write(b"\n" + line)

    def _encode(self, record: dict) -> bytes:
        for reserved in ("seq", "prev"):
            if reserved in record:
                raise ValueError(f"audit record must not set {reserved!r}: the log assigns it")
        line: dict[str, Any] = {"seq": self._seq + 1, "prev": self._prev}
        for name in RECORD_FIELDS:
            line[name] = record.get(name)
        line.update((k, v) for k, v in record.items() if k not in line)
        line["time"] = _rfc3339(line["time"]) or _now()
        if isinstance(line["url"], str):
            line["url"] = redact_url(line["url"])
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        # Reasons and extras can quote what a client sent: no token reaches the trail.
        text = scrub_text(text)
        return text.encode("utf-8", "backslashreplace") + b"\n"

    def _write(self, data: bytes, advance_to: bytes | None = None) -> None:
        """Write the end of one or more lines; the chain advances (to the last line written, or
        to ``advance_to``) only once they are on disk."""
        try:
            view = memoryview(data)
            while view:
                written = self._file.write(view)
                view = view[written:]
            if self.fsync_interval <= 0:
                os.fsync(self._file.fileno())
            else:
                self._dirty.set()
                self._start_syncer()
        except OSError as e:
            self._broken = True
            raise AuditWriteError(f"cannot write audit log {self.path}: {e}") from e
        last = advance_to if advance_to is not None else data[:-1].rpartition(b"\n")[2]
        self._seq += 1
        self._prev = line_hash(last)

    def _start_syncer(self) -> None:
        if self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_loop, name="audit-fsync", daemon=True)
            self._syncer.start()

    def _sync_loop(self) -> None:
        while not self._closed:
            self._dirty.wait(timeout=self.fsync_interval)
            if self._closed:
                return
            if not self._dirty.is_set():
                continue
            self._dirty.clear()
            self.sync()
            threading.Event().wait(self.fsync_interval)  # at most one fsync per interval

    def sync(self) -> None:
        """fsync what has been written; a failure is reported by the next ``append``."""
        f = self._file
        if f is None:
            return
        try:
            os.fsync(f.fileno())
        except (OSError, ValueError) as e:  # ValueError: closed meanwhile
            if isinstance(e, OSError):
                self._sync_error = e

    def append(self, record: dict) -> dict:
        """Write one record; returns the line as written (with ``seq``, ``prev`` and ``time``).

        Raises :class:`AuditWriteError` when the line may not be on disk, in which case the
        request it describes must be refused.
        """
        return json.loads(self.write(record))

    def write(self, record: dict) -> bytes:
        """:meth:`append`, returning the line's bytes: the gateway writes a line per request and
        does not read it back."""
        with self._lock:
            if self._closed:
                raise AuditWriteError(f"audit log {self.path} is closed")
            if self._sync_error is not None:
                e, self._sync_error = self._sync_error, None
                self._broken = True
                raise AuditWriteError(f"cannot sync audit log {self.path}: {e}") from e
            if self._broken or self._file is None:
                # A failed write may have left part of a line: start again from what is on disk.
                if self._file is not None:
                    self._file.close()
                    self._file = None
                self._open()
                self._broken = False
            try:
                line = self._encode(record)
            except (TypeError, ValueError) as e:
                raise AuditWriteError(f"audit record cannot be written as JSON: {e}") from e
            self._write(line)
            for copy in self.copies:
                copy.send(line)
            return line

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._dirty.set()  # wake the syncer so it ends
            if self._file is not None:
                try:
                    os.fsync(self._file.fileno())
                except OSError:
                    pass
                self._file.close()
                self._file = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_tail(f: Any) -> tuple[tuple[int | None, bytes] | None, bytes | None]:
    """The last complete line (with its line number, when cheaply known) and a torn tail.

    Reads backwards in blocks, so opening a large log costs only its last lines.
    """
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return None, None
    buf = b""
    pos = size
    # Enough bytes to hold the end of the last complete line and the newline before it.
    while pos > 0:
        step = min(_TAIL_BLOCK, pos)
        pos -= step
        f.seek(pos)
        buf = f.read(step) + buf
        body = buf if buf.endswith(b"\n") else buf[: buf.rfind(b"\n") + 1]
        if body.count(b"\n") >= 2 or (pos == 0):
            break
    torn: bytes | None = None
    if not buf.endswith(b"\n"):
        cut = buf.rfind(b"\n")
        torn = buf[cut + 1 :]
        buf = buf[: cut + 1]
    if not buf:
        return None, torn
    complete = buf[:-1]
    last = complete.rpartition(b"\n")[2]
    line_no = None
    if pos == 0:
        line_no = complete.count(b"\n") + 1
    return (line_no, last), torn


def verify_chain(path: str | os.PathLike[str]) -> list[Problem]:
    """Check every line of an audit log; an empty list means the chain is intact.

    Each problem names the 1-based line where the chain breaks and what most likely happened.
    A torn line acknowledged by the record that follows it is not a problem.
    """
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    problems: list[Problem] = []
    by_hash: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        by_hash.setdefault(line_hash(raw), number)

    referenced = set()
    for raw in lines:
        if (rec := _parse_record(raw)) is not None:
            referenced.add(rec["prev"])

    prev_hash, prev_seq, prev_line, before_prev_line = GENESIS, 0, 0, 0
    unparsed: list[tuple[int, bytes]] = []
    for number, raw in enumerate(lines, 1):
        rec = _parse_record(raw)
        if rec is None:
            unparsed.append((number, raw))
            continue
        replaced = 0  # records overwritten by lines that no longer parse
        if unparsed:
            torn = rec.get("torn") if rec.get("decision") == TORN_TAIL else None
            acknowledged = (
                len(unparsed) == 1
                and isinstance(torn, dict)
                and torn.get("sha256") == line_hash(unparsed[0][1])
            )
            if not acknowledged:
                replaced = len(unparsed)
                problems.extend(
                    Problem(n, "invalid", "not an audit record: edited or corrupted")
                    for n, _ in unparsed
                )
            unparsed = []
        first = by_hash[line_hash(raw)]
        if first != number:
            # A byte-identical copy of an earlier line: not part of the chain, which goes on
            # from the line before the copy.
            problems.append(Problem(number, "inserted", f"an exact copy of line {first}"))
            continue
        seq, prev = rec["seq"], rec["prev"]
        if replaced and seq == prev_seq + 1 + replaced and prev not in by_hash:
            pass  # the break is the invalid line(s) just reported
        elif prev != prev_hash:
            problems.append(
                _diagnose(
                    number,
                    seq,
                    prev,
                    prev_seq,
                    prev_line,
                    before_prev_line,
                    by_hash,
                    referenced,
                    lines,
                )
            )
        elif seq != prev_seq + 1:
            problems.append(
                Problem(number, "edited", f"seq {seq} where {prev_seq + 1} was expected")
            )
        prev_hash, prev_seq = line_hash(raw), seq
        before_prev_line, prev_line = prev_line, number
    problems.extend(
        Problem(n, "invalid", "not an audit record: edited or corrupted") for n, _ in unparsed
    )
    if tail:
        problems.append(
            Problem(
                len(lines) + 1,
                "torn",
                "the last line is incomplete (a crash mid-write); the next writer will "
                "acknowledge it",
            )
        )
    return problems


def _diagnose(
    number: int,
    seq: int,
    prev: str,
    prev_seq: int,
    prev_line: int,
    before_prev_line: int,
    by_hash: dict[str, int],
    referenced: set[str],
    lines: list[bytes],
) -> Problem:
    """Name the most likely change behind a line whose ``prev`` is not the line before it."""
    points_to = by_hash.get(prev)
    if points_to is not None:
        if (
            prev_line
            and points_to == before_prev_line
            and line_hash(lines[prev_line - 1]) not in referenced
        ):
            # The chain skips the line before this one, and no record chains to that line.
            return Problem(
                prev_line,
                "inserted",
                f"not part of the chain: line {number} follows line {points_to} directly",
            )
        expected = f"line {prev_line}" if prev_line else "the start of the log"
        return Problem(number, "reordered", f"chains to line {points_to}, not to {expected}")
    if seq > prev_seq + 1:
        return Problem(
            number,
            "deleted",
            f"{seq - prev_seq - 1} record(s) missing before this line "
            f"(seq {prev_seq} is followed by seq {seq})",
        )
    if prev_line and seq == prev_seq + 1:
        return Problem(
            prev_line, "edited", f"its hash is not the one line {number} recorded for it"
        )
    if prev_line:
        return Problem(
            prev_line,
            "edited",
            f"its hash is not the one line {number} recorded for it, and seq goes from "
            f"{prev_seq} to {seq}",
        )
    return Problem(number, "inserted", f"seq {seq} and its prev match no line before it")


# --- reading and searching ------------------------------------------------------------------------

_AGO = re.compile(r"^(\d+)\s*([smhdw])$")
_AGO_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(value: str, now: datetime | None = None) -> datetime:
    """An instant for ``--since``/``--until``: ISO 8601 (``2026-11-01``, ``2026-11-01T09:30``,
    with ``Z`` or an offset; no offset means UTC) or a time ago (``90s``, ``15m``, ``2h``, ``7d``)."""
    v = value.strip()
    if m := _AGO.match(v.lower()):
        return (now or datetime.now(UTC)) - timedelta(**{_AGO_UNITS[m[2]]: int(m[1])})
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        raise ValueError(
            f"{value!r}: expected a time such as 2026-11-01, 2026-11-01T09:30Z or 15m (ago)"
        ) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def record_time(rec: dict) -> datetime | None:
    try:
        t = datetime.fromisoformat(str(rec.get("time")))
    except ValueError:
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def principal_names(rec: dict) -> list[str]:
    p = rec.get("principal")
    if not isinstance(p, dict) or not p:
        return ["anonymous"]
    return [str(p[k]) for k in ("display_name", "app_id", "object_id") if p.get(k)]


@dataclass(frozen=True)
class AuditQuery:
    """What ``nhi-gateway audit`` filters by; every given criterion must hold."""

    principal: str | None = None  # display name, app id or object id (any case; * and ? glob)
    decision: str | None = None  # allow, deny (or torn-tail)
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    rule: str | None = None

    def matches(self, rec: dict) -> bool:
        if self.decision is not None and rec.get("decision") != self.decision:
            return False
        if self.rule is not None and (rec.get("rule") or "") != self.rule:
            return False
        if self.principal is not None:
            wanted = self.principal.casefold()
            names = [n.casefold() for n in principal_names(rec)]
            if not any(fnmatch.fnmatchcase(n, wanted) for n in names):
                return False
        if self.since is not None or self.until is not None:
            t = record_time(rec)
            if t is None:
                return False
            if self.since is not None and t < self.since:
                return False
            if self.until is not None and t >= self.until:
                return False
        return True


def parse_head(text: str) -> tuple[int, str]:
    """``SEQ:SHA256`` as ``audit verify`` prints it."""
    seq, _, digest = text.strip().partition(":")
    if not seq.isdigit() or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"{text!r}: expected SEQ:SHA256 as `nhi-gateway audit verify` prints it "
                         "(e.g. 1042:3f5a...)")
    return int(seq), digest


def chain_head(path: str | os.PathLike[str]) -> tuple[int, str] | None:
    """``(seq, sha256 of the line)`` of the last whole record: publish it elsewhere to anchor the chain."""
    head = None
    for _, raw, rec in read_records(path):
        if rec is not None and isinstance(rec.get("seq"), int):
            head = (rec["seq"], line_hash(raw))
    return head


def check_head(path: str | os.PathLike[str], seq: int, digest: str) -> str | None:
    """Whether a head anchored earlier is still in the trail: None, or what happened to it. A
    chain verifies from its start whatever was cut off its end; only the anchor shows that."""
    last = 0
    for number, raw, rec in read_records(path):
        if rec is None or not isinstance(rec.get("seq"), int):
            continue
        last = rec["seq"]
        if last == seq:
            if line_hash(raw) == digest:
                return None
            return (f"line {number} (seq {seq}) is not the anchored head: the trail was rewritten "
                    "from that line on")
    return (f"the trail ends at seq {last}, before the anchored head seq {seq}: "
            f"{seq - last} or more lines were cut off its end")


def read_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes, dict | None]]:
    """``(line number, exact bytes without the newline, record or None)`` for every line; a
    torn last line comes out too, as None."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\n")
            yield number, raw, _parse_record(raw)
