"""The benchmark's grant-lookup figure (issue 15): what it compares, what it counts, what it says
when it could not measure, and the target it checks. (These tests check its bookkeeping and its
report, never a timing; they start no gateway and need no PostgreSQL.)"""

from __future__ import annotations

import asyncio
import json

import psycopg
import pytest

from nhi_gateway.bench import grants, postgres
from nhi_gateway.bench.decisions import callers, operations
from nhi_gateway.bench.policies import BENCH_RULE_ID, policy_yaml
from nhi_gateway.bench.report import render, targets, warnings
from nhi_gateway.policy.decision import Action
from nhi_gateway.policy.loader import parse_policy

GOAL = "grant lookup on PostgreSQL adds <= 1 ms at p50 (keep-alive c=1)"


def _row(target: str, p50: float, p99: float) -> dict:
    return {"scenario": "keep-alive c=1", "target": target, "rps": 400.0, "p50_ms": p50, "p99_ms": p99,
            "errors": {}, "peak_rss_kb": 100_000, "proxy_cpu_ms_per_request": 1.0,
            "total_cpu_ms_per_request": 1.3, "cpu_percent": {"proxy": 50.0, "upstream": 5.0, "loadgen": 5.0}}


def _results(grant_lookup: dict | None, allow=(2.0, 4.0), grant=(2.3, 4.6)) -> dict:
    results = {
        "machine": {"nproc": 2, "cpu_model": "test", "python": "3.13", "mitmproxy": "12"},
        "settings": {"mode": "quick", "duration_s": 3.0, "rounds": 1, "upstream": "standin", "policy": "bench.yaml",
                     "request": "GET /v1.0/users"},
        "summary": [_row("pg-allow", *allow), _row("pg-grant", *grant)],
        "memory": [], "decisions": [], "wall_seconds": 1.0,
    }
    if grant_lookup is not None:
        results["grant_lookup"] = grant_lookup
    return results


def _measured(**counts) -> dict:
    return {"targets": ["pg-allow", "pg-grant"], "scenario": "keep-alive c=1",
            "policy": "the generated 50-rule bench policy", "database": "postgresql://127.0.0.1:5432/nhi_bench_x",
            "grant_id": "grt-abc", "status": "measured",
            **({"granted_requests": 1000, "grants_table_reads": 1002} | counts)}


def _check(results: dict):
    return [t for t in targets(results) if t.name == "grant lookup"]


@pytest.mark.parametrize("allow, grant, met, measured", [
    ((2.0, 4.0), (2.3, 4.6), True, "+0.30 ms (p99 +0.60 ms)"),
    ((2.0, 4.0), (3.0, 5.0), True, "+1.00 ms (p99 +1.00 ms)"),
    ((2.0, 4.0), (3.2, 9.0), False, "+1.20 ms (p99 +5.00 ms)"),
])
def test_the_target_is_the_added_p50_of_the_grant_lookup_over_the_plain_allow(allow, grant, met, measured):
    (check,) = _check(_results(_measured(), allow, grant))
    assert (check.goal, check.measured, check.met) == (GOAL, measured, met)


@pytest.mark.parametrize("status, why", [
    ("skipped", "no PostgreSQL: set NHI_TEST_POSTGRES_URL or run one at 127.0.0.1:5432"),
    ("failed", "pg-grant did not become ready within 60s:\n(the log's tail)"),
])
def test_a_grant_lookup_not_measured_is_a_target_not_measurable_saying_why(status, why):
    info = {"targets": ["pg-allow", "pg-grant"], "scenario": "keep-alive c=1", "status": status, "why": why}
    results = _results(info)
    results["summary"] = []
    (check,) = _check(results)
    assert check.met is None
    assert check.measured == f"not measured: {why.splitlines()[0]}"
    text = render(results)
    assert f"grant lookup on PostgreSQL: not measured: {why.splitlines()[0]}" in text
    assert "[n/a ] grant lookup" in text


def test_results_without_the_grant_lookup_check_nothing_about_it():
    assert _check(_results(None)) == []
    assert "grant lookup" not in render(_results(None))


def test_the_report_says_what_was_measured_and_what_postgresql_counted():
    text = render(_results(_measured()))
    assert "gateways with --state postgresql://127.0.0.1:5432/nhi_bench_x, dropped after" in text
    assert "pg-grant: the same policy, the caller's rule as an approve rule, and an active grant" in text
    assert ("the gateway caches no grant: every decision of pg-grant looked it up in PostgreSQL (1,000 requests "
            "allowed by grant grt-abc in the audit trail; PostgreSQL counted 1,002 reads of the grants table)") in text
    assert ("added per request by the lookup and the approval stage around it (pg-grant over pg-allow): "
            "p50 +0.30 ms, p99 +0.60 ms  (pg-grant 2.30 / 4.60 ms, pg-allow 2.00 / 4.00 ms)") in text
    assert "[PASS] grant lookup" in text
    assert not [w for w in warnings(_results(_measured())) if "grant" in w]


@pytest.mark.parametrize("reads", [10, None])
def test_fewer_reads_of_the_grants_table_than_granted_requests_is_not_called_a_lookup(reads):
    """Were grants ever cached, the figure would no longer be what a lookup costs: the report
    must not say every decision asked PostgreSQL unless PostgreSQL counted it."""
    results = _results(_measured(grants_table_reads=reads))
    text = render(results)
    assert "every decision of pg-grant looked it up" not in text
    notes = [w for w in warnings(results) if w.startswith("grant lookup")]
    assert bool(notes) == (reads is not None)


