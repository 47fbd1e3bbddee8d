"""What identities were seen doing: recorded flows and audit lines read back as operations.

``policy suggest`` and ``permissions`` learn from traffic the gateway has already decided. Both
read the same two sources, and both must see the same thing the rules saw: the canonical
:class:`~nhi_gateway.policy.operation.Operation`, the verified principal, and what the gateway
decided. This module turns a recorded flow (``metadata["nhi"]``) or an audit line into one
:class:`Observation`, and says why it skips the rest:

- requests refused before the rules (identity, unreadable targets, the gateway's own guard or
  errors): nothing about them says what the identity needs;
- calls to the gateway's approval API: people deciding, not the identity's own traffic;
- the outer ``POST /$batch``: it needs no rule of its own; its inner requests are recorded (and
  audited) one by one, and those are what is observed.

No mitmproxy import: a flow is read through the few attributes every recorded flow has.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from nhi_gateway.identity.principal import Principal
from nhi_gateway.policy.batch import names_batch
from nhi_gateway.policy.decision import DECISION_KEY, Action, Decision, Stage
from nhi_gateway.policy.operation import Operation, OperationError

APPROVALS_API_HOST = "approvals.nhi-gateway.invalid"  # the approval API's reverse-mode target
_LABEL_OID = re.compile(r"\(([0-9a-fA-F-]{36})\)\s*$")


@dataclass(frozen=True)
class Observation:
    """One request the gateway decided, as the rules saw it."""

    at: datetime
    principal: Principal | None  # None: anonymous (the token endpoint)
    op: Operation
    action: Action  # ALLOW (also when a person approved it) or DENY
    rule: str = ""
    stage: str = ""
    approved_by: str = ""  # object id of the person who approved it, when one did
    mask_profile: str | None = None
    source: str = ""

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW

    @property
    def identity_key(self) -> str:
        """Rules are suggested per application: its app id (``anonymous`` for token requests)."""
        return self.principal.app_id.lower() if self.principal else "anonymous"


@dataclass(frozen=True)
class ObservationFilter:
    """``--principal`` (display name, app id or object id; ``*`` and ``?`` glob), ``--since``
    (inclusive), ``--until`` (exclusive), and whether refused requests count."""

    principal: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    include_denied: bool = False

    def keeps(self, o: Observation) -> bool:
        if not o.allowed and not self.include_denied:
            return False
        if self.since is not None and o.at < self.since:
            return False
        if self.until is not None and o.at >= self.until:
            return False
        if self.principal is not None:
            p = o.principal
            names = [p.display_name, p.app_id, p.object_id] if p else ["anonymous"]
            wanted = self.principal.casefold()
            if not any(n and fnmatch.fnmatchcase(n.casefold(), wanted) for n in names):
                return False
        return True

    def apply(self, observations: Iterable[Observation]) -> list[Observation]:
        return [o for o in observations if self.keeps(o)]


def _skipped_stage(stage: Stage | str, check: str) -> bool:
    if stage in (Stage.IDENTITY, Stage.GUARD, Stage.ERROR):
        return True
    return stage == Stage.POLICY and check in ("operation", "upstream", "approvals_api", "batch")


def from_flow(flow, source: str = "") -> Observation | None:
    """The observation a recorded flow holds, or None when it says nothing about what its
    identity needs (see the module docstring)."""
    if getattr(flow, "type", "http") != "http":
        return None
    raw = flow.metadata.get(DECISION_KEY)
    if not isinstance(raw, dict):
        return None
    try:
        # Report mode: what the rules said (a forwarded "would deny" is a refusal), not the forwarding.
        decision = Decision.from_dict(raw).verdict()
        principal = Principal.from_dict(decision.principal) if decision.principal else None
    except (KeyError, ValueError, TypeError):
        return None
    if _skipped_stage(decision.stage, decision.check) or "approvals_api" in decision.extra:
        return None
    r = flow.request
    if r.host.lower().rstrip(".") == APPROVALS_API_HOST:
        return None
    try:
        op = Operation.from_request(r.method, r.scheme, r.host, r.port, r.path)
    except OperationError:
        return None
    if names_batch(op):
        return None
    approval = decision.extra.get("approval")
    approver = ""
    if isinstance(approval, dict) and decision.allowed:
        who = approval.get("approver")
        approver = str(who.get("object_id", "")) if isinstance(who, dict) else ""
        approver = approver or "unknown"
    action = Action.ALLOW if decision.allowed or decision.stage is Stage.MASKING else Action.DENY
    return Observation(
        at=datetime.fromtimestamp(r.timestamp_start, UTC), principal=principal, op=op, action=action,
        rule=decision.rule_id or "", stage=str(decision.stage), approved_by=approver,
        mask_profile=decision.mask_profile, source=source,
    )


def from_audit_record(rec: dict, source: str = "") -> Observation | None:
    """The observation an audit line holds (events such as ``approval_requested`` hold none)."""
    if not isinstance(rec, dict) or rec.get("event") or rec.get("method") == "CONNECT":
        return None
    decision, stage = rec.get("decision"), str(rec.get("stage") or "")
    if decision == "allow" and isinstance(rec.get("report"), dict):
        decision = "deny"  # report mode: forwarded, but the rules would have refused or held it
    if decision not in ("allow", "deny") or _skipped_stage(stage, str(rec.get("check") or "")):
        return None
    if str(rec.get("operation", "")).split(" ")[1:2] == ["approvals-api"]:
        return None
    try:
        at = datetime.fromisoformat(str(rec.get("time")).replace("Z", "+00:00"))
        principal = Principal.from_dict(rec["principal"]) if rec.get("principal") else None
        from urllib.parse import urlsplit

        parts = urlsplit(str(rec.get("url", "")))
        target = str(rec["url"])[len(f"{parts.scheme}://{parts.netloc}"):] or "/"
        op = Operation.from_request(str(rec.get("method")), parts.scheme, parts.hostname or "", parts.port, target)
    except (KeyError, ValueError, TypeError):  # OperationError is a ValueError
        return None
    if op.host == APPROVALS_API_HOST or names_batch(op):
        return None
    approver = ""
    if decision == "allow" and rec.get("approver"):
        m = _LABEL_OID.search(str(rec["approver"]))
        approver = m.group(1).lower() if m else "unknown"
    return Observation(
        at=at if at.tzinfo else at.replace(tzinfo=UTC), principal=principal, op=op,
        action=Action.ALLOW if decision == "allow" else Action.DENY, rule=str(rec.get("rule") or ""),
        stage=stage, approved_by=approver, source=source,
    )


def from_audit_records(records: Iterable[dict], source: str = "") -> Iterator[Observation]:
    for rec in records:
        o = from_audit_record(rec, source)
        if o is not None:
            yield o
