"""Approval requests and grants in PostgreSQL: one truth for every replica of the gateway.

:class:`PostgresApprovalStore` has the interface of the SQLite :class:`ApprovalStore`, so
:class:`~nhi_gateway.approvals.store.Approvals` and the addons use either. What PostgreSQL adds:

- every replica reads the same rows, so a request held on one is listed by all, a grant given on
  one is honoured by all from its commit, and a revocation is seen by the next lookup;
- a decision is a single ``UPDATE ... WHERE state = 'pending'``: of two approvers deciding at once
  through two replicas exactly one changes the row, the other is told it was decided meanwhile;
- the decision's transaction also sends ``NOTIFY nhi_gateway_approvals`` with the request id, and
  each replica LISTENs on a connection of its own, so the replica holding the request wakes it
  as soon as the decision commits (no polling);
- each replica has an id and a heartbeat row; the pending requests of a replica whose heartbeat
  stopped (killed, host lost) are cancelled by the others, because the client that waited on
  that replica's connection is gone;
- when PostgreSQL cannot be reached every call raises :class:`ApprovalStoreError` at once (the
  caller refuses what needs approval or a grant with 503, never guesses), and the listener
  thread reconnects in the background, so the gateway recovers when the server returns.

Two ways in, one set of statements (:class:`ApprovalTables`):

- the gateway's event loop (a request's grant lookup, holding a request, its time-out, waking it
  when a decision arrives, cancelling it when its client leaves) uses psycopg 3's asyncio API on
  a pool of its own (:meth:`active_grant_async`, :meth:`add_async`, :meth:`finish_async`,
  :meth:`get_async`, :meth:`grant_async`): the loop serves other requests while the server works;
- the approval API's decisions and lists (run in worker threads by
  :meth:`~nhi_gateway.approvals.store.Approvals.off_loop`), the CLI and the tests use the
  synchronous calls, like the SQLite store's, on a psycopg-pool connection pool.

Either way a caller waits at most :data:`CALL_TIMEOUT` whatever the server does (a lock held, a
host that stopped answering): then the server counts as down, later calls fail at once (the
caller refuses with 503), and the listener thread says when it is reachable again.

Plain Python: no mitmproxy import.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

import psycopg
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from nhi_gateway.approvals.store import (
    ApprovalRequest,
    ApprovalState,
    ApprovalStoreError,
    ApprovalTables,
    Approver,
    Grant,
    _insert,
    new_id,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

CHANNEL = "nhi_gateway_approvals"
HEARTBEAT = 1.0  # seconds between a replica's heartbeats
STALE_AFTER = 5.0  # seconds without a heartbeat after which a replica counts as gone
CONNECT_TIMEOUT = 2  # seconds (libpq's connect_timeout takes whole seconds)
POOL_TIMEOUT = 1.5  # seconds a call waits for a connection from the pool
ASYNC_POOL_SIZE = 8  # connections of the event loop's pool at most
CALL_TIMEOUT = 2.0  # seconds a caller waits for any call, whatever the server does
STATEMENT_TIMEOUT_MS = 5000  # no single statement may hang a caller longer

# Each entry moves the schema one version up; applied in order at start, under an advisory lock
# so replicas starting together do not race. Never edit an entry that has shipped: add one. So
# the tables are written out here, not built from the SQLite store's schema, which may change.
MIGRATIONS: tuple[str, ...] = (
    # 1: requests, grants and replicas
    """
    CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        rule_id TEXT NOT NULL,
        tenant_id TEXT NOT NULL,
        object_id TEXT NOT NULL,
        principal TEXT NOT NULL,
        operation TEXT NOT NULL,
        method TEXT NOT NULL,
        url TEXT NOT NULL,
        digest TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        max_grant INTEGER NOT NULL DEFAULT 0,
        body_size INTEGER NOT NULL DEFAULT 0,
        body_preview TEXT NOT NULL DEFAULT '',
        flow_id TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL,
        approver TEXT,
        reason TEXT NOT NULL DEFAULT '',
        decided_at DOUBLE PRECISION,
        grant_id TEXT,
        replica_id TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX approvals_state ON approvals (state, created_at);
    CREATE INDEX approvals_pending_replica ON approvals (replica_id) WHERE state = 'pending';
    CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        approval_id TEXT NOT NULL,
        rule_id TEXT NOT NULL,
        tenant_id TEXT NOT NULL,
        object_id TEXT NOT NULL,
        principal TEXT NOT NULL,
        operation TEXT NOT NULL,
        approver TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION,
        revoked_by TEXT
    );
    CREATE INDEX grants_lookup ON grants (tenant_id, object_id, operation, rule_id, expires_at);
    CREATE TABLE replicas (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL DEFAULT '',
        started_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
_LOCK_KEY = 0x6E68695F67777931  # pg_advisory_xact_lock key of the migrations ("nhi_gwy1")


def _pg(sql: str) -> str:
    """A statement shared with the SQLite store (:class:`ApprovalTables`), in psycopg's placeholders."""
    return sql.replace("?", "%s")


def describe(url: str) -> str:
    """The server and database a URL names, without user or password (for messages and logs)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://?"
    host = info.get("host") or "localhost"
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{host}{port}/{info.get('dbname', '')}"


def migrate(conn: psycopg.Connection) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; returns the version found before."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute("CREATE TABLE IF NOT EXISTS nhi_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        cur = conn.cursor(row_factory=tuple_row)
        row = cur.execute("SELECT version FROM nhi_schema WHERE component = 'approvals'").fetchone()
        found = row[0] if row else 0
        if found > SCHEMA_VERSION:
            raise ApprovalStoreError(
                f"the approvals schema in the database is version {found}, newer than this gateway's "
                f"{SCHEMA_VERSION}: upgrade this gateway (a newer one migrated the database)")
        for version in range(found + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[version - 1])
        conn.execute(
            "INSERT INTO nhi_schema (component, version) VALUES ('approvals', %s)"
            " ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version", (SCHEMA_VERSION,))
    return found


class PostgresApprovalStore(ApprovalTables):
    """Approval requests and grants in PostgreSQL, shared by every replica (see the module text).

    ``replica_id`` names this process in the ``replicas`` table and on the requests it holds.
    :meth:`on_change` registers a callback the listener thread calls with the id of a request
    another replica (or this one) decided, or with None after a reconnect (anything may have
    changed meanwhile).
    """

    def __init__(self, url: str, *, replica_id: str | None = None, host: str = "",
                 heartbeat: float = HEARTBEAT, stale_after: float = STALE_AFTER) -> None:
        self.url = url
        self.path = describe(url)  # what messages name, as the SQLite store names its file
        self.replica_id = replica_id or new_id("rep")
        self.host = host
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self._callbacks: list[Callable[[str | None], None]] = []
        self._lock = threading.Lock()
        self._pool: ConnectionPool | None = None
        self._async_pool: AsyncConnectionPool | None = None  # the event loop's (see _call_async)
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._abandoned: set[asyncio.Task] = set()  # calls past their time, cancelled, still finishing
        self._migrated = False
        self._down: str | None = None  # why the server is unreachable, while it is
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"approvals-{self.replica_id}")

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start listening and heartbeating (a thread). The server need not be up yet."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._listen, name=f"approvals-listen-{self.replica_id}",
                                            daemon=True)
            self._thread.start()

    def wait_listening(self, timeout: float) -> bool:
        """Whether the listener is connected (tests, and a start that wants to say so)."""
        return self._listening.wait(timeout)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=CONNECT_TIMEOUT + 2)
            self._thread = None
        try:
            # Gone on purpose: the others need not wait for the heartbeat to go stale.
            self._write("DELETE FROM replicas WHERE id = ?", (self.replica_id,))
        except ApprovalStoreError:
            pass
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=1)
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._close_async_pool()

    def _close_async_pool(self) -> None:
        """Close the event loop's pool from synchronous code: on its loop, which must not be left
        with the pool's tasks (a loop that closes waits for them)."""
        pool, self._async_pool = self._async_pool, None
        if pool is None or self._async_loop is None or self._async_loop.is_closed():
            return
        loop = self._async_loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task = loop.create_task(pool.close(timeout=1))  # runs once the caller yields
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        elif loop.is_running():  # another thread's loop
            asyncio.run_coroutine_threadsafe(pool.close(timeout=1), loop).result(timeout=CALL_TIMEOUT + 1)
        else:
            loop.run_until_complete(pool.close(timeout=1))

    async def aclose(self) -> None:
        """:meth:`close` from the event loop: its pool closed on it, the rest in a worker thread."""
        pool, self._async_pool = self._async_pool, None
        if pool is not None:
            await pool.close(timeout=1)
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def on_change(self, callback: Callable[[str | None], None]) -> None:
        self._callbacks.append(callback)

    @property
    def reachable(self) -> bool:
        return self._down is None

    # -- connections -----------------------------------------------------------------------

    def _connect_kwargs(self, role: str) -> dict:
        # The application name says whose connection it is in pg_stat_activity: the replica, and
        # which of its pools ("loop", "calls") or the "listener".
        # Keepalives and tcp_user_timeout: a server that vanishes from the network (no FIN, no RST)
        # is noticed in seconds, not after the kernel's two hours.
        return {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT, "keepalives": 1, "keepalives_idle": 5,
                "keepalives_interval": 2, "keepalives_count": 3, "tcp_user_timeout": 10000,
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                "application_name": f"nhi-gateway {self.replica_id} {role}"}

    def _failed(self, e: Exception) -> ApprovalStoreError:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, OSError)):
            # A statement the server refused (a bug, a constraint): the server itself is up.
            return ApprovalStoreError(f"the approvals database {self.path} refused a statement: {why}")
        if self._down is None:
            logger.error("approvals database %s unreachable: %s", self.path, why)
        self._down = why
        return ApprovalStoreError(f"the approvals database {self.path} cannot be used: {why}")

    def _ready_pool(self) -> ConnectionPool:
        with self._lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.url, kwargs=self._connect_kwargs("calls"), min_size=1, max_size=8, open=False,
                    timeout=POOL_TIMEOUT, reconnect_timeout=60, check=ConnectionPool.check_connection,
                    name=f"approvals-{self.replica_id}")
                self._pool.open(wait=False)
            return self._pool

    def _call(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run ``work`` on a pooled connection, in a worker thread, waiting at most
        :data:`CALL_TIMEOUT`: a server that hangs (a lock, a wedged host) never holds the
        caller, the gateway's event loop, longer than that."""
        if self._down is not None:
            # Known down: answer at once; the listener thread says when it is back.
            raise ApprovalStoreError(f"the approvals database {self.path} cannot be used: {self._down}")
        future = self._workers.submit(self._run, work)
        try:
            return future.result(timeout=CALL_TIMEOUT)
        except FutureTimeout:
            raise self._failed(TimeoutError(f"no answer within {CALL_TIMEOUT:g}s")) from None

    # -- the event loop's calls: psycopg's asyncio API ----------------------------------------

    async def _call_async(self, work: Callable[[psycopg.AsyncConnection], Awaitable[T]], *,
                          idempotent: bool = False) -> T:
        """``await work(conn)`` on a connection of the event loop's pool, waiting at most
        :data:`CALL_TIMEOUT`; the loop serves other requests meanwhile, so a slow server delays
        only the requests that need it. ``idempotent``: ``work`` only reads, so it may be run
        again on another connection (see :meth:`_on_connection`)."""
        if self._down is not None:
            raise ApprovalStoreError(f"the approvals database {self.path} cannot be used: {self._down}")
        task = asyncio.ensure_future(self._run_async(work, idempotent))
        if not task.done():  # the gateway's loop runs tasks eagerly: an answer may be there already
            # What asyncio.wait does for one task, without its sets and callbacks per waiter: every
            # grant lookup passes here. Not wait_for: it would wait for the cancelled call, and
            # psycopg, cancelled, asks the server to cancel the statement and waits for that (up
            # to 10 s on a host that hangs).
            loop = asyncio.get_running_loop()
            woken = loop.create_future()

            def wake(_=None) -> None:
                if not woken.done():
                    woken.set_result(None)

            task.add_done_callback(wake)
            timer = loop.call_later(CALL_TIMEOUT, wake)
            try:
                await woken
            except asyncio.CancelledError:  # the caller gave up (its client left): so does the call
                self._abandon(task)
                raise
            finally:
                timer.cancel()
                task.remove_done_callback(wake)
            if not task.done():
                self._abandon(task)
                raise self._failed(TimeoutError(f"no answer within {CALL_TIMEOUT:g}s"))
        return task.result()

    def _abandon(self, task: asyncio.Task) -> None:
        """Cancel a call nobody waits for any more; it finishes (and is reaped) on its own."""
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(lambda t: (self._abandoned.discard(t), t.cancelled() or t.exception()))

    async def _run_async(self, work: Callable[[psycopg.AsyncConnection], Awaitable[T]], idempotent: bool) -> T:
        try:
            if not self._migrated:  # once, before the first statement (migrate is synchronous)
                await asyncio.get_running_loop().run_in_executor(self._workers, self._run, lambda conn: None)
            if self._async_pool is None:
                # Made on the loop that uses it (the gateway's), opened in the background. No
                # check of each connection it lends (a round trip to the server each time, about
                # as dear as the grant lookup itself): _on_connection deals with stale ones.
                self._async_pool = AsyncConnectionPool(
                    self.url, kwargs=self._connect_kwargs("loop"), min_size=1, max_size=ASYNC_POOL_SIZE, open=False,
                    timeout=POOL_TIMEOUT, reconnect_timeout=60, name=f"approvals-async-{self.replica_id}")
                self._async_loop = asyncio.get_running_loop()
                await self._async_pool.open(wait=False)
            return await self._on_connection(work, idempotent)
        except ApprovalStoreError:
            raise
        except (psycopg.Error, PoolTimeout, OSError) as e:
            raise self._failed(e) from e

    async def _on_connection(self, work: Callable[[psycopg.AsyncConnection], Awaitable[T]], idempotent: bool) -> T:
        """``work`` on a pooled connection that works. A connection can go stale in the pool (the
        server restarted, or closed it idle): one found broken before ``work`` changed anything is
        dropped (the pool replaces it) and the next one tried. A read (``idempotent``) is simply
        run, and run again if its connection turns out broken. A write is never sent twice: its
        connection is tried with an empty statement first, and a write whose connection breaks
        under it fails (the caller refuses with 503)."""
        for attempt in range(ASYNC_POOL_SIZE + 1):
            async with self._async_pool.connection() as conn:
                conn.row_factory = dict_row
                sent = False  # whether work may have reached the server
                try:
                    if not idempotent:
                        await conn.execute("")
                    sent = True
                    return await work(conn)
                except psycopg.OperationalError:
                    stale = conn.broken and (idempotent or not sent)
                    if not stale or attempt == ASYNC_POOL_SIZE:
                        raise
                    # Returned broken, it is discarded and the pool opens another in the background.
                    logger.info("approvals database %s: a pooled connection was closed; trying another", self.path)
        raise AssertionError("not reached: the last attempt returns or raises")

    async def _rows_async(self, sql: str, args: tuple) -> list[dict]:
        async def work(conn: psycopg.AsyncConnection) -> list[dict]:
            return await (await conn.execute(_pg(sql), args)).fetchall()

        return await self._call_async(work, idempotent=True)

    async def active_grant_async(self, principal_key: tuple[str, str], operation: str, rule_id: str,
                                 now: float) -> Grant | None:
        """:meth:`active_grant` on the event loop (each request of an approve rule looks one up)."""
        rows = await self._rows_async(self._ACTIVE_GRANT, (*principal_key, operation, rule_id, now))
        return self._grant(rows[0]) if rows else None

    async def get_async(self, request_id: str) -> ApprovalRequest | None:
        rows = await self._rows_async(self._GET_REQUEST, (request_id,))
        return self._request(rows[0]) if rows else None

    async def grant_async(self, grant_id: str) -> Grant | None:
        rows = await self._rows_async(self._GET_GRANT, (grant_id,))
        return self._grant(rows[0]) if rows else None

    async def add_async(self, r: ApprovalRequest) -> None:
        """:meth:`add` on the event loop."""
        async def work(conn: psycopg.AsyncConnection) -> None:
            async with conn.transaction():
                await conn.execute(self._HEARTBEAT, (self.replica_id, self.host))
                await conn.execute(self._INSERT_HELD, (*self._request_row(r), self.replica_id))

        await self._call_async(work)

    async def finish_async(self, request_id: str, state: ApprovalState, *, approver: Approver | None = None,
                           reason: str = "", now: float, grant_id: str | None = None) -> bool:
        """:meth:`finish` on the event loop."""
        async def work(conn: psycopg.AsyncConnection) -> int:
            async with conn.transaction():
                changed = (await conn.execute(_pg(self._FINISH), self._finish_args(
                    request_id, state, approver, reason, now, grant_id))).rowcount
                if changed:
                    await conn.execute(self._NOTIFY, (CHANNEL, request_id))
            return changed

        return await self._call_async(work) == 1

    # -- the synchronous calls ---------------------------------------------------------------

    def _run(self, work: Callable[[psycopg.Connection], T]) -> T:
        try:
            with self._ready_pool().connection() as conn:
                if not self._migrated:
                    migrate(conn)
                    self._migrated = True
                conn.row_factory = dict_row
                return work(conn)
        except ApprovalStoreError:
            raise
        except (psycopg.Error, PoolTimeout, OSError) as e:
            raise self._failed(e) from e

    def _rows(self, sql: str, args: tuple = ()) -> list[dict]:
        """``sql`` with SQLite's ``?`` placeholders, as :class:`ApprovalTables` writes it."""
        return self._call(lambda conn: conn.execute(_pg(sql), args).fetchall())

    def _write(self, sql: str, args: tuple = ()) -> int:
        """``sql`` with SQLite's ``?`` placeholders, as :class:`ApprovalTables` writes it."""
        return self._call(lambda conn: conn.execute(_pg(sql), args).rowcount)

    # -- the listener: notifications, heartbeat, cancelling for replicas that are gone -------

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, **self._connect_kwargs("listener")) as conn:
                    if not self._migrated:
                        migrate(conn)
                        self._migrated = True
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._beat(conn)
                    if self._down is not None:
                        logger.warning("approvals database %s reachable again", self.path)
                    self._down = None
                    self._listening.set()
                    self._changed(None)  # what was decided while we did not listen
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=self.heartbeat):
                            self._changed(notify.payload)
                        self._beat(conn)
                        self._down = None
            except (psycopg.Error, OSError) as e:
                self._listening.clear()
                if self._stop.is_set():
                    return
                self._failed(e)
                self._stop.wait(0.5)
            except ApprovalStoreError as e:
                self._listening.clear()
                self._down = str(e)
                logger.error("%s", e)
                self._stop.wait(5)

    _HEARTBEAT = ("INSERT INTO replicas (id, host) VALUES (%s, %s)"
                  " ON CONFLICT (id) DO UPDATE SET heartbeat_at = clock_timestamp()")
    _NOTIFY = "SELECT pg_notify(%s, %s)"

    def _heartbeat_row(self, conn: psycopg.Connection) -> None:
        conn.execute(self._HEARTBEAT, (self.replica_id, self.host))

    def _beat(self, conn: psycopg.Connection) -> None:
        self._heartbeat_row(conn)
        # Replicas gone for a day are history: their held requests were cancelled long ago.
        conn.execute("DELETE FROM replicas WHERE heartbeat_at < clock_timestamp() - interval '1 day'")
        with conn.transaction():
            rows = conn.execute(
                "UPDATE approvals SET state = 'cancelled', decided_at = %s, reason = 'replica ' || replica_id ||"
                " ' of the gateway stopped while the request was held (its client is gone)'"
                " WHERE state = 'pending' AND replica_id <> %s AND replica_id NOT IN"
                " (SELECT id FROM replicas WHERE heartbeat_at > clock_timestamp() - make_interval(secs => %s))"
                " RETURNING id, replica_id",
                (time.time(), self.replica_id, self.stale_after)).fetchall()
            for request_id, replica in rows:
                logger.warning("approval %s cancelled: replica %s stopped while holding it", request_id, replica)
                conn.execute(self._NOTIFY, (CHANNEL, request_id))

    def _changed(self, request_id: str | None) -> None:
        for callback in list(self._callbacks):
            try:
                callback(request_id)
            except Exception as e:  # noqa: BLE001 - one bad callback must not stop the listener
                logger.error("approvals change callback failed: %r", e)

    # -- requests (reading them, and grants, is :class:`ApprovalTables`') -------------------

    # A request also names the replica that holds it: its client waits on that replica's connection.
    _INSERT_HELD = _pg(_insert("approvals", (*ApprovalTables._REQUEST_COLUMNS, "replica_id")))

    def add(self, r: ApprovalRequest) -> None:
        def work(conn: psycopg.Connection) -> None:
            with conn.transaction():
                # This replica's heartbeat first: the others never take a request just held here
                # for one of a replica that is gone (the listener may not have beaten yet).
                self._heartbeat_row(conn)
                conn.execute(self._INSERT_HELD, (*self._request_row(r), self.replica_id))

        self._call(work)

    def finish(self, request_id: str, state: ApprovalState, *, approver: Approver | None = None,
               reason: str = "", now: float, grant_id: str | None = None) -> bool:
        """Move a pending request to its final state; False when it was no longer pending. The
        notification goes out with the commit, so whoever holds the request wakes at once."""
        def work(conn: psycopg.Connection) -> int:
            with conn.transaction():
                changed = conn.execute(_pg(self._FINISH), self._finish_args(
                    request_id, state, approver, reason, now, grant_id)).rowcount
                if changed:
                    conn.execute(self._NOTIFY, (CHANNEL, request_id))
            return changed

        return self._call(work) == 1

    def approve_with_grant(self, request_id: str, grant: Grant, *, approver: Approver, reason: str,
                           now: float) -> bool:
        """Approve and grant in one transaction; False (and no grant) when no longer pending."""
        def work(conn: psycopg.Connection) -> int:
            with conn.transaction():
                changed = conn.execute(_pg(self._FINISH), self._finish_args(
                    request_id, ApprovalState.APPROVED, approver, reason, now, grant.id)).rowcount
                if changed:
                    self._insert_grant(conn, grant)
                    conn.execute(self._NOTIFY, (CHANNEL, request_id))
            return changed

        return self._call(work) == 1

    def cancel_pending(self, reason: str, now: float) -> int:
        """At start and stop: the requests this replica held (other replicas' are theirs; those
        of replicas that are gone are cancelled by the heartbeat)."""
        def work(conn: psycopg.Connection) -> int:
            with conn.transaction():
                rows = conn.execute(
                    "UPDATE approvals SET state = 'cancelled', reason = %s, decided_at = %s"
                    " WHERE state = 'pending' AND replica_id = %s RETURNING id",
                    (reason, now, self.replica_id)).fetchall()
                for row in rows:
                    conn.execute(self._NOTIFY, (CHANNEL, row["id"]))
            return len(rows)

        return self._call(work)

    @classmethod
    def _insert_grant(cls, conn: psycopg.Connection, g: Grant) -> None:
        conn.execute(_pg(cls._INSERT_GRANT), cls._grant_row(g))


__all__ = ["CHANNEL", "SCHEMA_VERSION", "PostgresApprovalStore", "describe", "migrate"]
