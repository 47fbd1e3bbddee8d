"""Authorization: the policy's decision for the operation the request performs and, for token
requests, for how the client authenticates (``identity.client_secret_grants``).

``POST /{version}/$batch`` needs no rule of its own: each inner request is decided as if it had
been sent alone, and the batch goes through only when every one of them is allowed
(:mod:`nhi_gateway.policy.batch`)."""

from __future__ import annotations

import logging

from mitmproxy import http

from nhi_gateway.policy.batch import (
    BATCH_KEY,
    BatchError,
    batch_refusal_body,
    decode_body,
    is_batch_endpoint,
    json_numbers_problem,
    judge_batch,
    names_batch,
)
from nhi_gateway.policy.decision import Decision, Stage
from nhi_gateway.policy.operation import Operation, OperationError
from nhi_gateway.policy.loader import PolicyStore
from nhi_gateway.policy.presented import decider_for
from nhi_gateway.policy.objects import OBJECTS_KEY, ObjectDecider
from nhi_gateway.identity.token_requests import TokenGrant, classify_token_request, is_token_endpoint, judge_grant, refusal_body
from nhi_gateway.addons.failclosed import fail_closed, refuse, set_decision
from nhi_gateway.addons.identity import PRINCIPAL_KEY

logger = logging.getLogger(__name__)


OPERATION_KEY = "nhi.operation_memo"


class _OperationMemo:
    """The operation of a request, with the request line it was read from. A live object, so
    it never crosses to the recording process nor reaches a recording."""

    __slots__ = ("line", "operation", "error")

    def __init__(self, line: tuple, operation: Operation | None, error: OperationError | None) -> None:
        self.line, self.operation, self.error = line, operation, error


def operation_of(flow: http.HTTPFlow) -> Operation:
    """The request's operation (raises OperationError as Operation.from_request does). Object
    names, membership and authorization each ask; it is worked out once per request line."""
    r = flow.request
    line = (r.method, r.scheme, r.host, r.port, r.path)
    memo = flow.metadata.get(OPERATION_KEY)
    if memo is None or memo.line != line:
        try:
            memo = _OperationMemo(line, Operation.from_request(*line), None)
        except OperationError as e:
            memo = _OperationMemo(line, None, e)
        flow.metadata[OPERATION_KEY] = memo
    if memo.error is not None:
        raise memo.error.with_traceback(None)  # each caller's own traceback, not all of them
    return memo.operation


def numbers_problem(request: http.Request) -> str | None:
    """Why a JSON request body holds a number Python cannot hold, or None (no body, not JSON, or
    an encoding the gateway does not read: Graph judges those bodies itself)."""
    if not request.raw_content:
        return None
    try:
        data = decode_body(request.raw_content, ",".join(request.headers.get_all("content-encoding")))
    except BatchError:
        return None
    return json_numbers_problem(data)


def grant_of(flow: http.HTTPFlow, operation: Operation) -> TokenGrant:
    # The body as received, not get_content(): the classifier never decompresses, so an anonymous
    # caller cannot make the gateway inflate a compression bomb (a compressed body is "unknown").
    r = flow.request
    return classify_token_request(r.headers, r.raw_content or b"", path=operation.path, query=operation.query)


def decision_in_force(policies: PolicyStore, flow: http.HTTPFlow) -> Decision:
    """What the policy in force decides of the flow's request now, for a request whose earlier
    decision may be stale (held for approval across a reload). Batches and token requests are
    never held, so the plain decision is all there is to ask."""
    principal = flow.metadata.get(PRINCIPAL_KEY)
    try:
        operation = operation_of(flow)
    except OperationError as e:
        return Decision.deny(Stage.POLICY, 400, "BadRequest", f"the request target cannot be judged safely: {e}",
                             check="operation", principal=principal.to_dict() if principal else None)
    objects = flow.metadata.get(OBJECTS_KEY)
    return decider_for(ObjectDecider(policies.current, objects), principal).decide(principal, operation)


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
        problem = numbers_problem(flow.request) if operation.is_graph and not names_batch(operation) else None
        if problem is not None:
            # Before any rule: Graph would act on a number that the gateway could neither judge,
            # mask nor record as it is (1e400 reads as infinity, which is not JSON).
            refuse(flow, Decision.deny(
                Stage.POLICY, 400, "BadRequest",
                f"the request body holds a number the gateway cannot hold, so it was not sent: {problem}",
                check="body", principal=principal.to_dict() if principal else None, operation=str(operation),
            ))
            return
        if names_batch(operation):
            self._judge_batch(flow, principal, operation, policy)
            return
        # The object the request names, whatever names it (policy/objects.py, addons/objects.py),
        # judged for every token the request presented (policy/presented.py).
        objects = flow.metadata.get(OBJECTS_KEY)
        decision = decider_for(ObjectDecider(policy, objects), principal).decide(principal, operation)
        # Every decision is in the audit trail; the log shows refusals, and allows with -v. An
        # approve decision's line is the approval stage's: a hold, or an allow by a grant (-v).
        logger.log(logging.DEBUG if decision.allowed or decision.needs_approval else logging.INFO,
                   "flow %s: %s %s -> %s (%s)",
                   flow.id, principal.label if principal else "anonymous", operation, decision.action,
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
        if decision.allowed or decision.needs_approval:
            # approve: held by the approval stage (addons/approval.py), which turns it into an
            # allow or a refusal; the guard refuses it should that stage not run.
            set_decision(flow, decision)
        else:
            refuse(flow, decision)

    def _judge_batch(self, flow: http.HTTPFlow, principal, operation: Operation, policy) -> None:
        who = principal.to_dict() if principal else None
        r = flow.request
        if not is_batch_endpoint(operation) or operation.method != "POST":
            refuse(flow, Decision.deny(
                Stage.POLICY, 400, "BadRequest",
                f"{operation} is not a batch request the gateway can judge: a batch is "
                "POST /v1.0/$batch or POST /beta/$batch",
                check="batch", operation=str(operation), principal=who,
            ))
            return
        # Every Content-Encoding header: a second one would be applied by Graph but not by us.
        encoding = ",".join(r.headers.get_all("content-encoding"))
        decision = judge_batch(decider_for(ObjectDecider(policy, flow.metadata.get(OBJECTS_KEY)), principal),
                               principal, operation, r.raw_content or b"",
                               r.headers.get("content-type", ""), encoding)
        # Kept apart from the decision: a later refusal replaces the decision, not this list.
        flow.metadata[BATCH_KEY] = list(decision.extra.get("batch") or ())
        inner = ", ".join(f"{e['id'] or '#' + str(e['index'] + 1)}={e['decision']}"
                          f"{'(' + e['rule'] + ')' if e['rule'] else ''}" for e in flow.metadata[BATCH_KEY])
        logger.info("flow %s: %s %s [%s] -> %s", flow.id, principal.label if principal else "anonymous",
                    operation, inner, decision.action)
        if decision.allowed:
            set_decision(flow, decision)
            return
        refuse(flow, decision)
        flow.response.content = batch_refusal_body(decision, flow.id)
