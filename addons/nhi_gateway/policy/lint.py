"""Findings for policy authors (``nhi-gateway policy lint``): rules that are legal but probably
not meant, such as a rule that can never decide or whose schedule has ended."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from nhi_gateway.policy.decision import Action
from nhi_gateway.policy.model import (
    ANY_METHOD,
    ApprovalsConfig,
    OperationMatch,
    PathPattern,
    Policy,
    PrincipalMatch,
    Rule,
)


@dataclass(frozen=True)
class PolicyWarning:
    """Something legal but probably not meant: a rule that can never decide, or has expired."""

    line: int
    column: int
    message: str
    hint: str = ""


def policy_warnings(policy: Policy, at: datetime | None = None) -> list[PolicyWarning]:
    """Rules that never decide (shadowed by another rule that always matches where they do) and
    rules whose schedule has ended. Sound, not complete: a warning is always true, but a rule
    covered only by several others together is not found."""
    at = at or datetime.now(UTC)
    out: list[PolicyWarning] = []
    rules = policy.rules
    buckets: dict[tuple[str, ...], list[int]] = {}
    for i, rule in enumerate(rules):
        for key in rule.when.index_keys():
            buckets.setdefault(key, []).append(i)
    rank = {Action.DENY: 0, Action.APPROVE: 1, Action.ALLOW: 2}
    for j, b in enumerate(rules):
        if b.schedule is not None and b.schedule.valid_until is not None and b.schedule.valid_until <= at:
            out.append(PolicyWarning(
                b.line, b.column,
                f"rule '{b.id}' expired at {b.schedule.valid_until.isoformat()} and never matches again",
                "remove it, or move schedule.valid_until",
            ))
            continue
        # The strongest reason first: a deny that always wins says more than an earlier allow.
        best: tuple[int, int, str] | None = None
        for i in _possible_coverers(b, buckets):
            a = rules[i]
            if i == j or (best is not None and (rank[a.action], i) >= best[:2]) or not _always_covers(a, b):
                continue
            found = _shadowing(a, b, a_first=i < j)
            if found:
                best = (rank[a.action], i, found)
        if best is not None:
            out.append(PolicyWarning(b.line, b.column, best[2], _SHADOW_HINT))
    out += _approver_warnings(policy)
    return out


def _approver_warnings(policy: Policy) -> list[PolicyWarning]:
    """Approve rules whose approvers cannot sign in, or sign in without a step-up."""
    section = policy.approvals or ApprovalsConfig()
    out = []
    for rule in policy.rules:
        if rule.action is not Action.APPROVE:
            continue
        if not section.client_id:
            out.append(PolicyWarning(
                rule.line, rule.column,
                f"rule '{rule.id}' holds requests, but nobody can approve them: approvals.client_id is not set, "
                "so the approval API refuses every token",
                "name the gateway's app registration: approvals: {client_id: <GUID>, app_id_uri: api://..., "
                "scope: Approvals.Decide}",
            ))
        elif not section.step_up:
            out.append(PolicyWarning(
                rule.line, rule.column,
                f"rule '{rule.id}' is approved with a plain sign-in: approvals sets neither require_auth_context "
                "nor require_mfa",
                "add approvals.require_auth_context: c1 (a Conditional Access authentication context that "
                "requires MFA) or, for v1 tokens, approvals.require_mfa: true",
            ))
    return out


_SHADOW_HINT = "narrow or remove one of the two rules, or reorder them if file order is what decides"


def _shadowing(a: Rule, b: Rule, *, a_first: bool) -> str:
    where = f"rule '{a.id}' (line {a.line})"
    if a.action is Action.DENY and b.action is not Action.DENY:
        return f"rule '{b.id}' never applies: deny {where} matches every request it matches, and deny wins"
    if a.action is Action.APPROVE and b.action is Action.ALLOW:
        return (f"rule '{b.id}' never allows: approve {where} matches every request it matches, and "
                "approve wins over allow")
    if a.action is b.action and a_first:
        verb = "is never reported" if b.action is Action.DENY else "never decides"
        return f"rule '{b.id}' {verb}: the earlier {a.action} {where} matches every request it matches"
    return ""


def _possible_coverers(b: Rule, buckets: dict[tuple[str, ...], list[int]]) -> set[int]:
    """Rules whose ``when`` could cover ``b``'s: those filed under "any", or under a value of a
    key that ``b`` also restricts (a covering rule's set of values must include all of ``b``'s)."""
    if b.when.anonymous:
        return set(buckets.get(("anonymous",), ()))
    found = set(buckets.get(("any",), ()))
    for name in ("object_ids", "app_ids", "managed_identities", "groups", "roles", "tenants"):
        values = getattr(b.when, name)
        if values:
            found.update(buckets.get((name, next(iter(values))), ()))
    return found


def _always_covers(a: Rule, b: Rule) -> bool:
    """``a`` matches every request ``b`` matches, at any time, whatever its OData options."""
    if a.schedule is not None or not _when_covers(a.when, b.when):
        return False
    for om_b in b.operations:
        for pattern in om_b.paths:
            if not any(
                a.limits_for(om_a) is None and _operation_covers(om_a, om_b) and
                any(_path_covers(p, pattern) for p in om_a.paths)
                for om_a in a.operations
            ):
                return False
    return True


def _when_covers(a: PrincipalMatch, b: PrincipalMatch) -> bool:
    if a.anonymous or b.anonymous:
        return a.anonymous and b.anonymous
    for name in ("app_ids", "object_ids", "groups", "roles", "tenants", "auth_methods", "token_sources",
                 "managed_identities"):
        av = getattr(a, name)
        if av is None:
            continue
        bv = getattr(b, name)
        if bv is None or not bv <= av:
            return False
    return a.app_only is None or a.app_only is b.app_only


def _operation_covers(a: OperationMatch, b: OperationMatch) -> bool:
    if a.host != b.host:
        return False
    return ANY_METHOD in a.methods or (ANY_METHOD not in b.methods and b.methods <= a.methods)


def _path_covers(a: PathPattern, b: PathPattern) -> bool:
    if not b.versions <= a.versions:
        return False
    sa, sb = a.segments, b.segments
    a_tail, b_tail = bool(sa) and sa[-1] == "**", bool(sb) and sb[-1] == "**"
    if a_tail:
        sa = sa[:-1]
    if b_tail:
        sb = sb[:-1]
    if a_tail:
        if len(sb) < len(sa):
            return False
    elif b_tail or len(sa) != len(sb):
        return False
    return all(x == "*" or x == y for x, y in zip(sa, sb, strict=False))
