"""Authorization: the policy's decision for the operation the request performs and, for token
requests, for how the client authenticates (``identity.client_secret_grants``)."""

from __future__ import annotations

import logging

from mitmproxy import http

from ..decision import Decision, Stage
from ..operation import Operation, OperationError
from ..policy import PolicyStore
from ..token_requests import TokenGrant, classify_token_request, is_token_endpoint, judge_grant, refusal_body
from .failclosed import fail_closed, refuse, set_decision
from .identity import PRINCIPAL_KEY

logger = logging.getLogger(__name__)


def operation_of(flow: http.HTTPFlow) -> Operation:
    r = flow.request
    return Operation.from_request(r.method, r.scheme, r.host, r.port, r.path)


def grant_of(flow: http.HTTPFlow, operation: Operation) -> TokenGrant:
    # The body as received, not get_content(): the classifier never decompresses, so an anonymous
    # caller cannot make the gateway inflate a compression bomb (a compressed body is "unknown").
    r = flow.request
    return classify_token_request(r.headers, r.raw_content or b"", path=operation.path, query=operation.query)


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
        policy = self.policies.current
        decision = policy.decide(principal, operation)
        who = principal.label if principal else "anonymous"
        logger.info("flow %s: %s %s -> %s (%s)", flow.id, who, operation, decision.action,
                    decision.rule_id or decision.reason)
        if decision.allowed and is_token_endpoint(operation):
            grant = grant_of(flow, operation)
            decision = judge_grant(policy.identity.client_secret_grants, decision, grant)
            # The client id and the kind only: never the secret or the assertion.
            logger.info("flow %s: token request of client %s: %s grant -> %s%s", flow.id,
                        grant.client_id or "?", grant.kind, decision.action,
                        f" ({grant.problem})" if grant.problem else "")
            if not decision.allowed:
                refuse(flow, decision)
                flow.response.content = refusal_body(decision, flow.id)
                return
        if decision.allowed:
            set_decision(flow, decision)
        else:
            refuse(flow, decision)
