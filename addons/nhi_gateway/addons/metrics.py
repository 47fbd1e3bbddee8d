"""Metrics: what the gateway does, counted for Prometheus (``GET /metrics`` on the admin listener).

The ``Metrics`` addon sits last in the chain: by then every stage has written the flow's one
``Decision``, so it counts what was decided without deciding anything itself. Values that are
state rather than events (held approvals, active grants, signing key age, group lookups) are read
when Prometheus scrapes, from the objects that hold them.

Labels are bounded on purpose: decisions, stages, checks, rule ids of the policy, upstream hosts
the policy allows, issuers it trusts. Never a token, a person's object id, a URL or a secret.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from mitmproxy import http
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest

from nhi_gateway.policy.decision import REFUSED_KEY, Stage, decision_of

PROBE_KEY = "nhi.probe"  # a health, readiness or metrics call: not a Graph flow, never audited or recorded
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_COUNTED = "nhi.counted"
_OTHER = "other"  # a label value outside the bounded set (never expected; keeps cardinality bounded)


class GatewayMetrics:
    """The gateway's metrics, in a registry of its own (one per gateway, so tests can read them)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("nhi_requests", "Requests by decision, the stage that decided and the rule.",
                                ["decision", "stage", "rule"], registry=r)
        self.token_checks_failed = Counter("nhi_token_checks_failed", "Requests refused by a token check, by check.",
                                           ["check"], registry=r)
        self.reported = Counter("nhi_reported", "Requests forwarded in report mode that a rule would have "
                                "refused (deny) or held (hold), by rule ('' when no rule allows them).",
                                ["would", "rule"], registry=r)
        self.approval_decisions = Counter("nhi_approval_decisions",
                                          "Held requests by how they ended (approved, denied, timed_out, cancelled).",
                                          ["outcome"], registry=r)
        self.upstream_responses = Counter("nhi_upstream_responses", "Answers from upstreams, by host and status class.",
                                          ["host", "status"], registry=r)
        self.upstream_errors = Counter("nhi_upstream_errors", "Forwarded requests that got no answer, by host.",
                                       ["host"], registry=r)
        self.upstream_latency = Histogram("nhi_upstream_latency_seconds",
                                          "From the request's last byte sent upstream to the answer's first byte.",
                                          ["host"], buckets=_LATENCY_BUCKETS, registry=r)
        self.recording_writes = Counter("nhi_recording_writes", "Recording writes by kind (write_ahead, flow) and outcome.",
                                        ["kind", "outcome"], registry=r)
        self.recording_latency = Histogram("nhi_recording_write_seconds", "Time to write (and confirm) a record.",
                                           ["kind"], buckets=_LATENCY_BUCKETS, registry=r)
        self.audit_writes = Counter("nhi_audit_writes", "Audit trail lines by outcome.", ["outcome"], registry=r)
        self.audit_latency = Histogram("nhi_audit_write_seconds", "Time to append an audit line.",
                                       buckets=_LATENCY_BUCKETS, registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def watch(self, collect: Callable[[], Iterable]) -> None:
        """Add values read at scrape time (``collect`` yields metric families)."""
        self.registry.register(_Collector(collect))

    # --- the writers' reports ------------------------------------------------------------------

    def recorded(self, kind: str, seconds: float, ok: bool) -> None:
        self.recording_writes.labels(kind, "ok" if ok else "failed").inc()
        if ok:
            self.recording_latency.labels(kind).observe(seconds)

    def audited(self, seconds: float, ok: bool) -> None:
        self.audit_writes.labels("ok" if ok else "failed").inc()
        if ok:
            self.audit_latency.observe(seconds)


class _Collector:
    def __init__(self, collect: Callable[[], Iterable]) -> None:
        self._collect = collect

    def collect(self):
        return list(self._collect())

    def describe(self):
        return []


def state_metrics(approval, approvals, key_store, groups):
    """Scrape-time values: held approvals, active grants, signing keys per issuer, group lookups."""

    def collect():
        held = GaugeMetricFamily("nhi_approvals_held", "Requests held now, waiting for a person.")
        held.add_metric([], approval.held_count if approval is not None else 0)
        yield held
        if approvals is not None:
            grants = GaugeMetricFamily("nhi_grants_active", "Grants in force now.")
            try:
                grants.add_metric([], len(approvals.store.grants(now=time.time(), active_only=True, limit=100_000)))
            except Exception:  # noqa: BLE001 - the store is down: readiness says so; no value here
                pass
            else:
                yield grants
        if key_store is not None:
            fetches = CounterMetricFamily("nhi_key_fetches", "Signing key set fetches by issuer and outcome.",
                                          labels=["issuer", "outcome"])
            age = GaugeMetricFamily("nhi_signing_keys_age_seconds", "Age of the signing keys held, by issuer.",
                                    labels=["issuer"])
            now = key_store.clock()
            for issuer, keyset in key_store.keysets():
                fetches.add_metric([issuer, "ok"], keyset.fetches - keyset.failures)
                fetches.add_metric([issuer, "failed"], keyset.failures)
                if keyset.fetched_at is not None:
                    age.add_metric([issuer], now - keyset.fetched_at)
            yield fetches
            yield age
        if groups is not None:
            lookups = CounterMetricFamily("nhi_group_lookups", "Group membership lookups in Graph by outcome.",
                                          labels=["outcome"])
            lookups.add_metric(["ok"], groups.lookups - groups.lookup_failures)
            lookups.add_metric(["failed"], groups.lookup_failures)
            yield lookups

    return collect


class Metrics:
    """Last of the chain: counts each flow once its answer (or error) is final."""

    def __init__(self, metrics: GatewayMetrics, rule_ids: Callable[[], set[str]]) -> None:
        self.metrics = metrics
        self.rule_ids = rule_ids  # the policy's rule ids: a rule label outside them is "other"

    def _count(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(PROBE_KEY) or flow.metadata.get(_COUNTED):
            return
        flow.metadata[_COUNTED] = True  # an error after the answer (client gone) is not a second request
        m = self.metrics
        decision = decision_of(flow)
        if decision is None:
            m.requests.labels("deny", "none", "").inc()
            return
        rule = decision.rule_id or ""
        if rule and rule not in self.rule_ids():
            rule = _OTHER
        m.requests.labels(str(decision.action), str(decision.stage), rule).inc()
        report = decision.reported
        if report is not None:
            would = report.get("would") if report.get("would") in ("deny", "hold") else _OTHER
            reported_rule = str(report.get("rule") or "")
            if reported_rule and reported_rule not in self.rule_ids():
                reported_rule = _OTHER
            m.reported.labels(would, reported_rule).inc()
        if not decision.allowed and decision.stage is Stage.IDENTITY:
            m.token_checks_failed.labels(decision.check or "token").inc()
        approval = decision.extra.get("approval")
        if isinstance(approval, dict) and approval.get("state") in ("approved", "denied", "timed_out", "cancelled"):
            m.approval_decisions.labels(approval["state"]).inc()
        if decision.allowed and flow.server_conn.timestamp_start is not None:
            host = flow.request.host.lower()
            if flow.response is not None and not flow.metadata.get(REFUSED_KEY):
                r = flow.response
                m.upstream_responses.labels(host, f"{r.status_code // 100}xx").inc()
                if r.timestamp_start and flow.request.timestamp_end:
                    m.upstream_latency.labels(host).observe(max(0.0, r.timestamp_start - flow.request.timestamp_end))
            elif flow.error is not None:
                m.upstream_errors.labels(host).inc()

    def response(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._count(flow)
