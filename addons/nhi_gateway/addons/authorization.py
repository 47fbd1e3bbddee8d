"""Authorization: the policy's decision for the operation the request performs."""

from __future__ import annotations

import logging

from mitmproxy import http

from ..decision import Decision, Stage
from ..operation import Operation, OperationError
from ..policy import PolicyStore
from .failclosed import fail_closed, refuse, set_decision
from .identity import PRINCIPAL_KEY

logger = logging.getLogger(__name__)


def operation_of(flow: http.HTTPFlow) -> Operation:
    r = flow.request
    return Operation.from_request(r.method, r.scheme, r.host, r.port, r.path)


class Authorization:
    def __init__(self, policies: PolicyStore) -> None:
        self.policies = policies

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        principal = flow.metadata.get(PRINCIPAL_KEY)
        try:
            operation = operation_of(flow)
        except OperationError as e:
            refuse(flow, Decision.deny(
                Stage.POLICY, 400, "BadRequest",
                f"the request target cannot be judged safely: {e}",
                check="operation", principal=principal.to_dict() if principal else None,
                operation=f"{flow.request.method} {flow.request.host} {flow.request.path[:200]}",
            ))
            return
        decision = self.policies.current.decide(principal, operation)
        who = principal.label if principal else "anonymous"
        logger.info("flow %s: %s %s -> %s (%s)", flow.id, who, operation, decision.action,
                    decision.rule_id or decision.reason)
        if decision.allowed:
            set_decision(flow, decision)
        else:
            refuse(flow, decision)
