"""Recordings on disk: where each flow goes, how files rotate, and how a crash is recovered.

Layout (dates and hours in UTC)::

    <root>/<YYYY-MM-DD>/<tenant-id>/<app>--<object-id>.mitm      one app's flows of one day
    <root>/<YYYY-MM-DD>/<tenant-id>/<app>--<object-id>.1.mitm    the same, after it reached the size limit
    <root>/<YYYY-MM-DD>/anonymous.mitm                           callers without a verified token

``<app>`` is the service principal's display name (or its app id), ``<object-id>`` the service
principal's object id: "app X, today" is ``<root>/<today>/*/X--*.mitm``, which
``nhi-gateway recordings open X`` finds and opens. With hourly rotation a ``.<HH>h`` part comes
before the size suffix (``X--<oid>.14h.mitm``, ``X--<oid>.14h.1.mitm``).

Rotation never renames a file: the first file of a day keeps its name and later parts get the next
number, so a path that someone has open in mitmweb, or wrote in a ticket, stays valid.

Writes: each flow is serialised in memory and handed to the operating system in one ``write`` on
an ``O_APPEND`` descriptor before the client gets its answer. A killed gateway (``kill -9``) loses
nothing that was written; a power failure loses at most the flows of the last ``fsync_interval``
seconds (each file is fsynced when a write finds its last fsync that old, by the gateway's timer
when no write comes, and on rotation and shutdown; ``0`` fsyncs after every flow). A record cut short
anyway (a crash inside the ``write`` of a large flow, a full disk) is moved to ``<file>.torn`` by
the next writer of that file, or at the next start, so every ``.mitm`` file stays readable by
``mitmdump -nr`` and ``mitmweb -r``.

Records: one tnetstring dict per flow, as ``FlowWriter`` writes it. :class:`RecordEncoder` makes them
from a flow's redacted state, serialising each connection once rather than once per flow; the
writer takes bytes and knows nothing of flows.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from nhi_gateway.recording import flowformat

if TYPE_CHECKING:
    from mitmproxy.connection import Connection

logger = logging.getLogger(__name__)

SUFFIX = ".mitm"
# The write-ahead log: the request half and decision of every flow about to be forwarded, written
# (and confirmed) before the request leaves the gateway. Same format as the recordings (mitmweb
# and ``mitmdump -nr`` read it), another suffix so that nothing counts its flows twice.
WRITE_AHEAD_SUFFIX = ".wal"
WRITE_AHEAD_NAME = "write-ahead"
TORN_SUFFIX = ".torn"
ANONYMOUS = "anonymous"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_FSYNC_INTERVAL = 1.0
MAX_OPEN_FILES = 64
MAX_CACHED_CONNECTIONS = 1024
ROTATIONS = ("daily", "hourly")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_-]+")
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# <app>--<oid>[.<HH>h][.w<worker>][.<n>].mitm; the object id holds no dot, so the last "--" splits.
_NAME = re.compile(
    r"^(?:(?P<app>.+)--(?P<oid>[A-Za-z0-9_-]+)|(?P<anon>anonymous))"
    r"(?:\.(?P<hour>\d{2})h)?(?:\.w(?P<worker>[1-9]\d*))?(?:\.(?P<part>[1-9]\d*))?\.mitm$"
)
_WRITE_AHEAD_OF = re.compile(r"^write-ahead(?:\.w(?P<worker>[1-9]\d*))?(?:\.[1-9]\d*)?\.wal$")


_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(value: str) -> int:
    """``67108864``, ``64m``, ``64MiB``, ``1g``: bytes (k, m, g are powers of 1024)."""
    m = _SIZE.match(value)
    if m is None or int(m[1]) == 0:
        raise ValueError(f"{value!r}: expected a positive size such as 64m, 512k or 1g")
    return int(m[1]) * 1024 ** " kmg".index(m[2].lower() or " ")


# --- layout --------------------------------------------------------------------------------------


def _safe(name: str, fallback: str, pattern: re.Pattern = _UNSAFE) -> str:
    cleaned = pattern.sub("-", name).strip("-.")[:64]
    return cleaned or fallback


def _worker_tag(worker: int | None) -> str:
    """Each worker process of ``run --workers N`` writes files of its own (``.w2``): two writers
    never share a file, its size or its torn-tail repair."""
    return f".w{worker}" if worker else ""


def recording_base(root: Path, principal: dict | None, when: datetime, hourly: bool = False,
                   worker: int | None = None) -> Path:
    """The first file of the series this flow belongs to (later parts: :func:`part_path`)."""
    principal = principal or {}
    app = principal.get("display_name") or principal.get("app_id")
    return _recording_base(root, _hour_of(when), hourly, worker, str(principal.get("object_id") or ""),
                           str(principal.get("tenant_id") or ""), str(app or ""))


def write_ahead_base(root: Path, when: datetime, worker: int | None = None) -> Path:
    """The first file of the day's write-ahead log."""
    return _write_ahead_base(root, _hour_of(when), worker)


