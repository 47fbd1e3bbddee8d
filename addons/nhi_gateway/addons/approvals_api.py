"""The approval API, served by mitmproxy itself on a listener of its own.

The gateway adds a second proxy mode, ``reverse:http://approvals.nhi-gateway.invalid:1@HOST:PORT``
(loopback by default): mitmproxy accepts the connections, parses HTTP and writes the responses,
and this addon, first in the chain, answers every request that arrives on that listener in its
``request`` hook, so none is ever forwarded (the reverse target does not resolve, and the
identity stage refuses it as an unknown upstream should anything let one through). Requests on
the proxy listener are never answered here, whatever their Host or path.

Approvers authenticate with their own Entra token (``Authorization: Bearer``), verified with the
same verifier and the policy's trusted tenants and issuers, but for the approval API's own
audience: a person's delegated token for the gateway's app registration with the policy's scope
and step-up (:mod:`nhi_gateway.approvals.approver_token`). A Graph token, an app-only token or a
token for any other API is refused 401 naming the check, even for a listed approver. The
rule of each request names who may decide it (object ids or groups; groups come from the
token's ``groups`` claim, or from Graph when the token has none and the gateway has a Graph
credential). No identity may approve its own request.

    GET    /.well-known/oauth-protected-resource   how to sign in (RFC 9728; no token needed)
    GET    /approvals[?state=all]         requests the caller may decide (pending, or the latest)
    GET    /approvals/{id}
    POST   /approvals/{id}/approve        {"for": "30m", "reason": "..."}  ("for" is optional)
    POST   /approvals/{id}/deny           {"reason": "..."}
    GET    /grants[?state=all]            grants of rules the caller approves for
    DELETE /grants/{id}                   revoke

Answers are JSON; refusals use the gateway's Graph-style error body. Every call is a flow like
any other, audited and recorded (the token redacted); decisions and revocations also write an
audit line of their own.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from urllib.parse import urlsplit

import jwt
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from nhi_gateway.approvals.approver_token import ApproverRefused, ApproverRequirements, check_approver_token
from nhi_gateway.approvals.store import (
    ApprovalError,
    ApprovalRequest,
    Approvals,
    ApprovalSettings,
    ApprovalStoreError,
    Approver,
    Grant,
    approval_rules,
    check_named,
    check_not_self,
    parse_duration,
)
from nhi_gateway.recording.audit import AuditLog, AuditWriteError
from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.identity.groups import GroupLookupFailed, GroupResolver, needs_lookup
from nhi_gateway.policy.loader import PolicyStore
from nhi_gateway.policy.model import ApprovalsConfig
from nhi_gateway.identity.principal import Principal, TokenSource
from nhi_gateway.identity.tokens import KeysUnavailable, TokenRejected, TokenVerifier
from nhi_gateway.addons.failclosed import fail_closed, refuse, set_decision
from nhi_gateway.addons.guard import Health
from nhi_gateway.addons.identity import PolicyTrust, bearer_token

logger = logging.getLogger(__name__)

# The reverse target of the API listener: never contacted (.invalid does not resolve), it marks
# the flows this addon answers.
API_TARGET = "http://approvals.nhi-gateway.invalid:1"
MAX_BODY = 16 * 1024
METADATA_PATH = "/.well-known/oauth-protected-resource"

_APPROVAL = re.compile(r"/approvals/([A-Za-z0-9_-]{1,64})")
_ACTION = re.compile(r"/approvals/([A-Za-z0-9_-]{1,64})/(approve|deny)")
_GRANT = re.compile(r"/grants/([A-Za-z0-9_-]{1,64})")


def api_mode(host: str, port: int) -> str:
    """The mitmproxy mode spec of the API listener."""
    where = f"[{host}]" if ":" in host else host
    return f"reverse:{API_TARGET}@{where}:{port}"


def is_api_target(mode: object) -> bool:
    """Whether a mitmproxy proxy mode is the approval API's listener."""
    return isinstance(mode, ReverseMode) and mode.data == API_TARGET


