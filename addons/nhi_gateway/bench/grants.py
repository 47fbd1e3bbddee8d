"""What a decision that needs PostgreSQL costs a request (issue 15): the benchmark request through
two more gateways that keep their state in PostgreSQL (``--state postgresql://...``), in a database
created for the run and dropped after, at keep-alive c=1 (the latency scenario):

- ``pg-allow``: the benchmark caller's rule allows the request (the generated 50-rule policy);
- ``pg-grant``: the same policy, the same rule as an ``approve`` rule, and an active grant for the
  caller. The grant is given as an approver gives one: the first request is held, and the bench
  approves it through the gateway's approvals store with a grant of an hour
  (:meth:`Approvals.approve`, what the approval API calls), which releases it by PostgreSQL's NOTIFY.

The gateway caches no grant: an approve rule's decision asks the store every time
(``Approvals.grant_for_request`` -> ``active_grant_async``, a SELECT on the grants table from the
event loop's pool, with psycopg's asyncio API, on a connection the pool lends unchecked), then
the approval stage asks the policy in force again before it lets the request go. pg-grant over pg-allow is what a
request pays for all of that. The run also counts it: the requests the audit trail shows allowed by
the grant, and the reads of the grants table that PostgreSQL itself counted (``pg_stat_user_tables``,
complete once the gateway's connections are closed).

Without a PostgreSQL server (``NHI_TEST_POSTGRES_URL``, else 127.0.0.1:5432, as the tests find
theirs), or when the measurement fails, the bench says why and goes on without it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import psycopg

from nhi_gateway.approvals.postgres import PostgresApprovalStore, describe
from nhi_gateway.approvals.store import Approvals, Approver
from nhi_gateway.bench import load
from nhi_gateway.bench.policies import BENCH_APPROVER, TENANT_ID, policy_yaml
from nhi_gateway.bench.postgres import WHERE_TO_FIND, configured_server, create_database, drop_database

ALLOW, GRANT = "pg-allow", "pg-grant"
RULES = 50  # as policies/bench.yaml
GRANT_SECONDS = 3600
HOLD_TIMEOUT = 15.0  # seconds for the first request to be held, approved and answered
DATABASE_PREFIX = "nhi_bench_"


def granted_requests(audit: Path, grant_id: str) -> int:
    """Lines of a gateway's audit trail whose request grant ``grant_id`` allowed."""
    if not audit.exists():
        return 0
    said = f"allowed by grant {grant_id} "  # the reason the approval stage gives (approval.approved)
    count = 0
    with open(audit, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            count += record.get("decision") == "allow" and str(record.get("reason", "")).startswith(said)
    return count


def grants_table_reads(server: str, database: str, url: str, timeout: float = 5.0) -> int | None:
    """How often PostgreSQL read the grants table of ``database`` (sequential and index scans),
    once every other connection to it has closed: a backend hands its counts over at the latest
    when it exits. None: not counted (statistics off, or connections still open)."""
    with psycopg.connect(server, autocommit=True, connect_timeout=5) as admin:
        deadline = time.monotonic() + timeout
        while admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                            (database,)).fetchone()[0]:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
    # A backend leaves pg_stat_activity just before it hands over its counts.
    time.sleep(0.2)
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT seq_scan + coalesce(idx_scan, 0) FROM pg_stat_user_tables"
                           " WHERE relname = 'grants'").fetchone()
    return None if row is None or row[0] is None else int(row[0])


