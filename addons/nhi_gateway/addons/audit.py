"""Audit: one hash-chained JSON line per decision, written before the client gets its answer."""

from __future__ import annotations

import logging
import time

from mitmproxy import http
from mitmproxy.net.http import url

from nhi_gateway.recording.audit import AuditLog, AuditWriteError
from nhi_gateway.policy.batch import BATCH_KEY, inner_flow_id
from nhi_gateway.policy.admission import PROTOCOL_ERROR_KEY, answered_status
from nhi_gateway.policy.decision import Decision, Stage
from nhi_gateway.addons.failclosed import REFUSED_KEY, decision_of, fail_closed, refuse
from nhi_gateway.addons.guard import Health
from nhi_gateway.addons.identity import IGNORED_CREDENTIAL_KEY
from nhi_gateway.addons.metrics import PROBE_KEY
from nhi_gateway.recording.flows import approver_of

logger = logging.getLogger(__name__)

AUDITED_KEY = "nhi.audited"


def url_of(r: http.Request) -> str:
    """The request's URL as mitmproxy's ``pretty_url`` writes it (the Host header's name), without
    parsing the Host header when it is just the request's host on its scheme's default port (most
    requests: pretty_url would write the URL itself)."""
    if r.method == "CONNECT":
        return f"{r.host}:{r.port}"
    if r.host_header == r.host and r.port == url.default_port(r.scheme):
        return r.url
    return r.pretty_url


def audit_record(flow: http.HTTPFlow) -> dict:
    decision = decision_of(flow)
    r = flow.request
    if flow.error is not None:
        # The client never got flow.response: mitmproxy answered (400, 413, 502), or reset the
        # stream or connection (0).
        judged = decision is not None and decision.stage is not Stage.PROXY
        status = answered_status(flow.error.msg, flow.metadata.get(PROTOCOL_ERROR_KEY), judged)
    elif flow.response is not None:
        status = flow.response.status_code
    else:
        status = 0
    return {
        "flow_id": flow.id,
        "principal": (decision.principal if decision else None) or None,
        "method": r.method,
        "url": url_of(r),
        "decision": str(decision.action) if decision else "deny",
        "rule": decision.rule_id if decision else None,
        "stage": str(decision.stage) if decision else "guard",
        "reason": decision.reason if decision else "no decision was recorded for this flow",
        "check": decision.check if decision else "",
        "status": status,
        "error": flow.error.msg if flow.error else None,
        "masked_fields": (decision.extra.get("masked_fields", 0) if decision else 0),
        "flags": (list(decision.extra.get("flags", ())) if decision else [])
        + (["expired_proxy_credential_ignored"] if flow.metadata.get(IGNORED_CREDENTIAL_KEY) else []),
        "grant": (decision.extra.get("grant") if decision else None) or None,
        "operation": (decision.operation if decision else "") or None,
        "approver": approver_of(decision) if decision else None,
        # Report mode: {"would": "deny" | "hold", "rule", "reason"} of a forwarded request.
        "report": (decision.extra.get("report") if decision and decision.allowed else None) or None,
    }


def batch_inner_records(flow: http.HTTPFlow, outer: dict) -> list[dict]:
    """For a ``$batch``: one line per inner request, as if it had been sent alone, with its own
    decision and rule (:mod:`nhi_gateway.policy.batch`). ``batch.flow_id`` is the outer flow's id; the
    line's own ``flow_id`` is the id of the inner request's recorded flow.

    ``status``: the inner response's status when Graph answered it and the client got it; else
    what the client got for the whole batch (its refusal, or the gateway's 502)."""
    out = []
    r = flow.request
    port = "" if r.port == 443 else f":{r.port}"
    for e in flow.metadata.get(BATCH_KEY) or ():
        sent = bool(e.get("sent"))
        out.append({
            "flow_id": inner_flow_id(flow.id, e),
            "principal": outer.get("principal"),
            "method": e.get("method") or None,
            "url": f"https://{r.host}{port}{e.get('target') or ''}",
            "decision": e.get("decision") or "deny",
            "rule": e.get("rule") or None,
            "stage": e.get("stage") or "policy",
            "reason": e.get("reason") or "",
            "check": e.get("check") or "",
            "status": e.get("response_status") or outer.get("status"),
            "error": outer.get("error") if sent else None,
            "masked_fields": e.get("masked_fields", 0),
            "flags": [],
            "grant": None,
            "operation": e.get("operation") or None,
            "report": e.get("report") if isinstance(e.get("report"), dict) else None,
            "batch": {"flow_id": flow.id, "id": e.get("id"), "index": e.get("index"), "sent": sent},
        })
    return out


class Audit:
    def __init__(self, log: AuditLog, health: Health, worker: int | None = None) -> None:
        self.log = log
        self.health = health
        self.worker = worker  # run --workers N: named in every line
        self.on_write = lambda seconds, ok: None  # metrics

    def _audit(self, flow, live: bool, amends: bool = False) -> None:
        if flow.metadata.get(AUDITED_KEY) or flow.metadata.get(PROBE_KEY):
            return
        record = audit_record(flow)
        if self.worker:
            record["worker"] = self.worker
        if amends:
            record["amends"] = "an earlier line of this flow_id: the client got this answer instead"
        started = time.perf_counter()
        try:
            if not amends:  # the inner lines of a batch stand; an amendment concerns the outer answer
                for inner in batch_inner_records(flow, record):
                    self.log.write(inner)
            self.log.write(record)
        except AuditWriteError as e:
            self.on_write(time.perf_counter() - started, False)
            self.health.fail("audit", str(e))
            if live:
                refuse(flow, Decision.deny(
                    Stage.GUARD, 503, "ServiceUnavailable",
                    "the gateway could not write the audit trail, so it refused the request",
                    check="audit"))
            return
        self.on_write(time.perf_counter() - started, True)
        flow.metadata[AUDITED_KEY] = True
        self.health.recover("audit")

    def amend(self, flow: http.HTTPFlow) -> None:
        """A later stage refused a flow already audited (its recording failed): say so, so the
        trail tells what the client actually got."""
        flow.metadata.pop(AUDITED_KEY, None)
        self._audit(flow, live=False, amends=True)

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._audit(flow, live=not flow.metadata.get(REFUSED_KEY))

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        self._audit(flow, live=False)

    @fail_closed
    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._audit(flow, live=False)