def is_api_flow(flow: http.HTTPFlow) -> bool:
    return is_api_target(getattr(flow.client_conn, "proxy_mode", None))


def _claims(token: str) -> dict:
    """The payload of a token the verifier has already accepted."""
    claims = jwt.decode(token, options={"verify_signature": False})
    return claims if isinstance(claims, dict) else {}


def _audience(token: str) -> str:
    """The ``aud`` of a token refused for its audience, to say what it is for (display only)."""
    try:
        aud = _claims(token).get("aud")
    except jwt.PyJWTError:
        return "?"
    return aud[:100] if isinstance(aud, str) else "?"


def protected_resource_metadata(section: ApprovalsConfig | None, policy_issuers: list[str],
                                tenants: list[str]) -> dict:
    """What ``nhi-gateway approvals login`` needs to sign in (RFC 9728 protected resource
    metadata, plus the gateway's own members). All of it is public: no token is needed."""
    section = section or ApprovalsConfig()
    resource = section.app_id_uri or section.client_id
    v2 = [i for i in policy_issuers if i.endswith("/v2.0")]
    servers = [i.replace("{tenantid}", t) for i in v2 for t in tenants]
    return {
        "resource": resource,
        "authorization_servers": servers,
        "scopes_supported": [f"{resource.rstrip('/')}/{section.scope}"] if resource else [],
        "bearer_methods_supported": ["header"],
        "resource_name": "nhi-gateway approval API",
        "nhi_gateway": {
            "client_id": section.client_id, "app_id_uri": section.app_id_uri, "scope": section.scope,
            "login_client_id": section.login_client_id or section.client_id, "tenants": tenants,
            "require_auth_context": section.require_auth_context, "require_mfa": section.require_mfa,
        },
    }