def test_only_the_requests_the_given_grant_allowed_are_counted(tmp_path):
    audit = tmp_path / "audit.jsonl"
    lines = [
        {"decision": "approve", "event": "approval_requested", "reason": "approval apr-1 requested"},
        {"decision": "allow", "reason": "approved by scripts/bench (approval apr-1; grant grt-abc until x)"},
        *[{"decision": "allow", "reason": "allowed by grant grt-abc of approval apr-1 (approved by ...)"}] * 3,
        {"decision": "allow", "reason": "allowed by grant grt-other of approval apr-2 (approved by ...)"},
        {"decision": "deny", "reason": "allowed by grant grt-abc? no: denied by rule x"},
    ]
    audit.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert grants.granted_requests(audit, "grt-abc") == 3
    assert grants.granted_requests(tmp_path / "none.jsonl", "grt-abc") == 0


def test_the_two_policies_differ_only_in_the_callers_rule_allow_against_approve():
    allow, approve = parse_policy(policy_yaml(50), "allow"), parse_policy(policy_yaml(50, approve=True), "approve")
    caller, operation = callers()[0], operations()[0]  # mcp-directory, GET /v1.0/users?$top=5
    plain, held = allow.decide(caller, operation), approve.decide(caller, operation)
    assert (plain.action, plain.rule_id) == (Action.ALLOW, BENCH_RULE_ID)
    assert (held.action, held.rule_id) == (Action.APPROVE, BENCH_RULE_ID)
    assert held.mask_profile == plain.mask_profile == "directory-pii"
    assert [r.id for r in allow.rules] == [r.id for r in approve.rules]
    assert [(r.id, r.action) for r in allow.rules if r.action != approve.rule(r.id).action] == [
        (BENCH_RULE_ID, Action.ALLOW)]


class _NoBench:
    """A bench that must not be used: without a database nothing is started."""

    def __getattr__(self, name):
        raise AssertionError(f"the bench was used ({name}) although the measurement was skipped")


def _skip(monkeypatch, server, refuse=None):
    said = []
    monkeypatch.setattr(grants, "configured_server", lambda: server)
    if refuse is not None:
        def create(*_):
            raise refuse
        monkeypatch.setattr(grants, "create_database", create)
    from nhi_gateway.bench.run import LATENCY

    measured, info = asyncio.run(grants.measure(_NoBench(), LATENCY, said.append))
    return measured, info, said


def test_without_postgresql_the_measurement_is_skipped_saying_why(monkeypatch):
    measured, info, said = _skip(monkeypatch, None)
    assert measured == []
    assert info["status"] == "skipped"
    assert info["why"] == "no PostgreSQL: set NHI_TEST_POSTGRES_URL or run one at 127.0.0.1:5432"
    assert said == [f"  grant lookup on PostgreSQL: skipped ({info['why']})"]


def test_a_server_that_cannot_give_the_run_a_database_skips_the_measurement_saying_why(monkeypatch):
    refusal = psycopg.OperationalError('connection failed: connection to server at "db.example", port 5433 failed: '
                                       "Connection refused\n\tIs the server running on that host?")
    measured, info, said = _skip(monkeypatch, "postgresql://bench:secret@db.example:5433/postgres", refusal)
    assert measured == []
    assert info["status"] == "skipped"
    assert info["why"] == ("no database for the run on PostgreSQL at postgresql://db.example:5433/postgres: "
                           'connection failed: connection to server at "db.example", port 5433 failed: '
                           "Connection refused Is the server running on that host?")
    assert "secret" not in said[0]


@pytest.mark.parametrize("server, url", [
    ("postgresql://postgres@127.0.0.1:5432/postgres", "postgresql://postgres@127.0.0.1:5432/nhi_bench_1"),
    ("postgresql://u@db:5433/postgres?sslmode=require", "postgresql://u@db:5433/nhi_bench_1?sslmode=require"),
])
def test_the_runs_database_is_on_the_server_found(server, url):
    assert postgres.database_url(server, "nhi_bench_1") == url  # still a URL: what --state takes


def test_a_conninfo_server_gives_a_conninfo_naming_the_runs_database():
    conninfo = postgres.database_url("host=127.0.0.1 port=5432 dbname=postgres", "nhi_bench_1")
    assert psycopg.conninfo.conninfo_to_dict(conninfo) == {"host": "127.0.0.1", "port": "5432", "dbname": "nhi_bench_1"}


def test_the_server_is_the_one_the_tests_use(monkeypatch):
    monkeypatch.setenv("NHI_TEST_POSTGRES_URL", "postgresql://elsewhere:5439/x")
    assert postgres.configured_server() == "postgresql://elsewhere:5439/x"
    monkeypatch.delenv("NHI_TEST_POSTGRES_URL")
    monkeypatch.setattr(postgres, "answers", lambda host, port: (host, port) == ("127.0.0.1", 5432))
    assert postgres.configured_server() == postgres.LOCAL_POSTGRES
    monkeypatch.setattr(postgres, "answers", lambda host, port: False)
    assert postgres.configured_server() is None