# Every record asks for its file's path: made once per hour, caller and worker, the same Path object
# each time (it keeps its string and hash, which the writer's tables look it up by).
_PATHS_KEPT = 4096


def _hour_of(when: datetime) -> int:
    return int(when.timestamp()) // 3600


@lru_cache(maxsize=_PATHS_KEPT)
def _recording_base(root: Path, hour: int, hourly: bool, worker: int | None, object_id: str, tenant_id: str,
                    app: str) -> Path:
    when = datetime.fromtimestamp(hour * 3600, UTC)
    day = root / when.strftime("%Y-%m-%d")
    tag = (f".{when:%H}h" if hourly else "") + _worker_tag(worker)
    if not object_id:
        return day / f"{ANONYMOUS}{tag}{SUFFIX}"
    tenant = _safe(tenant_id, "unknown-tenant")
    app = _safe(app, "app")
    oid = _safe(object_id, "unknown", _UNSAFE_ID)
    return day / tenant / f"{app}--{oid}{tag}{SUFFIX}"


@lru_cache(maxsize=_PATHS_KEPT)
def _write_ahead_base(root: Path, hour: int, worker: int | None) -> Path:
    day = root / datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y-%m-%d")
    return day / f"{WRITE_AHEAD_NAME}{_worker_tag(worker)}{WRITE_AHEAD_SUFFIX}"


def _suffix_of(base: Path) -> str:
    return WRITE_AHEAD_SUFFIX if base.name.endswith(WRITE_AHEAD_SUFFIX) else SUFFIX


def part_path(base: Path, part: int) -> Path:
    suffix = _suffix_of(base)
    return base if part == 0 else base.with_name(f"{base.name[: -len(suffix)]}.{part}{suffix}")


@dataclass(frozen=True)
class RecordingName:
    app: str  # "anonymous" for callers without a token
    object_id: str
    hour: int | None
    part: int
    worker: int | None = None


def parse_name(name: str) -> RecordingName | None:
    m = _NAME.match(name)
    if m is None:
        return None
    hour = int(m["hour"]) if m["hour"] else None
    part = int(m["part"] or 0)
    worker = int(m["worker"]) if m["worker"] else None
    if m["anon"]:
        return RecordingName(ANONYMOUS, "", hour, part, worker)
    return RecordingName(m["app"], m["oid"], hour, part, worker)


def _parts_of(base: Path) -> dict[int, Path]:
    """Existing files of the series ``base`` starts, by part number."""
    found: dict[int, Path] = {}
    suffix = _suffix_of(base)
    stem = base.name[: -len(suffix)]
    if not base.parent.is_dir():
        return found
    for path in base.parent.iterdir():
        name = path.name
        if name == base.name:
            found[0] = path
        elif name.startswith(stem + ".") and name.endswith(suffix):
            middle = name[len(stem) + 1 : -len(suffix)]
            if middle.isdigit() and not middle.startswith("0"):
                found[int(middle)] = path
    return found


def sort_key(path: Path) -> tuple:
    """Files in the order their flows were written: by day, tenant, app, hour, worker, then part."""
    parsed = parse_name(path.name)
    if parsed is None:
        return (str(path.parent), path.name, -1, 0, 0)
    return (str(path.parent), parsed.app, parsed.object_id, parsed.hour or -1, parsed.worker or 0, parsed.part)


# --- framing: is the file whole? ------------------------------------------------------------------