def display_name(token: str, principal: Principal) -> str:
    """A person's name from their (already verified) token, for reading only: delegated tokens
    name the app in ``app_displayname`` and the person in ``name``/``upn``."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        claims = {}
    for key in ("name", "upn", "preferred_username", "unique_name"):
        value = claims.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()[:100]
    return principal.display_name


class _Refusal(Exception):
    def __init__(self, decision: Decision, challenge: str | None = None) -> None:
        super().__init__(decision.reason)
        self.decision = decision
        self.challenge = challenge  # a WWW-Authenticate value of its own (claims challenge)


def _refusal(e: ApprovalError, stage: Stage = Stage.POLICY) -> _Refusal:
    return _Refusal(Decision.deny(stage, e.status, e.code, e.message, check="approvals_api"))


def _bad_request(message: str) -> _Refusal:
    return _refusal(ApprovalError(400, "BadRequest", message))


class ApprovalsAPI:
    def __init__(self, policies: PolicyStore, approvals: Approvals, verifier: TokenVerifier, health: Health,
                 audit_log: AuditLog | None = None, groups: GroupResolver | None = None,
                 judged_now: Callable[[str], Decision | None] = lambda approval_id: None) -> None:
        self.policies = policies
        # What the policy in force decides of the request an approval holds (Approval.judged_now):
        # the approver's answer says when an approval cannot release it.
        self.judged_now = judged_now
        self.approvals = approvals
        self.verifier = verifier
        self.health = health
        self.audit_log = audit_log
        self.groups = groups
        self._trust = PolicyTrust(policies)

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if is_api_flow(flow) and not flow.response:
            refuse(flow, Decision.deny(Stage.POLICY, 405, "BadRequest",
                                       "the approval API is not a proxy", check="approvals_api"))

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not is_api_flow(flow):
            return
        path = urlsplit(flow.request.path).path.rstrip("/") or "/"
        operation = f"{flow.request.method} approvals-api {path[:200]}"
        caller: Principal | None = None
        if path == METADATA_PATH:
            self._answer_metadata(flow, operation)
            return
        try:
            caller, approver, token_groups = await self._caller(flow)
            status, body, what = await self._route(flow, path, caller, approver, token_groups)
        except ApprovalStoreError as e:
            logger.error("approval API: %s", e)
            r = _refusal(ApprovalError(503, "ServiceUnavailable", f"{e}; nothing was changed"), Stage.GUARD)
            refuse(flow, r.decision.but(operation=operation, principal=caller.to_dict() if caller else None))
            return
        except _Refusal as r:
            refuse(flow, r.decision.but(operation=operation,
                                        principal=caller.to_dict() if caller else r.decision.principal))
            if r.challenge and flow.response is not None:
                flow.response.headers["WWW-Authenticate"] = r.challenge
            return
        set_decision(flow, Decision(
            action=Action.ALLOW, stage=Stage.POLICY, reason=f"approval API: {what}", operation=operation,
            principal=caller.to_dict(), extra={"approvals_api": what},
        ))
        flow.response = http.Response.make(
            status, json.dumps(body, indent=2).encode() + b"\n",
            {"Content-Type": "application/json", "Cache-Control": "no-store"},
        )

    # -- who is asking ---------------------------------------------------------------------

    async def _caller(self, flow: http.HTTPFlow) -> tuple[Principal, Approver, tuple[str, ...] | None]:
        header = flow.request.headers.get("Authorization")
        token = bearer_token(header) if header else None
        if token is None:
            raise _refusal(ApprovalError(
                401, "InvalidAuthenticationToken",
                "the approval API needs your own token for it: Authorization: Bearer <token> "
                "(sign in with: nhi-gateway approvals login)"), Stage.IDENTITY)
        needs = ApproverRequirements.of(self.policies.current.approvals)
        principal = None
        try:
            needs.check_configured()
            try:
                principal = await self.verifier.verify(token, TokenSource.BEARER, needs.trust(self._trust.every_source()))
            except TokenRejected as e:
                if e.check != "audience":
                    raise
                raise ApproverRefused("approver_audience", (
                    f"the token is for {_audience(token)!r}, not for this gateway's approval API "
                    f"({' or '.join(sorted(needs.audiences))}): a Graph token, or one for any other API, "
                    "cannot approve; sign in with: nhi-gateway approvals login")) from None
            check_approver_token(_claims(token), principal, needs)
        except TokenRejected as e:
            logger.info("approval API: token refused (%s): %s", e.check, e.message)
            raise _Refusal(Decision.deny(Stage.IDENTITY, 401, "InvalidAuthenticationToken",
                                         f"token refused: {e.message}", check=e.check)) from None
        except ApproverRefused as e:
            logger.warning("approval API: token refused (%s): %s", e.check, e.message)
            # Who presented it, when the token itself was good: the audit says which identity tried.
            raise _Refusal(Decision.deny(Stage.IDENTITY, 401, "InvalidAuthenticationToken",
                                         f"token refused: {e.message}", check=e.check,
                                         principal=principal.to_dict() if principal else None),
                           e.claims_challenge) from None
        except KeysUnavailable:
            raise _Refusal(Decision.deny(
                Stage.IDENTITY, 503, "ServiceUnavailable",
                "the gateway cannot obtain the issuer's signing keys, so it cannot verify tokens; retry later",
                check="keys_unavailable")) from None
        approver = Approver(principal.tenant_id, principal.object_id, display_name(token, principal))
        return principal, approver, None if needs_lookup(principal) else principal.groups

    async def _groups(self, principal: Principal, known: tuple[str, ...] | None) -> tuple[str, ...]:
        """The caller's groups: from the token, else from Graph (only asked when a rule needs them)."""
        if known is not None:
            return known
        if self.groups is None:
            return principal.groups
        try:
            return (await self.groups.with_groups(principal)).groups
        except GroupLookupFailed as e:
            raise _refusal(ApprovalError(
                503, "ServiceUnavailable",
                f"the decision depends on your group membership, which the gateway could not resolve ({e})"),
                Stage.IDENTITY) from None

    async def _named(self, settings: ApprovalSettings | None, rule_id: str, principal: Principal,
                     approver: Approver, known: tuple[str, ...] | None) -> None:
        groups: tuple[str, ...] = ()
        if settings is not None and settings.approvers.groups and approver.object_id.lower() not in settings.approvers.users:
            groups = await self._groups(principal, known)
        try:
            check_named(rule_id, settings, approver, groups)
        except ApprovalError as e:
            logger.warning("approval API: %s refused: %s", approver.label, e.message)
            raise _refusal(e) from None

    async def _rules_for(self, principal: Principal, approver: Approver,
                         known: tuple[str, ...] | None) -> dict[str, ApprovalSettings]:
        """The approve rules that name the caller; 403 when none does."""
        rules = approval_rules(self.policies.current)
        mine = {k: s for k, s in rules.items() if approver.object_id.lower() in s.approvers.users}
        if any(s.approvers.groups for k, s in rules.items() if k not in mine):
            groups = await self._groups(principal, known)
            mine |= {k: s for k, s in rules.items() if s.approvers.names(approver.object_id, groups)}
        if not mine:
            raise _refusal(ApprovalError(
                403, "Authorization_RequestDenied",
                f"{approver.label} is not named as an approver by any rule of the policy"))
        return mine

    # -- what is asked ---------------------------------------------------------------------

    async def _route(self, flow: http.HTTPFlow, path: str, principal: Principal, approver: Approver,
                     known: tuple[str, ...] | None) -> tuple[int, dict, str]:
        method = flow.request.method.upper()
        everything = flow.request.query.get("state", "") == "all"
        if path == "/approvals":
            self._method(method, "GET")
            rules = await self._rules_for(principal, approver, known)
            listed = await self.approvals.off_loop(self.approvals.store.requests, pending_only=not everything)
            requests = [r for r in listed if r.rule_id in rules]
            return 200, {"approvals": [self._view(r, approver) for r in requests]}, "list approvals"
        if m := _ACTION.fullmatch(path):
            self._method(method, "POST")
            return await self._decide(flow, m.group(1), m.group(2), principal, approver, known)
        if m := _APPROVAL.fullmatch(path):
            self._method(method, "GET")
            request = await self._request(m.group(1))
            await self._named(approval_rules(self.policies.current).get(request.rule_id), request.rule_id,
                              principal, approver, known)
            return 200, {"approval": self._view(request, approver)}, f"show {request.id}"
        if path == "/grants":
            self._method(method, "GET")
            rules = await self._rules_for(principal, approver, known)
            now = self.approvals.clock()
            listed = await self.approvals.off_loop(self.approvals.store.grants, now=now, active_only=not everything)
            grants = [g for g in listed if g.rule_id in rules]
            return 200, {"grants": [g.to_dict(now) for g in grants]}, "list grants"
        if m := _GRANT.fullmatch(path):
            self._method(method, "DELETE")
            return await self._revoke(m.group(1), principal, approver, known)
        raise _refusal(ApprovalError(
            404, "NotFound", f"no such endpoint {path!r}: use /approvals, /approvals/ID/approve, "
            "/approvals/ID/deny, /grants or /grants/ID"))

    def _answer_metadata(self, flow: http.HTTPFlow, operation: str) -> None:
        if flow.request.method.upper() != "GET":
            refuse(flow, Decision.deny(Stage.POLICY, 405, "BadRequest", "use GET here", check="approvals_api",
                                       operation=operation))
            return
        policy = self.policies.current
        # Approvers' tokens are judged with the issuers of every token source (PolicyTrust.every_source).
        issuers = [i.template for i in self._trust.every_source().issuers]
        body = protected_resource_metadata(policy.approvals, issuers,
                                           sorted(policy.identity.tenants))
        set_decision(flow, Decision(action=Action.ALLOW, stage=Stage.POLICY, reason="approval API: sign-in metadata",
                                    operation=operation, extra={"approvals_api": "metadata"}))
        flow.response = http.Response.make(200, json.dumps(body, indent=2).encode() + b"\n",
                                           {"Content-Type": "application/json", "Cache-Control": "no-store"})

    @staticmethod
    def _method(method: str, expected: str) -> None:
        if method != expected:
            raise _refusal(ApprovalError(405, "BadRequest", f"use {expected} here, not {method}"))

    async def _request(self, request_id: str) -> ApprovalRequest:
        request = await self.approvals.off_loop(self.approvals.store.get, request_id)
        if request is None:
            raise _refusal(ApprovalError(404, "NotFound", f"no approval request {request_id!r}"))
        return request

    @staticmethod
    def _view(request: ApprovalRequest, approver: Approver) -> dict:
        view = request.to_dict()
        if request.principal_key == approver.key:
            view["note"] = "your own request: another approver must decide it"
        return view

    @staticmethod
    def _body(flow: http.HTTPFlow) -> dict:
        raw = flow.request.raw_content or b""
        if not raw.strip():
            return {}
        if len(raw) > MAX_BODY or flow.request.headers.get("content-encoding", "identity") != "identity":
            raise _bad_request(f"the body must be plain JSON of at most {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            raise _bad_request('the body is not JSON: send e.g. {"reason": "ticket 123"}') from None
        if not isinstance(body, dict):
            raise _bad_request("the body must be a JSON object")
        unknown = set(body) - {"for", "reason"}
        if unknown:
            raise _bad_request(f"unknown member(s) {', '.join(sorted(unknown))}: use 'for' and 'reason'")
        if "reason" in body and not isinstance(body["reason"], str):
            raise _bad_request("'reason' must be a string")
        return body

    async def _decide(self, flow: http.HTTPFlow, request_id: str, action: str, principal: Principal,
                      approver: Approver, known: tuple[str, ...] | None) -> tuple[int, dict, str]:
        body = self._body(flow)
        reason = body.get("reason", "")
        seconds = None
        if action == "approve" and body.get("for") not in (None, ""):
            try:
                seconds = parse_duration(str(body["for"]))
            except ValueError as e:
                raise _bad_request(f"'for': {e}") from None
        elif "for" in body and body["for"] not in (None, ""):
            raise _bad_request("'for' applies to approve only")
        request = await self._request(request_id)
        if action == "approve":
            try:
                check_not_self(request, approver)  # whatever the policy says, and said first
            except ApprovalError as e:
                logger.warning("approval API: %s refused: %s", approver.label, e.message)
                raise _refusal(e) from None
        settings = approval_rules(self.policies.current).get(request.rule_id)
        await self._named(settings, request.rule_id, principal, approver, known)
        cap = settings.max_grant if settings is not None else 0
        grant: Grant | None = None
        try:
            # Check first, write the audit line, then act: nothing is decided that the trail lacks.
            if action == "approve":
                await self.approvals.off_loop(self.approvals.check_approve, request.id, approver, seconds, cap)
            else:
                await self.approvals.off_loop(self.approvals.pending, request.id)
            self._audit(request, "approved" if action == "approve" else "denied", approver, reason,
                        f" for {body['for']}" if seconds else "")
            if action == "approve":
                request, grant = await self.approvals.off_loop(
                    self.approvals.approve, request.id, approver, reason=reason, grant_seconds=seconds, max_grant=cap)
            else:
                request = await self.approvals.off_loop(self.approvals.deny, request.id, approver, reason=reason)
        except ApprovalError as e:
            logger.warning("approval API: %s could not %s %s: %s", approver.label, action, request_id, e.message)
            raise _refusal(e) from None
        logger.warning("approval %s %s by %s%s: %s", request.id, request.state, approver.label,
                       f" with grant {grant.id} until {grant.to_dict()['expires_at']}" if grant else "",
                       request.reason or "no reason given")
        answer = {"approval": self._view(request, approver), "grant": grant.to_dict() if grant else None}
        if action == "approve":
            answer["release"] = self._release(request.id)
        return 200, answer, f"{request.state} {request.id}"

    def _release(self, approval_id: str) -> dict | None:
        """Whether the approved request goes on: the policy in force judges it again at release,
        and a deny added since it was held wins over the approval."""
        now = self.judged_now(approval_id)
        if now is None:
            return None  # not held by this gateway (any more): nothing to release here
        if now.action is Action.DENY:
            note = (f"the request was refused at release: the policy in force denies it ({now.reason}); "
                    "no approval or grant covers what the policy denies")
            logger.warning("approval %s: %s", approval_id, note)
            return {"refused": True, "rule": now.rule_id, "reason": now.reason, "note": note}
        return {"refused": False, "rule": now.rule_id, "reason": now.reason}

    async def _revoke(self, grant_id: str, principal: Principal, approver: Approver,
                      known: tuple[str, ...] | None) -> tuple[int, dict, str]:
        grant = await self.approvals.off_loop(self.approvals.store.grant, grant_id)
        if grant is None:
            raise _refusal(ApprovalError(404, "NotFound", f"no grant {grant_id!r}"))
        settings = approval_rules(self.policies.current).get(grant.rule_id)
        if settings is None:
            await self._rules_for(principal, approver, known)  # the rule is gone: any approver may revoke
        else:
            await self._named(settings, grant.rule_id, principal, approver, known)
        now = self.approvals.clock()
        if not grant.active(now):
            raise _refusal(ApprovalError(409, "Conflict", f"grant {grant.id} is already {grant.state(now)}"))
        self._audit_grant(grant, approver)
        try:
            grant = await self.approvals.off_loop(self.approvals.revoke, grant.id, approver)
        except ApprovalError as e:
            raise _refusal(e) from None
        logger.warning("grant %s (%s, %s) revoked by %s", grant.id, grant.principal.get("display_name"),
                       grant.operation, approver.label)
        return 200, {"grant": grant.to_dict(now)}, f"revoked {grant.id}"

    # -- the audit trail -------------------------------------------------------------------

    def _append(self, record: dict) -> None:
        if self.audit_log is None:
            return
        try:
            self.audit_log.append(record)
        except AuditWriteError as e:
            self.health.fail("audit", str(e))
            raise _Refusal(Decision.deny(
                Stage.GUARD, 503, "ServiceUnavailable",
                "the gateway could not write the audit trail, so nothing was decided; retry later",
                check="audit")) from None

    def _audit(self, request: ApprovalRequest, verdict: str, approver: Approver, reason: str, extra: str) -> None:
        self._append({
            "flow_id": request.flow_id, "principal": request.principal, "method": request.method,
            "url": request.url, "decision": verdict, "rule": request.rule_id, "stage": str(Stage.POLICY),
            "reason": f"approval {request.id} {verdict}{extra} by {approver.label}: {reason or 'no reason given'}",
            "status": 0, "event": f"approval_{verdict}", "operation": request.operation,
            "approver": approver.label, "approval": {"id": request.id, "approver": approver.to_dict()},
        })

    def _audit_grant(self, grant: Grant, approver: Approver) -> None:
        self._append({
            "flow_id": None, "principal": grant.principal, "method": None, "url": None, "decision": "revoked",
            "rule": grant.rule_id, "stage": str(Stage.POLICY),
            "reason": f"grant {grant.id} of approval {grant.approval_id} revoked by {approver.label}",
            "status": 0, "event": "grant_revoked", "operation": grant.operation, "approver": approver.label,
            "approval": {"id": grant.approval_id, "grant_id": grant.id, "approver": approver.to_dict()},
        })
