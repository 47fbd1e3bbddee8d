"""Audit: one hash-chained JSON line per decision, written before the client gets its answer."""

from __future__ import annotations

import logging

from mitmproxy import http

from ..audit import AuditLog, AuditWriteError
from ..decision import Decision, Stage
from .failclosed import REFUSED_KEY, decision_of, fail_closed, refuse
from .guard import Health

logger = logging.getLogger(__name__)

AUDITED_KEY = "nhi.audited"


def audit_record(flow: http.HTTPFlow) -> dict:
    decision = decision_of(flow)
    r = flow.request
    url = f"{r.host}:{r.port}" if r.method == "CONNECT" else r.pretty_url
    if flow.response is not None:
        status = flow.response.status_code
    else:
        status = 502 if flow.error else 0
    return {
        "flow_id": flow.id,
        "principal": (decision.principal if decision else None) or None,
        "method": r.method,
        "url": url,
        "decision": str(decision.action) if decision else "deny",
        "rule": decision.rule_id if decision else None,
        "stage": str(decision.stage) if decision else "guard",
        "reason": decision.reason if decision else "no decision was recorded for this flow",
        "check": decision.check if decision else "",
        "status": status,
        "error": flow.error.msg if flow.error else None,
        "masked_fields": (decision.extra.get("masked_fields", 0) if decision else 0),
    }


class Audit:
    def __init__(self, log: AuditLog, health: Health) -> None:
        self.log = log
        self.health = health

    def _audit(self, flow, live: bool) -> None:
        if flow.metadata.get(AUDITED_KEY):
            return
        try:
            self.log.append(audit_record(flow))
        except AuditWriteError as e:
            self.health.fail("audit", str(e))
            if live:
                refuse(flow, Decision.deny(
                    Stage.GUARD, 503, "ServiceUnavailable",
                    "the gateway could not write the audit trail, so it refused the request",
                    check="audit"))
            return
        flow.metadata[AUDITED_KEY] = True
        self.health.recover("audit")

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._audit(flow, live=not flow.metadata.get(REFUSED_KEY))

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        self._audit(flow, live=False)

    @fail_closed
    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._audit(flow, live=False)
