"""The PostgreSQL state backend against a real PostgreSQL (see tests/conftest.py for which server).

Two stores on one database stand for two replicas; what two real gateway processes do is in
tests/e2e/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import psycopg
import pytest

from nhi_gateway.approvals.postgres import SCHEMA_VERSION, PostgresApprovalStore, describe, migrate
from nhi_gateway.approvals.store import ApprovalError, Approvals, ApprovalState, ApprovalStoreError, Approver

from ..support.approvals import ALEX_APPROVER, BOT, HELD, ME, OPERATION, SETTINGS, TENANT, open_request
from ..support.missing import missing
from ..support.relay import Relay


@pytest.fixture
async def replicas(postgres_url):
    """Two replicas' stores on one database, listening; closed after, on the test's event loop
    (the loop's connection pool must be closed on it, as the gateway does when it stops)."""
    made = []

    def make(url: str = postgres_url, **kw) -> PostgresApprovalStore:
        s = PostgresApprovalStore(url, **kw)
        s.start()
        assert s.wait_listening(10), "the listener did not connect"
        made.append(s)
        return s

    yield make
    for s in made:
        await s.aclose()


def test_the_schema_is_versioned_and_migrating_twice_changes_nothing(postgres_url, replicas):
    replicas()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert migrate(conn) == SCHEMA_VERSION
        assert conn.execute("SELECT version FROM nhi_schema WHERE component = 'approvals'").fetchone() == (
            SCHEMA_VERSION,)


def test_a_database_from_a_newer_gateway_is_refused_with_a_clear_message(postgres_server):
    import secrets
    from urllib.parse import urlsplit

    name = f"nhi_test_newer_{secrets.token_hex(4)}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        url = urlsplit(postgres_server)._replace(path="/" + name).geturl()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE nhi_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
            conn.execute("INSERT INTO nhi_schema VALUES ('approvals', %s)", (SCHEMA_VERSION + 1,))
            with pytest.raises(ApprovalStoreError, match="newer than this gateway's"):
                migrate(conn)
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_messages_name_the_server_never_the_password():
    assert describe("postgresql://gw:s3cret@db.internal:6543/nhi") == "postgresql://db.internal:6543/nhi"


async def test_a_request_held_on_one_replica_is_released_by_a_decision_on_another(replicas):
    a, b = Approvals(replicas()), Approvals(replicas())
    request = open_request(a)
    assert request.id in [r.id for r in b.store.requests()]  # listed by every replica
    waiting = asyncio.ensure_future(a.outcome(request))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    b.approve(request.id, ME, reason="ticket 7")
    final = await asyncio.wait_for(waiting, 1.0)  # NOTIFY, not a poll: well within a second
    assert time.monotonic() - started < 1.0
    assert final.state is ApprovalState.APPROVED and final.approver == ME and final.reason == "ticket 7"


async def test_a_denial_on_another_replica_refuses_the_held_request(replicas):
    a, b = Approvals(replicas()), Approvals(replicas())
    request = open_request(a)
    waiting = asyncio.ensure_future(a.outcome(request))
    await asyncio.sleep(0.05)
    b.deny(request.id, ME, reason="no ticket")
    final = await asyncio.wait_for(waiting, 1.0)
    assert (final.state, final.reason) == (ApprovalState.DENIED, "no ticket")


async def test_two_approvers_deciding_at_once_through_two_replicas_exactly_one_wins(replicas):
    a, b = Approvals(replicas()), Approvals(replicas())
    for _ in range(5):
        request = open_request(a)
        waiting = asyncio.ensure_future(a.outcome(request))
        results: list[object] = [None, None]
        go = threading.Barrier(2)

        def decide(i: int, approvals: Approvals, approver: Approver, grant: int | None) -> None:
            go.wait()
            try:
                results[i] = approvals.approve(request.id, approver, grant_seconds=grant)[0]
            except ApprovalError as e:
                results[i] = e

        threads = [threading.Thread(target=decide, args=(0, a, ME, 60)),
                   threading.Thread(target=decide, args=(1, b, ALEX_APPROVER, 60))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        errors = [r for r in results if isinstance(r, ApprovalError)]
        wins = [r for r in results if not isinstance(r, ApprovalError)]
        assert len(wins) == 1 and len(errors) == 1, results
        assert errors[0].status == 409
        final = await asyncio.wait_for(waiting, 1.0)
        assert final.approver == wins[0].approver
        # the loser's grant never existed: one grant of this request, the winner's
        made = [g for g in a.store.grants(now=time.time(), active_only=False, limit=1000)
                if g.approval_id == request.id]
        assert [g.id for g in made] == [final.grant_id]
        for g in made:
            a.store.revoke(g.id, ME, time.time())


async def test_a_grant_given_anywhere_is_honoured_everywhere_and_a_revocation_too(replicas):
    a, b = Approvals(replicas()), Approvals(replicas())
    request = open_request(a)
    waiting = asyncio.ensure_future(a.outcome(request))
    await asyncio.sleep(0.05)
    _, grant = b.approve(request.id, ME, grant_seconds=1)  # any duration from 1 s
    await asyncio.wait_for(waiting, 1.0)
    key = (TENANT, BOT)
    assert a.grant_for(key, OPERATION, SETTINGS.rule_id).id == grant.id  # at once
    b.revoke(grant.id, ME)
    assert a.grant_for(key, OPERATION, SETTINGS.rule_id) is None  # the next lookup sees it


async def test_a_one_second_grant_expires_after_a_second(replicas):
    a = Approvals(replicas())
    request = open_request(a)
    _, grant = a.approve(request.id, ME, grant_seconds=1)
    assert a.grant_for((TENANT, BOT), OPERATION, SETTINGS.rule_id) is not None
    await asyncio.sleep(1.1)
    assert a.grant_for((TENANT, BOT), OPERATION, SETTINGS.rule_id) is None


async def test_the_held_requests_of_a_replica_that_stopped_heartbeating_are_cancelled(replicas):
    a = Approvals(replicas(heartbeat=0.2, stale_after=1.0))
    b = Approvals(replicas(heartbeat=0.2, stale_after=1.0))
    request = open_request(a)
    mine = open_request(b)
    a.store._stop.set()  # replica A "dies": its heartbeat stops, its rows stay as they were
    a.store._thread.join(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and b.store.get(request.id).state is ApprovalState.PENDING:
        await asyncio.sleep(0.1)
    gone = b.store.get(request.id)
    assert gone.state is ApprovalState.CANCELLED
    assert a.store.replica_id in gone.reason and "client is gone" in gone.reason
    assert b.store.get(mine.id).state is ApprovalState.PENDING  # the living replica's requests stay
    with pytest.raises(ApprovalError) as e:
        b.approve(request.id, ME)
    assert e.value.status == 409


async def test_an_unreachable_server_fails_closed_at_once_and_the_store_recovers(postgres_url, replicas):
    from urllib.parse import urlsplit

    parts = urlsplit(postgres_url)
    relay = Relay((parts.hostname or "127.0.0.1", parts.port or 5432))
    try:
        url = parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{relay.port}").geturl()
        store = replicas(url)
        approvals = Approvals(store)
        held = open_request(approvals)
        waiting = asyncio.ensure_future(approvals.outcome(held))
        relay.set_mode("down")
        deadline = time.monotonic() + 5
        while store.reachable and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not store.reachable
        started = time.monotonic()
        with pytest.raises(ApprovalStoreError, match="cannot be used"):
            approvals.grant_for((TENANT, BOT), OPERATION, SETTINGS.rule_id)
        with pytest.raises(ApprovalStoreError):
            open_request(approvals)
        assert time.monotonic() - started < 0.5  # nobody waits on a server known to be down
        relay.set_mode("forward")
        assert await asyncio.to_thread(store.wait_listening, 10)
        assert approvals.grant_for((TENANT, BOT), OPERATION, SETTINGS.rule_id) is None
        # a decision made while this replica was cut off still releases its held request
        other = Approvals(replicas())
        other.approve(held.id, ME)
        assert (await asyncio.wait_for(waiting, 2.0)).state is ApprovalState.APPROVED
    finally:
        relay.set_mode("down")


async def test_a_decision_missed_while_disconnected_wakes_the_request_on_reconnect(postgres_url, replicas):
    from urllib.parse import urlsplit

    parts = urlsplit(postgres_url)
    relay = Relay((parts.hostname or "127.0.0.1", parts.port or 5432))
    try:
        url = parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{relay.port}").geturl()
        approvals = Approvals(replicas(url))
        held = open_request(approvals)
        waiting = asyncio.ensure_future(approvals.outcome(held))
        relay.set_mode("down")
        await asyncio.sleep(0.3)
        Approvals(replicas()).approve(held.id, ME)  # the NOTIFY goes nowhere: A is cut off
        await asyncio.sleep(0.3)
        assert not waiting.done()
        relay.set_mode("forward")
        assert (await asyncio.wait_for(waiting, 5.0)).state is ApprovalState.APPROVED
    finally:
        relay.set_mode("down")


def test_a_server_that_is_not_there_at_start_refuses_and_does_not_stop_the_start():
    store = PostgresApprovalStore("postgresql://postgres@127.0.0.1:1/nhi")  # nothing listens on port 1
    store.start()
    try:
        with pytest.raises(ApprovalStoreError, match="cannot be used"):
            store.active_grant((TENANT, BOT), OPERATION, "secret-rotation", time.time())
        with pytest.raises(ApprovalStoreError):
            Approvals(store).pending("apr-x")
    finally:
        store.close()


def test_the_password_in_a_state_url_is_never_logged_nor_in_an_error(caplog):
    caplog.set_level("DEBUG")
    store = PostgresApprovalStore("postgresql://gw:s3cr3t-pw@127.0.0.1:1/nhi")
    store.start()
    try:
        with pytest.raises(ApprovalStoreError) as e:
            store.get("apr-x")
        time.sleep(0.5)  # the listener's own attempt is logged too
    finally:
        store.close()
    assert "s3cr3t-pw" not in str(e.value) and "127.0.0.1:1/nhi" in str(e.value)
    assert caplog.records and not any("s3cr3t-pw" in r.getMessage() for r in caplog.records)


async def test_a_server_that_hangs_holds_no_caller_longer_than_the_call_timeout(postgres_url, replicas):
    from nhi_gateway.approvals.postgres import CALL_TIMEOUT

    approvals = Approvals(replicas())
    approvals.grant_for((TENANT, BOT), OPERATION, SETTINGS.rule_id)  # connected and migrated
    with psycopg.connect(postgres_url) as blocker:  # a transaction that holds every grant lookup up
        blocker.execute("LOCK TABLE grants IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(ApprovalStoreError, match="no answer within"):
            approvals.grant_for((TENANT, BOT), OPERATION, SETTINGS.rule_id)
        assert time.monotonic() - started < CALL_TIMEOUT + 0.5
        blocker.rollback()
    deadline = time.monotonic() + 5
    while True:  # back once the listener's next heartbeat succeeds
        try:
            assert approvals.grant_for((TENANT, BOT), OPERATION, SETTINGS.rule_id) is None
            break
        except ApprovalStoreError:
            assert time.monotonic() < deadline, "the store did not recover"
            await asyncio.sleep(0.1)


# --- a grant looked up for a request in flight never holds the event loop -----------------------


async def _loop_lag_while(lookup) -> tuple[float, object]:
    """Run ``lookup`` and, beside it, tick every 10 ms; the longest tick and the lookup's result."""
    task = asyncio.ensure_future(lookup)
    longest, last = 0.0, time.monotonic()
    while not task.done():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        longest, last = max(longest, now - last), now
    return longest, task


async def test_a_grant_lookup_waits_for_a_locked_table_without_holding_other_requests(replicas, postgres_url):
    a = Approvals(replicas())
    request = open_request(a)
    _, grant = a.approve(request.id, ME, grant_seconds=60)
    key = (TENANT, BOT)
    assert (await a.grant_for_request(key, OPERATION, SETTINGS.rule_id)).id == grant.id
    with psycopg.connect(postgres_url) as locker:  # a migration, a VACUUM FULL: the table is locked
        locker.execute("LOCK TABLE grants IN ACCESS EXCLUSIVE MODE")
        threading.Timer(0.5, locker.rollback).start()  # released half a second later
        lag, task = await _loop_lag_while(a.grant_for_request(key, OPERATION, SETTINGS.rule_id))
    assert task.result().id == grant.id
    assert lag < 0.25  # the loop ticked on while the lookup waited half a second


async def test_a_grant_lookup_that_gets_no_answer_in_time_fails_closed_and_frees_the_loop(replicas, postgres_url):
    from nhi_gateway.approvals import postgres

    a = Approvals(replicas())
    with psycopg.connect(postgres_url) as locker:
        locker.execute("LOCK TABLE grants IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        lag, task = await _loop_lag_while(a.grant_for_request((TENANT, BOT), OPERATION, SETTINGS.rule_id))
        waited = time.monotonic() - started
        locker.rollback()
    with pytest.raises(ApprovalStoreError, match="no answer within"):
        task.result()
    assert postgres.CALL_TIMEOUT <= waited < postgres.CALL_TIMEOUT + 1.0
    assert lag < 0.25


async def test_a_held_request_is_opened_off_the_event_loop_and_fails_closed_past_the_timeout(replicas, postgres_url):
    a = Approvals(replicas())
    with psycopg.connect(postgres_url) as locker:  # the approvals table locked for half a second
        locker.execute("LOCK TABLE approvals IN ACCESS EXCLUSIVE MODE")
        threading.Timer(0.5, locker.rollback).start()
        lag, task = await _loop_lag_while(a.open_request(settings=SETTINGS, **HELD))
    opened = task.result()
    assert a.store.get(opened.id).state is ApprovalState.PENDING
    assert lag < 0.25  # the loop ticked on while the row waited for the lock
    a.cancel(opened.id, "test over")
    with psycopg.connect(postgres_url) as locker:  # locked past the store's call timeout
        locker.execute("LOCK TABLE approvals IN ACCESS EXCLUSIVE MODE")
        lag, task = await _loop_lag_while(a.open_request(settings=SETTINGS, **HELD))
        locker.rollback()
    with pytest.raises(ApprovalStoreError):
        task.result()
    assert lag < 0.25
    assert set(a._waiting) == {opened.id}  # nothing waits for the request that was never stored


# --- nothing an approver or a leaving client does holds the event loop on the server ------------


async def test_an_approvers_decision_through_the_api_waits_off_the_event_loop(replicas, postgres_url):
    a = Approvals(replicas())
    request = open_request(a)
    waiting = asyncio.ensure_future(a.outcome(request))
    with psycopg.connect(postgres_url) as locker:  # the approvals table locked for half a second
        locker.execute("LOCK TABLE approvals IN ACCESS EXCLUSIVE MODE")
        threading.Timer(0.5, locker.rollback).start()
        lag, task = await _loop_lag_while(a.off_loop(a.approve, request.id, ME, grant_seconds=60))
    approved, grant = task.result()
    assert approved.state is ApprovalState.APPROVED and grant is not None
    assert lag < 0.25  # the loop ticked on while the decision waited for the lock
    final = await asyncio.wait_for(waiting, 1.0)  # and the held request, on the loop, was released
    assert final.state is ApprovalState.APPROVED and final.grant_id == grant.id


async def test_a_client_leaving_cancels_its_held_request_without_holding_the_event_loop(replicas, postgres_url):
    a = Approvals(replicas())
    request = open_request(a)
    waiting = asyncio.ensure_future(a.outcome(request))
    said = []
    with psycopg.connect(postgres_url) as locker:
        locker.execute("LOCK TABLE approvals IN ACCESS EXCLUSIVE MODE")
        threading.Timer(0.5, locker.rollback).start()
        started = time.monotonic()
        a.cancel_soon(request.id, "the client disconnected", then=said.append)  # from a hook: returns at once
        assert time.monotonic() - started < 0.1
        lag, task = await _loop_lag_while(asyncio.wait_for(waiting, 3.0))
    assert lag < 0.25
    final = task.result()
    assert final.state is ApprovalState.CANCELLED and final.reason == "the client disconnected"
    assert said == [final]
    assert a.store.get(request.id).state is ApprovalState.CANCELLED


async def test_a_decision_that_wakes_a_held_request_is_read_without_holding_the_event_loop(replicas, postgres_url):
    a = Approvals(replicas())
    request = open_request(a)
    waiting = asyncio.ensure_future(a.outcome(request))
    with psycopg.connect(postgres_url) as decider:  # another replica's decision, committed in half a second
        decider.execute("UPDATE approvals SET state = 'denied', reason = 'no' WHERE id = %s", (request.id,))
        decider.execute("LOCK TABLE approvals IN ACCESS EXCLUSIVE MODE")
        threading.Timer(0.5, decider.commit).start()
        a.store._changed(request.id)  # a notification (or a reconnect) arrives while the row is locked
        lag, task = await _loop_lag_while(asyncio.wait_for(waiting, 3.0))
    assert lag < 0.25
    assert task.result().state is ApprovalState.DENIED


async def test_readiness_and_metrics_ask_the_server_off_the_event_loop(replicas, postgres_url):
    from nhi_gateway.addons.admin import gateway_checks, readiness
    from nhi_gateway.addons.metrics import GatewayMetrics, state_metrics

    a = Approvals(replicas())
    check = [c for c in gateway_checks(None, None, None, None, None, a, None) if c.__name__ == "check_approvals"]
    metrics = GatewayMetrics()
    metrics.watch(state_metrics(None, a, None, None))
    with psycopg.connect(postgres_url) as locker:
        locker.execute("LOCK TABLE grants IN ACCESS EXCLUSIVE MODE")
        threading.Timer(0.5, locker.rollback).start()
        lag, ready = await _loop_lag_while(readiness(check))
        assert lag < 0.25 and ready.result()[0]
    with psycopg.connect(postgres_url) as locker:
        locker.execute("LOCK TABLE grants IN ACCESS EXCLUSIVE MODE")
        threading.Timer(0.5, locker.rollback).start()
        lag, scraped = await _loop_lag_while(a.off_loop(metrics.exposition))
        assert lag < 0.25 and b"nhi_grants_active" in scraped.result()


@contextlib.contextmanager
def _stopped_backends(store: PostgresApprovalStore, postgres_url: str, role: str = "%"):
    """The server's backends of ``store`` (those of one ``role``: loop, calls, listener) stopped
    with SIGSTOP while the block runs: a host that neither answers nor acts on psycopg's cancel
    request. Needs the server on this host, run by this user; fails in CI when it is not."""
    import os
    import signal

    with psycopg.connect(postgres_url) as admin:
        pids = [r[0] for r in admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s",
            (f"nhi-gateway {store.replica_id} {role}",))]
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
    except OSError as e:  # a server on another host, or of another user
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        missing(f"cannot stop the server's backends to stand in for a hung host: {e}")
    try:
        yield pids
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


async def test_a_server_that_stops_mid_statement_holds_a_request_no_longer_than_the_call_timeout(replicas, postgres_url):
    """A host that stops answering (here: its backends stopped with SIGSTOP, so they neither answer
    nor act on psycopg's cancel request) costs a request the call timeout, not the time psycopg
    then spends trying to cancel the statement (up to 10 s)."""
    from nhi_gateway.approvals import postgres

    store = replicas()
    a = Approvals(store)
    key = (TENANT, BOT)
    await a.grant_for_request(key, OPERATION, SETTINGS.rule_id)  # the loop's pool is connected (any answer)
    with _stopped_backends(store, postgres_url):
        started = time.monotonic()
        lag, task = await _loop_lag_while(a.grant_for_request(key, OPERATION, SETTINGS.rule_id))
        waited = time.monotonic() - started
    with pytest.raises(ApprovalStoreError, match="no answer within"):
        task.result()
    assert postgres.CALL_TIMEOUT <= waited < postgres.CALL_TIMEOUT + 0.5
    assert lag < 0.25


def _close_the_loops_connections(store: PostgresApprovalStore, postgres_url: str) -> int:
    """What a server restart or an idle timeout does to a pool: the server ends the backends of
    the store's event-loop pool (only those: the listener would mark the server down)."""
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        ended = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                              " WHERE application_name = %s", (f"nhi-gateway {store.replica_id} loop",)).fetchone()[0]
    time.sleep(0.2)  # the backends are gone; the pool does not know yet
    return ended


async def test_a_grant_lookup_on_a_connection_the_server_closed_tries_another_and_answers(replicas, postgres_url):
    """The loop's pool does not check a connection before each lookup (a round trip as dear as
    the lookup): a stale one must cost the request nothing, neither a 503 nor a wrong answer."""
    store = replicas()
    a = Approvals(store)
    request = open_request(a)
    _, grant = a.approve(request.id, ME, grant_seconds=60)
    key = (TENANT, BOT)
    # Several connections in the pool, all of them then ended by the server.
    found = await asyncio.gather(*(a.grant_for_request(key, OPERATION, SETTINGS.rule_id) for _ in range(4)))
    assert {g.id for g in found} == {grant.id}
    assert _close_the_loops_connections(store, postgres_url) >= 1
    for _ in range(3):
        assert (await a.grant_for_request(key, OPERATION, SETTINGS.rule_id)).id == grant.id
    assert store.reachable


async def test_holding_a_request_on_a_connection_the_server_closed_tries_another_and_holds_it(replicas, postgres_url):
    store = replicas()
    a = Approvals(store)
    await a.grant_for_request((TENANT, BOT), OPERATION, SETTINGS.rule_id)  # the loop's pool is connected
    assert _close_the_loops_connections(store, postgres_url) >= 1
    held = await a.open_request(settings=SETTINGS, **HELD)
    assert store.get(held.id).state is ApprovalState.PENDING
    assert await a.cancel_async(held.id, "the test is over")


async def test_lookups_whose_clients_left_give_up_at_once_and_leave_the_pool_whole(replicas, postgres_url):
    """A client that leaves during its grant lookup (a disconnect, an HTTP/2 reset) cancels it: the
    caller is free at once, even from a server that hangs (not after psycopg's cancel of the
    statement, up to 10 s), and more abandoned lookups than the pool holds leave later lookups
    working once the server answers again."""
    from nhi_gateway.approvals import postgres

    store = replicas()
    a = Approvals(store)
    request = open_request(a)
    _, grant = a.approve(request.id, ME, grant_seconds=60)
    key = (TENANT, BOT)
    with psycopg.connect(postgres_url) as locker:  # the loop's pool opens all its connections
        locker.execute("LOCK TABLE grants IN ACCESS EXCLUSIVE MODE")
        filling = [asyncio.ensure_future(a.grant_for_request(key, OPERATION, SETTINGS.rule_id))
                   for _ in range(postgres.ASYNC_POOL_SIZE)]
        await asyncio.sleep(0.5)
        locker.rollback()
    assert {g.id for g in await asyncio.gather(*filling)} == {grant.id}
    with _stopped_backends(store, postgres_url, "loop") as stopped:
        assert len(stopped) == postgres.ASYNC_POOL_SIZE
        lookups = [asyncio.ensure_future(a.grant_for_request(key, OPERATION, SETTINGS.rule_id))
                   for _ in range(postgres.ASYNC_POOL_SIZE + 2)]
        await asyncio.sleep(0.3)  # each waits for the stopped server (or for a connection)
        started = time.monotonic()
        for lookup in lookups:
            lookup.cancel()
        results = await asyncio.wait_for(asyncio.gather(*lookups, return_exceptions=True), 2.0)
        assert time.monotonic() - started < 0.5
        assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    for _ in range(postgres.ASYNC_POOL_SIZE + 2):
        found = await asyncio.wait_for(a.grant_for_request(key, OPERATION, SETTINGS.rule_id), postgres.CALL_TIMEOUT + 8)
        assert found.id == grant.id
    assert store.reachable