@dataclass(frozen=True)
class Scan:
    records: int  # whole top-level records
    clean_end: int  # offset just after the last whole record
    size: int
    problem: str | None = None  # None, "torn" (last record cut short) or "corrupt"

    @property
    def whole(self) -> bool:
        return self.problem is None


_PREFIX_MAX = 12  # mitmproxy's tnetstring refuses longer length prefixes


def scan(path: Path) -> Scan:
    """Walk the tnetstring framing of a recording without decoding it.

    A record is ``<length>:<payload><type>``; each flow is one dict (type ``}``). A record that
    runs past the end of the file is a torn tail (a write cut short); anything else that does not
    frame is corruption, which this module never repairs.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = records = 0
        while offset < size:
            f.seek(offset)
            head = f.read(_PREFIX_MAX + 1)
            digits, colon, _ = head.partition(b":")
            if not colon:
                # Only the start of a length prefix, then the end of the file: cut short.
                at_end = offset + len(head) >= size and head.isdigit() and len(head) <= _PREFIX_MAX
                return Scan(records, offset, size, "torn" if at_end else "corrupt")
            if not digits.isdigit():
                return Scan(records, offset, size, "corrupt")
            end = offset + len(digits) + 1 + int(digits) + 1
            if end > size:
                return Scan(records, offset, size, "torn")
            f.seek(end - 1)
            if f.read(1) != b"}":
                return Scan(records, offset, size, "corrupt")
            offset = end
            records += 1
    return Scan(records, offset, size)


def recover_torn_tail(path: Path) -> int:
    """Move a torn last record to ``<path>.torn`` (kept as evidence) and cut it from ``path``.

    Returns the number of bytes moved. A file that is whole, or corrupt in a way a crash does
    not explain, is left as it is.
    """
    result = scan(path)
    if result.problem != "torn":
        return 0
    with open(path, "r+b") as f:
        f.seek(result.clean_end)
        tail = f.read()
        sidecar = path.with_name(path.name + TORN_SUFFIX)
        with open(sidecar, "ab") as side:
            side.write(tail)
            side.flush()
            os.fsync(side.fileno())
        f.truncate(result.clean_end)
        f.flush()
        os.fsync(f.fileno())
    logger.warning(
        "%s: the last flow was cut short (%d bytes, most likely a crash while it was written); "
        "moved to %s so the file stays readable", path, len(tail), sidecar.name,
    )
    return len(tail)


def day_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _DAY.match(p.name))


def worker_of(path: Path) -> int | None:
    """The worker whose files these are (None: a single-process gateway's, or not a recording)."""
    parsed = parse_name(path.name)
    if parsed is not None:
        return parsed.worker
    m = _WRITE_AHEAD_OF.match(path.name)
    return int(m["worker"]) if m and m["worker"] else None


def recover_recent(root: Path, days: int = 2, worker: int | None = None) -> list[Path]:
    """At start: a crash can only have torn files that were being written, which live in the
    newest day directories (the newest two cover a crash just after midnight). Only this
    worker's files: another worker may be writing its own right now."""
    repaired = []
    for day in day_dirs(root)[-days:]:
        candidates = [*day.rglob("*" + SUFFIX), *day.glob("*" + WRITE_AHEAD_SUFFIX)]
        for path in sorted(p for p in candidates if worker_of(p) == worker):
            try:
                if recover_torn_tail(path):
                    repaired.append(path)
            except OSError as e:
                logger.error("%s: cannot check for a torn tail: %s", path, e)
    return repaired


# --- encoding ------------------------------------------------------------------------------------


def encode_with_parts(state: dict, parts: tuple[bytes, ...]) -> bytes:
    """The record of a flow whose state, less its connections, is ``state``; ``parts`` are the
    connections' items, already encoded (``tnetstring.dumps(key) + tnetstring.dumps(state)``)."""
    rest = flowformat.dumps(state)
    # A tnetstring dict is "<length>:<key><value>...}" and its items may come in any order:
    # the connections' items go after the others.
    items = b"".join((rest[rest.index(b":") + 1 : -1], *parts))
    return b"%d:%s}" % (len(items), items)


class ConnectionTable:
    """Connection id -> value, least recently used first, bounded. The encoder keeps each
    connection's encoded part here; with a recording process, the gateway keeps snapshots and the
    child encoded states, and both apply the same steps in the same order, so they hold the same
    ids."""

    def __init__(self, size: int = MAX_CACHED_CONNECTIONS) -> None:
        self.size = size
        self.entries: OrderedDict[str, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def use(self, conn_id: str, value: object | None) -> object | None:
        """Store ``value`` (unless None), mark the id as just used, evict the oldest beyond the
        bound; returns what is stored for the id (None: unknown)."""
        if value is not None:
            self.entries[conn_id] = value
        stored = self.entries.get(conn_id)
        if stored is not None:
            self.entries.move_to_end(conn_id)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return stored


def connection_snapshot(conn: Connection) -> tuple:
    """What a connection is now, to tell whether it changed since its state was last encoded.
    Lists (certificate_list, alpn_offers, cipher_list) are compared by their items: mitmproxy may
    change one in place."""
    return tuple(tuple(v) if type(v) is list else v for v in vars(conn).values())


class RecordEncoder:
    """Flow states to records, with each connection's part serialised once while it stays the same.

    A connection's state (addresses, TLS parameters, the server's certificate chain as PEM) is the
    same for every request on it, and serialising it through mitmproxy's generic ``get_state`` costs
    more than the rest of the flow. Its record part is kept per connection id until any attribute
    of the connection changes (TLS set up, closed, an error), for the most recent connections.
    """

    def __init__(self, max_connections: int = MAX_CACHED_CONNECTIONS) -> None:
        self._parts = ConnectionTable(max_connections)  # id -> (snapshot, encoded part)

    def encode(self, state: dict, client_conn: Connection, server_conn: Connection) -> bytes:
        """The record of a flow whose state, less its connections, is ``state``."""
        return encode_with_parts(state, (self._part("client_conn", client_conn),
                                         self._part("server_conn", server_conn)))

    def _part(self, key: str, conn: Connection) -> bytes:
        snapshot = connection_snapshot(conn)
        cached = self._parts.use(conn.id, None)
        if cached is not None and cached[0] == snapshot:
            encoded = cached[1]
        else:
            state = conn.get_state()
            try:
                encoded = flowformat.dumps(state)
            except UnicodeEncodeError:  # an SNI or address that is not UTF-8: written escaped
                encoded = flowformat.dumps(flowformat.escape_unencodable(state))
            self._parts.use(conn.id, (snapshot, encoded))
        return flowformat.dumps(key) + encoded


# --- writing -------------------------------------------------------------------------------------


@dataclass
class _Series:
    part: int
    size: int
    path: Path | None = None  # the part's file, once asked for
    fd: int | None = None
    synced: float = 0.0
    dirty: bool = False


class RecordingWriter:
    """Appends whole records to the series of files a base path starts, rotating by size."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES,
                 fsync_interval: float = DEFAULT_FSYNC_INTERVAL,
                 max_open: int = MAX_OPEN_FILES, clock=time.monotonic) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if fsync_interval < 0:
            raise ValueError("fsync_interval must be 0 (every flow) or more seconds")
        self.max_bytes = max_bytes
        self.fsync_interval = fsync_interval
        # False: appends never fsync; the owner calls sync_due() when it suits it (the recording
        # process, after it has confirmed a batch of flows).
        self.sync_in_append = True
        self.max_open = max_open
        self.clock = clock
        self._series: dict[Path, _Series] = {}
        self._open: OrderedDict[Path, _Series] = OrderedDict()  # by base, least recently used first

    def _discover(self, base: Path) -> _Series:
        """Continue the newest existing part of a series, unless it is full or not whole."""
        parts = _parts_of(base)
        if not parts:
            return _Series(part=0, size=0)
        part = max(parts)
        path = parts[part]
        recover_torn_tail(path)
        result = scan(path)
        if not result.whole:
            logger.error("%s is corrupt at byte %d; new flows go to the next part", path,
                         result.clean_end)
            return _Series(part=part + 1, size=0)
        return _Series(part=part, size=result.size)

    def _close(self, series: _Series) -> None:
        if series.fd is None:
            return
        fd, series.fd = series.fd, None
        try:
            if series.dirty:
                os.fsync(fd)
                series.dirty = False
        finally:
            os.close(fd)

    def _fd(self, base: Path, series: _Series) -> int:
        if series.fd is not None:
            self._open.move_to_end(base)
            return series.fd
        path = part_path(base, series.part)
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        series.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        series.synced = self.clock()
        if created:
            # The new name must survive a power failure as well as the flows in it.
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self._open[base] = series
        while len(self._open) > self.max_open:
            _, oldest = self._open.popitem(last=False)
            self._close(oldest)
        return series.fd

    def append(self, base: Path, record: bytes) -> Path:
        """Write one whole record; returns the file it went to."""
        series = self._series.get(base)
        if series is None:
            series = self._series[base] = self._discover(base)
        if series.size and series.size + len(record) > self.max_bytes:
            self._open.pop(base, None)
            self._close(series)
            series.part, series.size, series.path = series.part + 1, 0, None
        fd = self._fd(base, series)
        view = memoryview(record)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            # Part of the record may be on disk: the next write must start from a whole file.
            self._open.pop(base, None)
            self._series.pop(base, None)
            try:
                self._close(series)
            except OSError:
                pass
            raise
        series.size += len(record)
        series.dirty = True
        now = self.clock()
        if self.sync_in_append and now - series.synced >= self.fsync_interval:
            os.fsync(fd)
            series.synced, series.dirty = now, False
        if series.path is None:
            series.path = part_path(base, series.part)
        return series.path

    def sync_due(self) -> None:
        """fsync every open file holding flows older than the interval: called on a timer, so a
        file that stops receiving flows is synced too."""
        now = self.clock()
        for series in list(self._open.values()):
            if series.dirty and series.fd is not None and now - series.synced >= self.fsync_interval:
                os.fsync(series.fd)
                series.synced, series.dirty = now, False

    def close(self) -> None:
        errors = []
        for series in list(self._open.values()):
            try:
                self._close(series)
            except OSError as e:
                errors.append(e)
        self._open.clear()
        self._series.clear()
        if errors:
            raise errors[0]


# --- finding -------------------------------------------------------------------------------------


def parse_day(value: str, today: date | None = None) -> date | None:
    """``today``, ``yesterday``, ``YYYY-MM-DD``, or ``all`` (None)."""
    today = today or datetime.now(UTC).date()
    v = value.strip().lower()
    if v == "all":
        return None
    if v == "today":
        return today
    if v == "yesterday":
        return today - timedelta(days=1)
    try:
        return date.fromisoformat(v)
    except ValueError:
        raise ValueError(f"{value!r}: expected today, yesterday, all or a date like 2026-11-01") from None


@dataclass(frozen=True)
class Recording:
    """One series: an app's (or the anonymous callers') files of one day."""

    day: str
    tenant: str
    app: str
    object_id: str
    files: tuple[Path, ...]

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def list_recordings(root: Path, day: date | None = None) -> list[Recording]:
    days = day_dirs(root)
    if day is not None:
        days = [d for d in days if d.name == day.isoformat()]
    groups: dict[tuple, list[Path]] = {}
    for d in days:
        for path in d.rglob("*" + SUFFIX):
            parsed = parse_name(path.name)
            if parsed is None:
                continue
            tenant = "" if path.parent == d else path.parent.name
            key = (d.name, tenant, parsed.app, parsed.object_id)
            groups.setdefault(key, []).append(path)
    return [
        Recording(day_name, tenant, app, oid, tuple(sorted(files, key=sort_key)))
        for (day_name, tenant, app, oid), files in sorted(groups.items())
    ]


def find(root: Path, who: str, day: date | None) -> list[Path]:
    """The files of the app named ``who`` (display name or object id, any case) on ``day``.

    ``who`` may also be a path: a ``.mitm`` file, or a directory whose recordings are all taken.
    """
    as_path = Path(who)
    if as_path.is_file():
        return [as_path]
    if as_path.is_dir():
        return sorted(as_path.rglob("*" + SUFFIX), key=sort_key)
    wanted = who.strip().casefold()
    safe_wanted = _safe(who, "", _UNSAFE).casefold()
    out: list[Path] = []
    for rec in list_recordings(root, day):
        if wanted in (rec.app.casefold(), rec.object_id.casefold()) or (
            safe_wanted and safe_wanted == rec.app.casefold()
        ):
            out.extend(rec.files)
    return out
