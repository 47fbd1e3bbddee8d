"""Just-in-time approval: a risky request waits for a person, who allows it once or for a while.

A rule with ``action: approve`` does not fail the request: the gateway holds it and opens an
:class:`ApprovalRequest` (the principal, the normalised operation, a digest of the exact request
and an expiry). A person named by the rule's ``approvers`` decides through the gateway's approval
API; the held request then goes on (approved) or is refused (denied, timed out, cancelled).

By default an approval releases exactly the held request: the one whose method, URL and body the
approver was shown (:func:`request_digest`). Approving ``for`` a duration also creates a
:class:`Grant`: later requests of the same principal for the same normalised operation under the
same rule are allowed without asking again until the grant expires (at most the rule's
``max_grant``) or is revoked. Grants and requests live in SQLite (:class:`ApprovalStore`), so
grants outlive a restart; a request still pending when the gateway stops is cancelled, because
the connection that waited for it is gone.

No identity can approve its own request (same tenant and object id), whatever the policy says.

Plain Python: no mitmproxy import. The holding addon (:mod:`nhi_gateway.addons.approval`) and the
API addon (:mod:`nhi_gateway.addons.approvals_api`) are thin adapters around :class:`Approvals`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300  # seconds a request is held when the rule names no timeout
MAX_REASON = 500  # characters of an approver's reason that are kept
RECENT = 100  # decided requests GET /approvals?state=all shows

_DURATION = re.compile(r"(\d+)\s*([smhd])", re.I)
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# --- small values --------------------------------------------------------------------------------


def parse_duration(text: str) -> int:
    """``"90s"``, ``"15m"``, ``"1h"``, ``"1h30m"``, ``"2d"`` -> seconds. Raises ValueError."""
    value = str(text).strip().lower()
    pos, total = 0, 0
    for m in _DURATION.finditer(value):
        if value[pos : m.start()].strip():
            break
        total += int(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not value or pos == 0 or value[pos:].strip() or total <= 0:
        raise ValueError(f"{text!r} is not a duration: write e.g. 30s, 15m, 1h or 1h30m")
    return total


def format_duration(seconds: float) -> str:
    """Seconds as the shortest spelling :func:`parse_duration` reads back: ``5400 -> "1h30m"``."""
    seconds = max(0, int(round(seconds)))
    if seconds == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, seconds = divmod(seconds, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_id(prefix: str) -> str:
    """Short enough to type from a chat message, long enough (60 bits) not to be guessed."""
    return f"{prefix}-{base64.b32encode(secrets.token_bytes(10)).decode('ascii').lower()[:12]}"


def request_digest(method: str, url: str, body: bytes) -> str:
    """What an approval of "exactly this request" is bound to: method, URL and body, each
    length-prefixed so no two different requests share the input."""
    h = hashlib.sha256()
    for part in (method.upper().encode("utf-8"), url.encode("utf-8", "surrogateescape")):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    h.update(hashlib.sha256(body).digest())
    return "sha256:" + h.hexdigest()


# --- who may approve -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Approver:
    """The person (or identity) who decided. ``display_name`` is for reading, never for deciding."""

    tenant_id: str
    object_id: str
    display_name: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant_id.lower(), self.object_id.lower())

    @property
    def label(self) -> str:
        return f"{self.display_name} ({self.object_id})" if self.display_name else self.object_id

    def to_dict(self) -> dict:
        return {"object_id": self.object_id, "tenant_id": self.tenant_id, "display_name": self.display_name}

    @classmethod
    def from_dict(cls, d: dict | None) -> Approver | None:
        if not d:
            return None
        return cls(str(d.get("tenant_id", "")), str(d.get("object_id", "")), str(d.get("display_name", "")))


@dataclass(frozen=True)
class ApproverList:
    """A rule's ``approvers``: user (or service principal) object ids and group ids."""

    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.users or self.groups)

    def names(self, object_id: str, groups: Iterable[str] = ()) -> bool:
        if object_id.lower() in self.users:
            return True
        return any(g.lower() in self.groups for g in groups)

    def describe(self) -> str:
        parts = [f"users {', '.join(sorted(self.users))}"] if self.users else []
        parts += [f"groups {', '.join(sorted(self.groups))}"] if self.groups else []
        return "; ".join(parts) or "nobody"