async def give_grant(target: load.Target, spec: load.RequestSpec, url: str) -> str:
    """Send one request, which the approve rule holds, and approve it with a grant through the
    gateway's approvals store. Returns the grant's id once the held request was answered 200."""
    store = PostgresApprovalStore(url)
    tunnel = await load.Tunnel.open(target, spec)
    held = asyncio.ensure_future(tunnel.fetch(spec.h11_request()))
    try:
        deadline = time.monotonic() + HOLD_TIMEOUT
        while not (pending := await asyncio.to_thread(store.requests)):
            if held.done():
                status, _, body = held.result()
                raise RuntimeError(f"{target.name} answered {status} without holding the request: {body[:300]!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{target.name} held no request within {HOLD_TIMEOUT:g}s")
            await asyncio.sleep(0.05)
        approver = Approver(TENANT_ID, BENCH_APPROVER, "scripts/bench")
        _, grant = await asyncio.to_thread(Approvals(store).approve, pending[0].id, approver,
                                           reason="the grant-lookup measurement", grant_seconds=GRANT_SECONDS)
        status, _, body = await asyncio.wait_for(held, HOLD_TIMEOUT)
        if status != 200:
            raise RuntimeError(f"{target.name} answered {status} to the approved request: {body[:300]!r}")
        return grant.id
    finally:
        held.cancel()
        await tunnel.close()
        await asyncio.to_thread(store.close)


async def measure(bench, scenario, say) -> tuple[list, dict]:
    """The measurements of pg-allow and pg-grant (``scenario``, ``bench.settings.rounds`` rounds)
    and what was measured, or no measurement and why not. Fails only when interrupted."""
    info: dict = {"targets": [ALLOW, GRANT], "scenario": scenario.name,
                  "policy": f"the generated {RULES}-rule bench policy"}
    server = configured_server()
    if server is None:
        info.update(status="skipped", why=f"no PostgreSQL: {WHERE_TO_FIND}")
        say(f"  grant lookup on PostgreSQL: skipped ({info['why']})")
        return [], info
    try:
        database, url = create_database(server, DATABASE_PREFIX)
    except psycopg.Error as e:
        # One line: libpq's messages run over several, with a hint indented by a tab.
        info.update(status="skipped", why=f"no database for the run on PostgreSQL at {describe(server)}: "
                                         f"{' '.join(str(e).split()) or type(e).__name__}")
        say(f"  grant lookup on PostgreSQL: skipped ({info['why']})")
        return [], info
    info["database"] = describe(url)
    say(f"  grant lookup on PostgreSQL ({info['database']}, dropped after): starting {ALLOW} and {GRANT} ...")
    measurements = []
    try:
        w = bench.workdir
        (w / "pg-allow.yaml").write_text(policy_yaml(RULES))
        (w / "pg-grant.yaml").write_text(policy_yaml(RULES, approve=True))
        await bench.start_gateways({ALLOW: (w / "pg-allow.yaml", ["--state", url]),
                                    GRANT: (w / "pg-grant.yaml", ["--state", url])})
        await bench.preflight([ALLOW])
        info["grant_id"] = await give_grant(bench.targets[GRANT], bench.spec, url)
        await bench.preflight([GRANT])
        for r in range(bench.settings.rounds):
            for target in ([ALLOW, GRANT] if r % 2 == 0 else [GRANT, ALLOW]):
                m = await bench.measure(scenario, target, r + 1)
                measurements.append(m)
                say(m.line())
        audit = bench.record_dirs[GRANT] / "audit.jsonl"
        bench.stop_gateways([ALLOW, GRANT])  # their connections close: PostgreSQL's counts are complete
        info["granted_requests"] = granted_requests(audit, info["grant_id"])
        info["grants_table_reads"] = await asyncio.to_thread(grants_table_reads, server, database, url)
        info["status"] = "measured"
    except Exception as e:  # noqa: BLE001 - the bench reports the rest; this figure says why it is missing
        info.update(status="failed", why=str(e).strip() or type(e).__name__)
        say(f"  grant lookup on PostgreSQL: not measured: {info['why']}")
        measurements = []
    finally:
        bench.stop_gateways([ALLOW, GRANT])
        try:
            drop_database(server, database)
        except psycopg.Error as e:
            say(f"  could not drop the bench database {database}: {e}")
    return measurements, info
