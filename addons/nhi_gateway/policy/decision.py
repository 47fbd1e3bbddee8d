"""The one decision that travels with a flow: written by the identity and policy steps, read by
masking, recording and audit. No addon recomputes what another already decided."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    # A person must approve first. Not an allow: every stage that lets only ALLOW through refuses
    # it, and the decision carries a refusal's status and code for whichever stage answers.
    APPROVE = "approve"


class Stage(StrEnum):
    """Which part of the gateway made (or refused) the decision."""

    REQUEST = "request"  # the request's shape and size, before identity (policy/admission.py)
    IDENTITY = "identity"
    POLICY = "policy"
    MASKING = "masking"
    GUARD = "guard"
    ERROR = "error"  # an exception inside the gateway: always a denial
    PROXY = "proxy"  # an answer mitmproxy itself wrote (unreadable framing, body over the limit)


@dataclass(frozen=True)
class Decision:
    action: Action
    stage: Stage
    reason: str
    status: int = 0  # the HTTP status of a refusal (0 while the request is allowed to go on)
    code: str = ""  # Graph-style error code of a refusal, e.g. Authorization_RequestDenied
    rule_id: str | None = None
    check: str = ""  # for identity refusals: the check that failed (signature, issuer, audience, ...)
    operation: str = ""  # "GET graph.microsoft.com /v1.0/users", for comments and audit
    principal: dict | None = None  # Principal.to_dict() of the caller, when known
    mask_profile: str | None = None  # the policy's mask profile for the response
    extra: dict = field(default_factory=dict)

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW

    @property
    def needs_approval(self) -> bool:
        return self.action is Action.APPROVE

    @classmethod
    def deny(cls, stage: Stage, status: int, code: str, reason: str, **kw) -> Decision:
        return cls(action=Action.DENY, stage=stage, status=status, code=code, reason=reason, **kw)

    def but(self, **changes) -> Decision:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON- and tnetstring-safe: flow.metadata is written to disk with the recording."""
        return {
            "action": str(self.action),
            "stage": str(self.stage),
            "reason": self.reason,
            "status": self.status,
            "code": self.code,
            "rule": self.rule_id or "",
            "check": self.check,
            "operation": self.operation,
            "principal": self.principal or {},
            "mask_profile": self.mask_profile or "",
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Decision:
        return cls(
            action=Action(d["action"]),
            stage=Stage(d["stage"]),
            reason=d.get("reason", ""),
            status=int(d.get("status", 0)),
            code=d.get("code", ""),
            rule_id=d.get("rule") or None,
            check=d.get("check", ""),
            operation=d.get("operation", ""),
            principal=d.get("principal") or None,
            mask_profile=d.get("mask_profile") or None,
            extra=dict(d.get("extra") or {}),
        )

    @property
    def reported(self) -> dict | None:
        """Report mode: ``{"would": "deny" | "hold", "rule", "reason"}`` of a request that was
        forwarded although a rule in ``mode: report`` would have refused or held it."""
        report = self.extra.get("report") if self.action is Action.ALLOW else None
        return report if isinstance(report, dict) else None

    def verdict(self) -> Decision:
        """What the rules said, report mode or not: a reported "would deny" is a denial, a "would
        hold" an approve. For comparing decisions (replay, suggest), never for enforcing."""
        report = self.reported
        if report is None:
            return self
        action = Action.APPROVE if report.get("would") == "hold" else Action.DENY
        return Decision(action, Stage.POLICY, str(report.get("reason", "")), status=403,
                        code="Authorization_RequestDenied", rule_id=report.get("rule") or None,
                        operation=self.operation, principal=self.principal, extra=self.extra)

    def comment(self) -> str:
        """One line for the recorded flow's comment, shown in mitmweb's flow list."""
        who = "anonymous"
        if self.principal:
            p = self.principal
            who = f"{p.get('display_name') or p.get('app_id')} ({p.get('object_id')})"
        rule = f" rule={self.rule_id}" if self.rule_id else ""
        return f"{self.action.upper()} {self.operation} by {who} [{self.stage}{rule}] {self.reason}"


def refusal_body(decision: Decision, request_id: str) -> bytes:
    """A Graph-style JSON error, so clients that already parse Graph errors show ours too."""
    inner = {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "request-id": request_id,
        "nhi-gateway": {
            "stage": str(decision.stage),
            "rule": decision.rule_id,
            "check": decision.check or None,
            "operation": decision.operation or None,
        },
    }
    body = {"error": {"code": decision.code, "message": decision.reason, "innerError": inner}}
    return json.dumps(body, indent=None).encode()


# --- The decision on a flow --------------------------------------------------------------------

DECISION_KEY = "nhi"  # flow.metadata[DECISION_KEY]: Decision.to_dict() of the flow
REFUSED_KEY = "nhi.refused"  # set when the gateway wrote the response itself


# The Decision behind flow.metadata[DECISION_KEY], kept on the flow object next to the dict it was
# read from or written as: every stage asks for it, and parsing the dict each time cost more than
# the policy decision itself. Only valid while that very dict is in metadata (tests and mitmproxy
# may replace it) with the same action: nothing in the gateway changes the dict in place, and
# should anything ever do, an allow turned into a deny is still seen as the deny.
_CACHED = "_nhi_decision"


def decision_of(flow) -> Decision | None:
    raw = flow.metadata.get(DECISION_KEY)
    if not isinstance(raw, dict):
        return None
    cached = flow.__dict__.get(_CACHED)
    if cached is not None and cached[0] is raw and cached[1] == raw.get("action"):
        return cached[2]
    decision = Decision.from_dict(raw)
    flow.__dict__[_CACHED] = (raw, raw.get("action"), decision)
    return decision


def set_decision(flow, decision: Decision) -> None:
    raw = decision.to_dict()
    flow.metadata[DECISION_KEY] = raw
    flow.__dict__[_CACHED] = (raw, raw["action"], decision)