def _ids(value: object) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        value = [value]
    return frozenset(str(v).strip().lower() for v in value if str(v).strip())


@dataclass(frozen=True)
class ApprovalSettings:
    """What an ``approve`` rule says: who approves, how long a request waits, the longest grant."""

    rule_id: str
    approvers: ApproverList
    timeout: int = DEFAULT_TIMEOUT  # seconds
    max_grant: int = 0  # seconds; 0: approvals cover the held request only

    @classmethod
    def of(cls, rule: object) -> ApprovalSettings | None:
        """From a policy :class:`~nhi_gateway.policy.model.Rule` with ``action: approve`` (its
        ``approval``); None for any other rule."""
        approval = getattr(rule, "approval", None)
        if approval is None or str(getattr(rule, "action", "")) != "approve":
            return None
        return cls(
            rule_id=str(rule.id),
            approvers=ApproverList(_ids(approval.users), _ids(approval.groups)),
            timeout=max(1, int(approval.timeout_seconds or DEFAULT_TIMEOUT)),
            max_grant=max(0, int(approval.max_grant_seconds or 0)),
        )


def approval_rules(policy: object) -> dict[str, ApprovalSettings]:
    """The ``approve`` rules of a policy, by id."""
    out = {}
    for rule in getattr(policy, "rules", ()):
        settings = ApprovalSettings.of(rule)
        if settings is not None:
            out[settings.rule_id] = settings
    return out


def webhook_url(policy: object) -> str | None:
    """The policy's ``approvals: {webhook: URL}``, read defensively (absent means no webhook)."""
    section = getattr(policy, "approvals", None)
    url = section.get("webhook") if isinstance(section, dict) else getattr(section, "webhook", None)
    return url if isinstance(url, str) and url.strip() else None


# --- requests and grants ---------------------------------------------------------------------------


class ApprovalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"


class ApprovalError(Exception):
    """Why an approver's action was refused, as the API answers it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _principal_label(p: dict) -> str:
    name = p.get("display_name") or p.get("app_id") or "?"
    return f"{name} ({p.get('object_id', '?')})"


@dataclass(frozen=True)
class ApprovalRequest:
    id: str
    rule_id: str
    principal: dict  # Principal.to_dict() of the caller whose request is held
    operation: str  # the normalised operation: "POST graph.microsoft.com /v1.0/applications/x/addpassword"
    method: str
    url: str  # credentials redacted: for people to read; the digest covers the URL as sent
    digest: str
    created_at: float
    expires_at: float
    max_grant: int = 0
    body_size: int = 0
    body_preview: str = ""
    flow_id: str = ""
    state: ApprovalState = ApprovalState.PENDING
    approver: Approver | None = None
    reason: str = ""
    decided_at: float | None = None
    grant_id: str | None = None

    @property
    def principal_key(self) -> tuple[str, str]:
        return (str(self.principal.get("tenant_id", "")).lower(), str(self.principal.get("object_id", "")).lower())

    @property
    def who(self) -> str:
        return _principal_label(self.principal)

    def outcome(self) -> dict:
        """``Decision.extra["approval"]``: what the recording and the audit trail carry."""
        out = {
            "id": self.id,
            "state": str(self.state),
            "approver": self.approver.to_dict() if self.approver else None,
            "reason": self.reason,
        }
        if self.grant_id:
            out["grant_id"] = self.grant_id
        return out

    def to_dict(self) -> dict:
        """The API's view: JSON-safe, times in UTC."""
        return {
            "id": self.id,
            "state": str(self.state),
            "rule": self.rule_id,
            "principal": {k: self.principal.get(k, "") for k in ("tenant_id", "object_id", "app_id", "display_name")},
            "operation": self.operation,
            "method": self.method,
            "url": self.url,
            "digest": self.digest,
            "body_size": self.body_size,
            "body_preview": self.body_preview,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "max_grant": format_duration(self.max_grant) if self.max_grant else None,
            "approver": self.approver.to_dict() if self.approver else None,
            "reason": self.reason,
            "decided_at": iso(self.decided_at),
            "grant_id": self.grant_id,
        }


