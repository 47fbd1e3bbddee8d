"""One log line per flow, once its answer is final: who, what, the verdict and why.

Refusals at INFO (an operator wants to see them), allows at DEBUG (one per request would cost
the proxy's time at INFO). With ``--log-format json`` the flow's id, principal, operation,
decision, rule or check, and status are fields of the line.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from nhi_gateway.addons.metrics import PROBE_KEY
from nhi_gateway.policy.decision import decision_of

logger = logging.getLogger(__name__)


class FlowLog:
    def _log(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(PROBE_KEY):
            return
        decision = decision_of(flow)
        allowed = decision is not None and decision.allowed
        level = logging.DEBUG if allowed else logging.INFO
        if not logger.isEnabledFor(level):
            return
        principal = (decision.principal if decision else None) or {}
        who = principal.get("display_name") or principal.get("app_id") or "anonymous"
        status = flow.response.status_code if flow.response is not None else None
        fields = {
            "flow_id": flow.id,
            "principal": {k: principal.get(k) for k in ("app_id", "object_id", "display_name", "tenant_id")
                          if principal.get(k)},
            "operation": decision.operation if decision else "",
            "decision": str(decision.action) if decision else "deny",
            "rule": (decision.rule_id or "") if decision else "",
            "check": decision.check if decision else "",
            "status": status,
        }
        why = (f"rule {fields['rule']}" if fields["rule"] else
               f"check {fields['check']}" if fields["check"] else "no decision" if decision is None else "")
        logger.log(level, "flow %s: %s %s -> %s%s%s", flow.id, who, fields["operation"] or flow.request.method,
                   fields["decision"], f" ({why})" if why else "", f" {status}" if status else
                   f" error: {flow.error.msg}" if flow.error else "", extra={"nhi": fields})

    def response(self, flow: http.HTTPFlow) -> None:
        self._log(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.response is None:
            self._log(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._log(flow)
