"""Approval: a request that an ``approve`` rule decided is held until a person answers.

Sits after Authorization (which writes the ``approve`` decision) and before Masking and the Guard
(which let only an explicit allow through, so an ``approve`` this stage never saw is refused).
The ``request`` hook is ``async``: mitmproxy runs each flow's hooks in a task of its own, so a held
request waits on its own future while every other request keeps flowing. The answer becomes an
allow (approved, or covered by an active grant) or a refusal: 403 naming the approver and reason
(denied), 403 "approval timed out", or cancelled when the client disconnects while held
(``client_disconnected``; mitmproxy does not cancel the hook itself) or resets the request's
HTTP/2 stream (``request_cancelled``, called by the master: mitmproxy has no hook for it). Each outcome is written
into the decision (``extra["approval"]``, ``extra["approver"]``), which the audit trail and the
recording carry; opening a request also writes its own audit line, a log line and, when the
policy names one, a webhook message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from mitmproxy import connection, http

from nhi_gateway.approvals.store import (
    ApprovalRequest,
    Approvals,
    ApprovalSettings,
    ApprovalState,
    ApprovalStoreError,
    Grant,
    format_duration,
    iso,
    notification_text,
    request_digest,
    webhook_url,
)
from nhi_gateway.recording.audit import AuditLog, AuditWriteError
from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.policy.loader import PolicyStore
from nhi_gateway.recording.redaction import redact_url, scrub_text
from nhi_gateway.addons.authorization import decision_in_force
from nhi_gateway.addons.failclosed import decision_of, fail_closed, refuse, set_decision
from nhi_gateway.addons.guard import Health
from nhi_gateway.addons.identity import PRINCIPAL_KEY

logger = logging.getLogger(__name__)

REFUSAL_CODE = "Authorization_RequestDenied"
PREVIEW_CHARS = 2048


def body_preview(request: http.Request) -> str:
    """The start of the body as an approver reads it, credentials scrubbed. Never decompressed:
    a held request must not make the gateway inflate whatever a caller sent."""
    raw = request.raw_content or b""
    if not raw:
        return ""
    if request.headers.get("content-encoding", "identity").lower() not in ("", "identity"):
        return f"({request.headers['content-encoding']}-encoded body, {len(raw)} bytes)"
    text = raw[: PREVIEW_CHARS * 4].decode("utf-8", "replace")[:PREVIEW_CHARS]
    return scrub_text(text) + ("…" if len(raw) > len(text.encode("utf-8", "replace")) else "")


def approved(decision: Decision, request: ApprovalRequest | None, grant: Grant | None) -> Decision:
    """The allow an approval (or a grant it made) turns ``decision`` into."""
    if request is None:
        assert grant is not None
        outcome = {"id": grant.approval_id, "state": str(ApprovalState.APPROVED),
                   "approver": grant.approver.to_dict(), "reason": grant.reason, "grant_id": grant.id}
        approver, why = grant.approver, grant.reason
        reason = (f"allowed by grant {grant.id} of approval {grant.approval_id} (approved by "
                  f"{approver.label}{': ' + why if why else ''}), valid until {iso(grant.expires_at)}")
    else:
        assert request is not None and request.approver is not None
        outcome = request.outcome()
        approver, why = request.approver, request.reason
        reason = f"approved by {approver.label}{': ' + why if why else ''} (approval {request.id}"
        if request.grant_id:
            reason += f"; grant {request.grant_id} until {iso(grant.expires_at) if grant else '?'}"
        reason += ")"
    return decision.but(
        action=Action.ALLOW, status=0, code="", reason=reason,
        extra={**decision.extra, "approval": outcome, "approver": approver.label},
    )


def refused(decision: Decision, request: ApprovalRequest) -> Decision:
    """The refusal a request that was not approved ends in: denied, timed out or cancelled."""
    if request.state is ApprovalState.DENIED and request.approver is not None:
        reason = f"denied by {request.approver.label}: {request.reason or 'no reason given'} (approval {request.id})"
    elif request.state is ApprovalState.TIMED_OUT:
        waited = format_duration(request.expires_at - request.created_at)
        reason = f"approval timed out: nobody approved approval {request.id} within {waited}"
    else:
        reason = f"approval {request.id} was cancelled: {request.reason or request.state}"
    # extra["approver"]: the label of whoever decided (none for timed out or cancelled), which the
    # recording's comment and the audit line show as it is.
    extra = {k: v for k, v in decision.extra.items() if k != "approver"}
    if request.approver is not None:
        extra["approver"] = request.approver.label
    return Decision.deny(
        Stage.POLICY, 403, REFUSAL_CODE, reason, rule_id=decision.rule_id, operation=decision.operation,
        principal=decision.principal, mask_profile=decision.mask_profile,
        extra={**extra, "approval": request.outcome()},
    )


def overruled(decision: Decision, answer: str, now: Decision) -> Decision:
    """The refusal of a request someone approved (``answer`` says who, and how) that the policy in
    force denies: the policy wins, and the refusal names its rule."""
    return Decision.deny(
        Stage.POLICY, now.status or 403, now.code or REFUSAL_CODE,
        f"{answer}, but the policy in force refuses it now: {now.reason}",
        rule_id=now.rule_id, check=now.check, operation=decision.operation, principal=decision.principal,
        extra={**decision.extra, "released_under": {"action": str(now.action), "rule": now.rule_id or "",
                                                    "reason": now.reason}},
    )


class Approval:
    def __init__(self, policies: PolicyStore, approvals: Approvals, health: Health,
                 audit_log: AuditLog | None = None,
                 notify: Callable[[str, dict], Awaitable[tuple[int, object]]] | None = None,
                 api_url: Callable[[], str] = lambda: "") -> None:
        self.policies = policies
        self.approvals = approvals
        self.health = health
        self.audit_log = audit_log
        self.notify = notify  # async (url, payload) -> (status, body): the gateway's own HTTPS client
        self.api_url = api_url
        self._held: dict[str, set[str]] = {}  # client connection id -> approval ids held for it
        self._flows: dict[str, http.HTTPFlow] = {}  # approval id -> the flow it holds
        self._held_flows: dict[str, str] = {}  # flow id -> the approval id it is held for
        self._tasks: set[asyncio.Task] = set()
        self.stopping: str | None = None  # why the gateway stops, once it does

    @property
    def held_count(self) -> int:
        return sum(len(ids) for ids in self._held.values())

    def stop(self, reason: str) -> int:
        """The gateway stops: nobody can answer a held request any more, so each is cancelled and
        its client answered 503 naming the stop. Returns how many were held."""
        self.stopping = reason
        held = [approval_id for ids in self._held.values() for approval_id in ids]
        for approval_id in held:
            try:
                self.approvals.cancel_soon(approval_id, reason)
            except Exception as e:  # noqa: BLE001 - the held hook then times out, which also refuses
                logger.error("cancelling approval %s at stop failed: %r", approval_id, e)
        return len(held)

    def _stopping_refusal(self, decision: Decision) -> Decision:
        return Decision.deny(
            Stage.GUARD, 503, "ServiceUnavailable",
            f"the request needed approval and {self.stopping}; retry later", check="stopping",
            rule_id=decision.rule_id, operation=decision.operation, principal=decision.principal,
            extra={k: v for k, v in decision.extra.items() if k != "approver"})

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        decision = decision_of(flow)
        if decision is None or decision.action is not Action.APPROVE:
            return
        if self.stopping is not None:
            refuse(flow, self._stopping_refusal(decision))
            return
        principal = flow.metadata.get(PRINCIPAL_KEY)
        rule = self.policies.current.rule(decision.rule_id or "")
        settings = ApprovalSettings.of(rule) if rule is not None else None
        if principal is None or settings is None:
            why = ("an approval needs a verified identity to hold the request for" if principal is None
                   else f"rule {decision.rule_id!r} is no longer an approve rule of the policy")
            refuse(flow, Decision.deny(Stage.POLICY, 403, REFUSAL_CODE, f"the request cannot be held: {why}",
                                       rule_id=decision.rule_id, operation=decision.operation,
                                       principal=decision.principal))
            return
        try:
            await self._hold(flow, decision, principal, settings)
        except ApprovalStoreError as e:
            logger.error("flow %s: %s", flow.id, e)
            refuse(flow, Decision.deny(
                Stage.GUARD, 503, "ServiceUnavailable",
                f"the request needs approval and the gateway cannot keep approval records ({e}); "
                "it was refused (fail closed). Retry later.", check="approvals",
                rule_id=decision.rule_id, operation=decision.operation, principal=decision.principal))

    async def _hold(self, flow: http.HTTPFlow, decision: Decision, principal, settings: ApprovalSettings) -> None:
        grant = await self.approvals.grant_for_request(principal.key, decision.operation, settings.rule_id)
        if grant is not None:
            # An allow, logged as allows are (-v): a grant can cover many requests a second, and
            # the audit trail names the grant of each.
            logger.debug("flow %s: %s %s allowed by grant %s (approval %s, until %s)", flow.id, principal.label,
                        decision.operation, grant.id, grant.approval_id, iso(grant.expires_at))
            self._release(flow, approved(decision, None, grant), f"grant {grant.id} of approval {grant.approval_id} "
                          f"(approved by {grant.approver.label}) covers it")
            return
        held = await self._open(flow, decision, settings)
        if held is None:
            return
        client = flow.client_conn.id
        self._held.setdefault(client, set()).add(held.id)
        self._flows[held.id] = flow
        self._held_flows[flow.id] = held.id
        try:
            final = await self.approvals.outcome(held)
        finally:
            self._flows.pop(held.id, None)
            self._held_flows.pop(flow.id, None)
            ids = self._held.get(client)
            if ids is not None:
                ids.discard(held.id)
                if not ids:
                    del self._held[client]
        logger.info("flow %s: approval %s %s%s", flow.id, final.id, final.state,
                    f" by {final.approver.label}" if final.approver else "")
        if final.state is ApprovalState.APPROVED:
            grant = await self.approvals.find_grant(final.grant_id) if final.grant_id else None
            assert final.approver is not None
            self._release(flow, approved(decision, final, grant), f"approved by {final.approver.label} "
                          f"(approval {final.id})")
        elif final.state is ApprovalState.CANCELLED and self.stopping is not None:
            refuse(flow, self._stopping_refusal(decision.but(extra={**decision.extra, "approval": final.outcome()})))
        else:
            refuse(flow, refused(decision, final))

    def _release(self, flow: http.HTTPFlow, allow: Decision, answer: str) -> None:
        """Let an approved request go, once the policy in force agrees: a held request waited
        while the policy could be reloaded, and an approval (or a grant) answers only the question
        the rule asked, never what a rule added meanwhile denies."""
        now = decision_in_force(self.policies, flow)
        if now.action is Action.DENY:
            logger.warning("flow %s: %s, but the policy in force refuses it: %s", flow.id, answer, now.reason)
            refuse(flow, overruled(allow, answer, now))
            return
        # The answer is masked as the policy in force says, not as the one the request was held under.
        set_decision(flow, allow.but(mask_profile=now.mask_profile) if now.mask_profile else allow)

    def judged_now(self, approval_id: str) -> Decision | None:
        """What the policy in force decides of the request an approval holds (None: not held here)."""
        flow = self._flows.get(approval_id)
        return None if flow is None else decision_in_force(self.policies, flow)

    async def _open(self, flow: http.HTTPFlow, decision: Decision, settings: ApprovalSettings) -> ApprovalRequest | None:
        r = flow.request
        held = await self.approvals.open_request(
            settings=settings, principal=decision.principal or {}, operation=decision.operation,
            method=r.method, url=redact_url(r.url), digest=request_digest(r.method, r.url, r.raw_content or b""),
            body_size=len(r.raw_content or b""), body_preview=body_preview(r), flow_id=flow.id,
        )
        text = notification_text(held, self.api_url())
        logger.warning("flow %s: approval %s requested: %s", flow.id, held.id, text)
        if self.audit_log is not None:
            try:
                self.audit_log.append({
                    "flow_id": flow.id, "principal": decision.principal, "method": r.method,
                    "url": r.pretty_url, "decision": str(Action.APPROVE), "rule": decision.rule_id,
                    "stage": str(Stage.POLICY), "reason": f"approval {held.id} requested; held until "
                    f"{iso(held.expires_at)}", "status": 0, "event": "approval_requested",
                    "operation": decision.operation, "approval": held.outcome() | {"digest": held.digest},
                })
            except AuditWriteError as e:
                # Nobody may act on a request the trail does not show was asked.
                self.health.fail("audit", str(e))
                await self.approvals.cancel_async(held.id, "the gateway could not write the audit trail")
                refuse(flow, Decision.deny(
                    Stage.GUARD, 503, "ServiceUnavailable",
                    "the gateway could not write the audit trail, so it refused the request", check="audit",
                    rule_id=decision.rule_id, operation=decision.operation, principal=decision.principal))
                return None
        url = webhook_url(self.policies.current)
        if url and self.notify is not None:
            # What a chat may see: what is asked and by whom, never the body (it stays with the gateway).
            approval = {k: v for k, v in held.to_dict().items() if k != "body_preview"}
            payload = {"text": text, "nhi_gateway": {"approval": approval, "api": self.api_url() or None}}
            task = asyncio.ensure_future(self._send(url, payload, held.id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return held

    async def _send(self, url: str, payload: dict, approval_id: str) -> None:
        """Tell approvers in their chat; a webhook that fails is logged, never waited for."""
        # Only the host is logged: Slack and Teams webhook URLs carry their secret in the path.
        host = urlsplit(url).netloc
        try:
            status, _ = await self.notify(url, payload)
        except Exception as e:  # noqa: BLE001 - a notification must never fail a request
            logger.error("approval %s: webhook to %s failed: %s: %s", approval_id, host, type(e).__name__,
                         scrub_text(str(e))[:200])
            return
        if 200 <= status < 300:
            logger.info("approval %s: webhook to %s notified (%d)", approval_id, host, status)
        else:
            logger.error("approval %s: webhook to %s answered %d", approval_id, host, status)

    def client_disconnected(self, client: connection.Client) -> None:
        try:
            for approval_id in self._held.pop(client.id, ()):
                self._cancel(approval_id, "the client disconnected while the request was held")
        except Exception as e:  # noqa: BLE001 - the held hook then times out, which also refuses
            logger.error("cancelling the approvals of client %s failed: %r", client.id, e)

    def request_cancelled(self, flow: http.HTTPFlow, why: str) -> None:
        """The client gave up this one request (an HTTP/2 stream reset) while it was held: as for
        a disconnect, nobody waits for it any more, so nobody may approve it."""
        approval_id = self._held_flows.get(flow.id)
        if approval_id is not None:
            self._cancel(approval_id, why)

    def _cancel(self, approval_id: str, why: str) -> None:
        def cancelled(final) -> None:
            if final is not None:
                logger.info("approval %s cancelled: %s", approval_id, why)

        self.approvals.cancel_soon(approval_id, why, then=cancelled)

    def done(self) -> None:
        for task in self._tasks:
            task.cancel()