@dataclass(frozen=True)
class Grant:
    """Approval for a time: the same principal may perform the same operation under the same rule."""

    id: str
    approval_id: str
    rule_id: str
    principal: dict
    operation: str
    approver: Approver
    reason: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None
    revoked_by: Approver | None = None

    @property
    def principal_key(self) -> tuple[str, str]:
        return (str(self.principal.get("tenant_id", "")).lower(), str(self.principal.get("object_id", "")).lower())

    def active(self, now: float) -> bool:
        return self.revoked_at is None and self.expires_at > now

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "active" if self.expires_at > now else "expired"

    def to_dict(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        return {
            "id": self.id,
            "state": self.state(now),
            "approval_id": self.approval_id,
            "rule": self.rule_id,
            "principal": {k: self.principal.get(k, "") for k in ("tenant_id", "object_id", "app_id", "display_name")},
            "operation": self.operation,
            "approver": self.approver.to_dict(),
            "reason": self.reason,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "revoked_by": self.revoked_by.to_dict() if self.revoked_by else None,
        }


# --- persistence ---------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    rule_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    object_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    operation TEXT NOT NULL,
    method TEXT NOT NULL,
    url TEXT NOT NULL,
    digest TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    max_grant INTEGER NOT NULL DEFAULT 0,
    body_size INTEGER NOT NULL DEFAULT 0,
    body_preview TEXT NOT NULL DEFAULT '',
    flow_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    approver TEXT,
    reason TEXT NOT NULL DEFAULT '',
    decided_at REAL,
    grant_id TEXT
);
CREATE INDEX IF NOT EXISTS approvals_state ON approvals (state, created_at);
CREATE TABLE IF NOT EXISTS grants (
    id TEXT PRIMARY KEY,
    approval_id TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    object_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    operation TEXT NOT NULL,
    approver TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL,
    revoked_by TEXT
);
CREATE INDEX IF NOT EXISTS grants_lookup ON grants (tenant_id, object_id, operation, rule_id, expires_at);
"""


def _json(value: object) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


class ApprovalStoreError(OSError):
    """The approvals database cannot be read or written: approvals fail closed (503)."""


def _insert(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({','.join('?' * len(columns))})"


class ApprovalTables:
    """The ``approvals`` and ``grants`` tables as both stores read and write them: the columns,
    the row <-> object mapping and every statement the SQLite and the PostgreSQL store share.

    Statements are written with SQLite's ``?`` placeholders; a store supplies ``_rows(sql, args)``
    and ``_write(sql, args)`` (the PostgreSQL store spells the placeholders ``%s`` there), and
    its own ``add``, ``finish``, ``approve_with_grant`` and ``cancel_pending``, which differ in
    their transactions (and in PostgreSQL, in the replica that holds a request).
    """

    _REQUEST_COLUMNS = (
        "id", "rule_id", "tenant_id", "object_id", "principal", "operation", "method", "url", "digest",
        "created_at", "expires_at", "max_grant", "body_size", "body_preview", "flow_id", "state", "approver",
        "reason", "decided_at", "grant_id")
    _INSERT_REQUEST = _insert("approvals", _REQUEST_COLUMNS)
    _INSERT_GRANT = _insert("grants", (
        "id", "approval_id", "rule_id", "tenant_id", "object_id", "principal", "operation", "approver",
        "reason", "created_at", "expires_at", "revoked_at", "revoked_by"))
    # Only a pending request is decided: of two deciders exactly one changes the row.
    _FINISH = ("UPDATE approvals SET state = ?, approver = ?, reason = ?, decided_at = ?, grant_id = ?"
               " WHERE id = ? AND state = 'pending'")

    def _rows(self, sql: str, args: tuple = ()) -> list:
        raise NotImplementedError

    def _write(self, sql: str, args: tuple = ()) -> int:
        raise NotImplementedError

    # -- rows and objects ------------------------------------------------------------------

    @staticmethod
    def _request_row(r: ApprovalRequest) -> tuple:
        """The values of :attr:`_REQUEST_COLUMNS`, in order."""
        return (r.id, r.rule_id, *r.principal_key, _json(r.principal), r.operation, r.method, r.url, r.digest,
                r.created_at, r.expires_at, r.max_grant, r.body_size, r.body_preview, r.flow_id, str(r.state),
                _json(r.approver.to_dict() if r.approver else None), r.reason, r.decided_at, r.grant_id)

    @staticmethod
    def _request(row: sqlite3.Row | dict) -> ApprovalRequest:
        return ApprovalRequest(
            id=row["id"], rule_id=row["rule_id"], principal=json.loads(row["principal"]),
            operation=row["operation"], method=row["method"], url=row["url"], digest=row["digest"],
            created_at=row["created_at"], expires_at=row["expires_at"], max_grant=row["max_grant"],
            body_size=row["body_size"], body_preview=row["body_preview"], flow_id=row["flow_id"],
            state=ApprovalState(row["state"]),
            approver=Approver.from_dict(json.loads(row["approver"]) if row["approver"] else None),
            reason=row["reason"], decided_at=row["decided_at"], grant_id=row["grant_id"],
        )

    @staticmethod
    def _finish_args(request_id: str, state: ApprovalState, approver: Approver | None, reason: str, now: float,
                     grant_id: str | None) -> tuple:
        """The values of :attr:`_FINISH`, in order."""
        return (str(state), _json(approver.to_dict() if approver else None), reason, now, grant_id, request_id)

    @staticmethod
    def _grant_row(g: Grant) -> tuple:
        return (g.id, g.approval_id, g.rule_id, *g.principal_key, _json(g.principal), g.operation,
                _json(g.approver.to_dict()), g.reason, g.created_at, g.expires_at, g.revoked_at,
                _json(g.revoked_by.to_dict() if g.revoked_by else None))

    @staticmethod
    def _grant(row: sqlite3.Row | dict) -> Grant:
        return Grant(
            id=row["id"], approval_id=row["approval_id"], rule_id=row["rule_id"],
            principal=json.loads(row["principal"]), operation=row["operation"],
            approver=Approver.from_dict(json.loads(row["approver"])) or Approver("", ""),
            reason=row["reason"], created_at=row["created_at"], expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
            revoked_by=Approver.from_dict(json.loads(row["revoked_by"]) if row["revoked_by"] else None),
        )

    # -- requests --------------------------------------------------------------------------

    _GET_REQUEST = "SELECT * FROM approvals WHERE id = ?"
    _GET_GRANT = "SELECT * FROM grants WHERE id = ?"

    def get(self, request_id: str) -> ApprovalRequest | None:
        rows = self._rows(self._GET_REQUEST, (request_id,))
        return self._request(rows[0]) if rows else None

    def requests(self, *, pending_only: bool = True, limit: int = RECENT) -> list[ApprovalRequest]:
        if pending_only:
            rows = self._rows("SELECT * FROM approvals WHERE state = 'pending' ORDER BY created_at")
        else:
            rows = self._rows("SELECT * FROM approvals ORDER BY created_at DESC LIMIT ?", (limit,))
        return [self._request(r) for r in rows]

    # -- grants ----------------------------------------------------------------------------

    def grant(self, grant_id: str) -> Grant | None:
        rows = self._rows(self._GET_GRANT, (grant_id,))
        return self._grant(rows[0]) if rows else None

    def grants(self, *, now: float, active_only: bool = True, limit: int = RECENT) -> list[Grant]:
        if active_only:
            rows = self._rows("SELECT * FROM grants WHERE revoked_at IS NULL AND expires_at > ? ORDER BY expires_at",
                              (now,))
        else:
            rows = self._rows("SELECT * FROM grants ORDER BY created_at DESC LIMIT ?", (limit,))
        return [self._grant(r) for r in rows]

    _ACTIVE_GRANT = ("SELECT * FROM grants WHERE tenant_id = ? AND object_id = ? AND operation = ? AND rule_id = ?"
                     " AND revoked_at IS NULL AND expires_at > ? ORDER BY expires_at DESC LIMIT 1")

    def active_grant(self, principal_key: tuple[str, str], operation: str, rule_id: str, now: float) -> Grant | None:
        rows = self._rows(self._ACTIVE_GRANT, (*principal_key, operation, rule_id, now))
        return self._grant(rows[0]) if rows else None

    def add_grant(self, g: Grant) -> None:
        self._write(self._INSERT_GRANT, self._grant_row(g))

    def revoke(self, grant_id: str, by: Approver, now: float) -> bool:
        return self._write(
            "UPDATE grants SET revoked_at = ?, revoked_by = ? WHERE id = ? AND revoked_at IS NULL AND expires_at > ?",
            (now, _json(by.to_dict()), grant_id, now),
        ) == 1


class ApprovalStore(ApprovalTables):
    """Approval requests and grants in one SQLite file.

    Every write is committed before the call returns (an approval is acted on only once it is
    durable). The file is opened on first use, so a gateway whose disk is broken still starts
    and refuses what needs approval. Calls take a lock: the API and the data path share one store.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            memory = str(self.path) == ":memory:"
            if not memory:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            try:
                db.row_factory = sqlite3.Row
                if not memory:
                    db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.executescript(_SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _run(self, sql: str, args: tuple) -> sqlite3.Cursor:
        try:
            return self._connect().execute(sql, args)
        except (sqlite3.Error, OSError) as e:
            raise ApprovalStoreError(f"the approvals database {self.path} cannot be used: {e}") from e

    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._run(sql, args).fetchall()

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._run(sql, args).rowcount

    # -- requests --------------------------------------------------------------------------

    def add(self, r: ApprovalRequest) -> None:
        self._write(self._INSERT_REQUEST, self._request_row(r))

    def finish(self, request_id: str, state: ApprovalState, *, approver: Approver | None = None,
               reason: str = "", now: float, grant_id: str | None = None) -> bool:
        """Move a pending request to its final state; False when it was no longer pending."""
        return self._write(self._FINISH, self._finish_args(request_id, state, approver, reason, now, grant_id)) == 1

    def cancel_pending(self, reason: str, now: float) -> int:
        """At start and stop: nobody waits for these any more."""
        return self._write(
            "UPDATE approvals SET state = 'cancelled', reason = ?, decided_at = ? WHERE state = 'pending'",
            (reason, now),
        )

    def approve_with_grant(self, request_id: str, grant: Grant, *, approver: Approver, reason: str,
                           now: float) -> bool:
        """Approve a pending request and store its grant in one transaction: both or neither.
        False (and no grant) when the request was no longer pending; ApprovalStoreError (and no
        grant) when the database fails anywhere on the way, so a grant is never active for an
        approval that was not stored."""
        with self._lock:
            db = None
            try:
                db = self._connect()
                db.execute("BEGIN IMMEDIATE")
                db.execute(self._INSERT_GRANT, self._grant_row(grant))
                updated = db.execute(self._FINISH, self._finish_args(
                    request_id, ApprovalState.APPROVED, approver, reason, now, grant.id)).rowcount
                db.execute("COMMIT" if updated == 1 else "ROLLBACK")
                return updated == 1
            except (sqlite3.Error, OSError) as e:
                if db is not None and db.in_transaction:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the transaction dies with the connection
                raise ApprovalStoreError(f"the approvals database {self.path} cannot be used: {e}") from e


# --- the running gateway's approvals ------------------------------------------------------------


@dataclass
class Approvals:
    """Opens approval requests, lets held requests wait for them, and records what approvers do.

    Waiting is an asyncio future per request, so any number of held requests wait without
    blocking each other or other traffic; the state that counts is the store's.
    """

    store: ApprovalStore
    clock: Callable[[], float] = time.time
    _waiting: dict[str, asyncio.Future] = field(default_factory=dict)
    _tasks: set[asyncio.Task] = field(default_factory=set)

    def __post_init__(self) -> None:
        # A shared store (PostgreSQL) tells us when another replica decided a request held here.
        on_change = getattr(self.store, "on_change", None)
        if on_change is not None:
            on_change(self._changed)

    def _changed(self, request_id: str | None) -> None:
        """From the store's listener thread: ``request_id`` was decided (None: any may have been)."""
        ids = list(self._waiting) if request_id is None else [request_id]
        for rid in ids:
            future = self._waiting.get(rid)
            if future is not None and not future.done():
                future.get_loop().call_soon_threadsafe(self._wake, rid)

    def _wake(self, request_id: str) -> None:
        future = self._waiting.get(request_id)
        if future is None or future.done():
            return
        self._spawn(self._wake_async(request_id))

    async def _wake_async(self, request_id: str) -> None:
        try:
            final = await self._store("get", request_id)
        except ApprovalStoreError:
            return  # the listener tells us again once the store is back
        if final is not None and final.state is not ApprovalState.PENDING:
            self._deliver(final)

    def _spawn(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # kept until done: the loop holds only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _store(self, name: str, *args, **kwargs):
        """The store's call ``name`` from the event loop: its asyncio version for a store on a
        server (PostgreSQL), so the loop serves other requests while it waits; the embedded
        store's own call otherwise (its local file answers at once)."""
        call = getattr(self.store, f"{name}_async", None)
        if call is None:
            return getattr(self.store, name)(*args, **kwargs)
        return await call(*args, **kwargs)

    @property
    def _remote(self) -> bool:
        return hasattr(self.store, "active_grant_async")

    # -- the data path ---------------------------------------------------------------------

    def open(self, *, settings: ApprovalSettings, principal: dict, operation: str, method: str, url: str,
             digest: str, body_size: int = 0, body_preview: str = "", flow_id: str = "") -> ApprovalRequest:
        request = self._new_request(settings, principal, operation, method, url, digest, body_size, body_preview,
                                    flow_id)
        self.store.add(request)
        self._waiting[request.id] = asyncio.get_running_loop().create_future()
        return request

    async def open_request(self, *, settings: ApprovalSettings, principal: dict, operation: str, method: str,
                           url: str, digest: str, body_size: int = 0, body_preview: str = "",
                           flow_id: str = "") -> ApprovalRequest:
        """:meth:`open` for a request in flight: a store on a server writes it off the event loop."""
        request = self._new_request(settings, principal, operation, method, url, digest, body_size, body_preview,
                                    flow_id)
        # Waited for before it exists: a decision through another replica may come as soon as the
        # row is committed, and is delivered only to a request that is waited for.
        self._waiting[request.id] = asyncio.get_running_loop().create_future()
        try:
            await self._store("add", request)
        except BaseException:
            self._waiting.pop(request.id, None)
            raise
        return request

    def _new_request(self, settings: ApprovalSettings, principal: dict, operation: str, method: str, url: str,
                     digest: str, body_size: int, body_preview: str, flow_id: str) -> ApprovalRequest:
        now = self.clock()
        return ApprovalRequest(
            id=new_id("apr"), rule_id=settings.rule_id, principal=dict(principal), operation=operation,
            method=method, url=url, digest=digest, created_at=now, expires_at=now + settings.timeout,
            max_grant=settings.max_grant, body_size=body_size, body_preview=body_preview, flow_id=flow_id,
        )

    async def off_loop(self, work: Callable, *args, **kwargs):
        """``work(*args, **kwargs)``, a synchronous call of approvers (the API's decisions and lists),
        in a worker thread when the store talks to a server (PostgreSQL, which bounds each call at
        2 s), so the event loop serves other requests meanwhile; the embedded store answers from
        its local file at once, on the loop."""
        if not self._remote:
            return work(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(None, functools.partial(work, *args, **kwargs))

    async def outcome(self, request: ApprovalRequest) -> ApprovalRequest:
        """Wait until the request is decided, cancelled or expires; returns its final state."""
        future = self._waiting.get(request.id)
        try:
            if future is not None:
                remaining = max(0.0, request.expires_at - self.clock())
                try:
                    return await asyncio.wait_for(asyncio.shield(future), remaining)
                except TimeoutError:
                    pass
            await self._store("finish", request.id, ApprovalState.TIMED_OUT, reason="approval timed out",
                              now=self.clock())
            final = await self._store("get", request.id)
            assert final is not None
            return final
        finally:
            self._waiting.pop(request.id, None)

    def cancel(self, request_id: str, reason: str) -> ApprovalRequest | None:
        """The client went away (or the gateway stops): nobody should approve this any more."""
        if self.store.finish(request_id, ApprovalState.CANCELLED, reason=reason, now=self.clock()):
            return self._settle(request_id)
        return None

    async def cancel_async(self, request_id: str, reason: str) -> ApprovalRequest | None:
        """:meth:`cancel` from the event loop."""
        if await self._store("finish", request_id, ApprovalState.CANCELLED, reason=reason, now=self.clock()):
            final = await self._store("get", request_id)
            assert final is not None
            self._deliver(final)
            return final
        return None

    def cancel_soon(self, request_id: str, reason: str,
                    then: Callable[[ApprovalRequest | None], None] = lambda final: None) -> None:
        """:meth:`cancel` for a hook that cannot wait (a client gone, a stop): at once on the
        embedded store; on a server, in a task of the event loop. ``then`` gets what
        :meth:`cancel` returns; a store that fails is logged (the held request then times out,
        which refuses it too)."""
        if not self._remote:
            then(self.cancel(request_id, reason))
            return

        async def cancelling() -> None:
            try:
                then(await self.cancel_async(request_id, reason))
            except ApprovalStoreError as e:
                logger.error("cancelling approval %s failed: %s", request_id, e)

        self._spawn(cancelling())

    async def find_grant(self, grant_id: str) -> Grant | None:
        """The grant ``grant_id``, read from the event loop."""
        return await self._store("grant", grant_id)

    def grant_for(self, principal_key: tuple[str, str], operation: str, rule_id: str) -> Grant | None:
        return self.store.active_grant(principal_key, operation, rule_id, self.clock())

    async def grant_for_request(self, principal_key: tuple[str, str], operation: str, rule_id: str) -> Grant | None:
        """:meth:`grant_for` for a request in flight: a store on a server (PostgreSQL) looks the
        grant up off the event loop, so other requests flow while it waits; the embedded store
        answers from its local file at once."""
        return await self._store("active_grant", principal_key, operation, rule_id, self.clock())

    def _settle(self, request_id: str) -> ApprovalRequest:
        final = self.store.get(request_id)
        assert final is not None
        self._deliver(final)
        return final

    def _deliver(self, final: ApprovalRequest) -> None:
        """Hand the decided request to whoever holds it here; from any thread (approvers' calls
        run in worker threads with a store on a server), on the loop of its future."""
        future = self._waiting.get(final.id)
        if future is None or future.done():
            return
        loop = future.get_loop()
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            future.set_result(final)
        else:
            loop.call_soon_threadsafe(lambda: future.done() or future.set_result(final))

    # -- approvers -------------------------------------------------------------------------

    def pending(self, request_id: str) -> ApprovalRequest:
        request = self.store.get(request_id)
        if request is None:
            raise ApprovalError(404, "NotFound", f"no approval request {request_id!r}")
        if request.state is not ApprovalState.PENDING:
            raise ApprovalError(409, "Conflict", f"approval request {request.id} is already {request.state}")
        if request.expires_at <= self.clock():
            raise ApprovalError(409, "Conflict", f"approval request {request.id} has expired")
        return request

    def check_approve(self, request_id: str, approver: Approver, grant_seconds: int | None = None,
                      max_grant: int | None = None) -> ApprovalRequest:
        """Everything :meth:`approve` checks, without changing anything (so the caller can make
        the audit line durable first); the caller checked ``approver`` is named by the rule.
        ``max_grant``: the rule's cap now, when the policy was reloaded since the request was held
        (the lower of the two counts)."""
        request = self.pending(request_id)
        check_not_self(request, approver)
        if grant_seconds is not None:
            cap = request.max_grant if max_grant is None else min(request.max_grant, max_grant)
            if grant_seconds <= 0:
                raise ApprovalError(400, "BadRequest", "the duration of a grant must be positive")
            if cap <= 0:
                raise ApprovalError(
                    400, "BadRequest",
                    f"rule {request.rule_id!r} sets no max_grant: its approvals cover the held request only "
                    "(approve without --for)")
            if grant_seconds > cap:
                raise ApprovalError(
                    400, "BadRequest",
                    f"a grant for {format_duration(grant_seconds)} is longer than rule {request.rule_id!r} "
                    f"allows (max_grant {format_duration(cap)})")
        return request

    def approve(self, request_id: str, approver: Approver, *, reason: str = "",
                grant_seconds: int | None = None, max_grant: int | None = None) -> tuple[ApprovalRequest, Grant | None]:
        """Approve a pending request; with ``grant_seconds``, also grant the operation for that long."""
        request = self.check_approve(request_id, approver, grant_seconds, max_grant)
        now = self.clock()
        grant = None
        if grant_seconds is not None:
            grant = Grant(
                id=new_id("grt"), approval_id=request.id, rule_id=request.rule_id, principal=request.principal,
                operation=request.operation, approver=approver, reason=_reason(reason), created_at=now,
                expires_at=now + grant_seconds,
            )
            stored = self.store.approve_with_grant(request.id, grant, approver=approver, reason=_reason(reason),
                                                   now=now)
        else:
            stored = self.store.finish(request.id, ApprovalState.APPROVED, approver=approver,
                                       reason=_reason(reason), now=now)
        if not stored:
            raise ApprovalError(409, "Conflict", f"approval request {request.id} was decided meanwhile")
        return self._settle(request.id), grant

    def deny(self, request_id: str, approver: Approver, *, reason: str = "") -> ApprovalRequest:
        request = self.pending(request_id)
        if not self.store.finish(request.id, ApprovalState.DENIED, approver=approver, reason=_reason(reason),
                                 now=self.clock()):
            raise ApprovalError(409, "Conflict", f"approval request {request.id} was decided meanwhile")
        return self._settle(request.id)

    def revoke(self, grant_id: str, by: Approver) -> Grant:
        grant = self.store.grant(grant_id)
        if grant is None:
            raise ApprovalError(404, "NotFound", f"no grant {grant_id!r}")
        if not self.store.revoke(grant_id, by, self.clock()):
            raise ApprovalError(409, "Conflict", f"grant {grant_id} is already {grant.state(self.clock())}")
        revoked = self.store.grant(grant_id)
        assert revoked is not None
        return revoked

    def close(self, reason: str = "the gateway stopped while the request was held") -> None:
        try:
            for request_id in list(self._waiting):
                self.cancel(request_id, reason)
        except ApprovalStoreError:
            pass  # the next start cancels whatever is still pending
        self.store.close()

    async def aclose(self, reason: str = "the gateway stopped while the request was held") -> None:
        """:meth:`close` from the event loop, which it leaves free meanwhile."""
        for task in list(self._tasks):
            task.cancel()
        aclose = getattr(self.store, "aclose", None)
        if aclose is None:
            self.close(reason)
            return
        try:
            for request_id in list(self._waiting):
                await self.cancel_async(request_id, reason)
        except ApprovalStoreError:
            pass  # the others cancel them once this replica's heartbeat stops
        await aclose()


def check_not_self(request: ApprovalRequest, approver: Approver) -> None:
    if approver.key == request.principal_key:
        raise ApprovalError(
            403, "Authorization_RequestDenied",
            f"{approver.label} cannot approve its own request: another approver must decide")


def check_named(request_or_rule: str, settings: ApprovalSettings | None, approver: Approver,
                groups: Iterable[str]) -> None:
    """403 unless the rule's approvers name ``approver`` (by object id or one of ``groups``)."""
    if settings is None:
        raise ApprovalError(
            403, "Authorization_RequestDenied",
            f"rule {request_or_rule!r} is no longer an approve rule of the policy: nobody can decide this")
    if not settings.approvers.names(approver.object_id, groups):
        raise ApprovalError(
            403, "Authorization_RequestDenied",
            f"{approver.label} is not an approver of rule {settings.rule_id!r}; ask one of: "
            f"{settings.approvers.describe()}")


def _reason(text: str) -> str:
    """One printable line: it is shown in terminals, logs and chat messages."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(text or "")).split())[:MAX_REASON]


def notification_text(request: ApprovalRequest, api_url: str) -> str:
    """What an approver reads (log line, Slack or Teams): what is asked and how to answer."""
    minutes = format_duration(request.expires_at - request.created_at)
    grant = (f" Add --for DURATION (at most {format_duration(request.max_grant)}) to allow this operation "
             f"for a while." if request.max_grant else "")
    api = f" --api {api_url}" if api_url else ""
    return (
        f"nhi-gateway: {request.who} asks to {request.operation} (rule {request.rule_id}). "
        f"The request is held until {iso(request.expires_at)} ({minutes}); approval {request.id}. "
        f"Approve: nhi-gateway approvals approve {request.id}{api} --reason TEXT.{grant} "
        f"Deny: nhi-gateway approvals deny {request.id}{api} --reason TEXT. "
        f"Sign in first (a Graph token does not count): nhi-gateway approvals login{api}."
    )


__all__ = [
    "ApprovalError",
    "ApprovalRequest",
    "ApprovalSettings",
    "ApprovalState",
    "ApprovalStore",
    "ApprovalStoreError",
    "ApprovalTables",
    "Approvals",
    "Approver",
    "ApproverList",
    "Grant",
    "approval_rules",
    "check_named",
    "check_not_self",
    "format_duration",
    "notification_text",
    "parse_duration",
    "request_digest",
    "webhook_url",
]
