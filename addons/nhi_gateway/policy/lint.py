"""What ``nhi-gateway policy lint`` finds beyond what the loader refuses.

- :func:`policy_warnings`: rules that are legal but never decide (shadowed by another), or whose
  schedule has ended, and approve rules whose approvers cannot sign in.

- :func:`all_errors`: the loader stops at the first mistake, as the gateway must; a person fixing a
  file wants every mistake at once. After a first error, the sections are read without the rules
  (a broken section stood in for by a valid stub on its own lines, so the next one is read too),
  then each rule on its own (the other rules' lines blanked, so every line and
  column stays where it is in the file), and the errors are reported, with duplicate rule ids, in
  file order. Against a stub, a rule's references to the sections (hosts, tenants, mask profiles)
  are not judged: they wait until the sections load.
- :func:`broad_rules`: an ``allow`` rule that lets every verified caller do anything on a host
  (``methods: ["*"]``, ``paths: ["/**"]``, no ``when``) is legal, and almost never meant.
- :class:`LintEnvironment`: a policy whose masks make pseudonyms needs the key to load; checking
  it must not need the deployment's secret, so a missing key is stood in for, and said.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from nhi_gateway.policy.decision import Action
from nhi_gateway.policy.loader import PolicyError, parse_policy
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
            if a.report_only and b.action is not a.action:
                continue  # a rule that only reports takes nothing from a rule of another action
            found = _shadowing(a, b, a_first=i < j)
            if found:
                best = (rank[a.action], i, found)
        if best is not None:
            message, hint = best[2]
            out.append(PolicyWarning(b.line, b.column, message, hint))
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


# The hints follow the documented precedence (deny > approve > allow; within one action, the first
# in file order): moving a rule helps only where file order decides, between rules of one action.
_ORDER_HINT = ("narrow or remove one of the two rules; between rules of the same action the first in "
               "file order decides, so moving '{b}' above '{a}' also makes it decide")
_PRECEDENCE_HINT = ("{a_action} wins over {b_action} wherever the rules are in the file, so reordering "
                    "changes nothing: narrow '{a}' (its when or operations) or remove '{b}'")


def _shadowing(a: Rule, b: Rule, *, a_first: bool) -> tuple[str, str] | None:
    where = f"rule '{a.id}' (line {a.line})"
    precedence = _PRECEDENCE_HINT.format(a=a.id, b=b.id, a_action=a.action, b_action=b.action)
    if a.action is Action.DENY and b.action is not Action.DENY:
        return (f"rule '{b.id}' never applies: deny {where} matches every request it matches, and deny wins",
                precedence)
    if a.action is Action.APPROVE and b.action is Action.ALLOW:
        return (f"rule '{b.id}' never allows: approve {where} matches every request it matches, and "
                "approve wins over allow", precedence)
    if a.action is b.action and a_first:
        verb = "is never reported" if b.action is Action.DENY else "never decides"
        return (f"rule '{b.id}' {verb}: the earlier {a.action} {where} matches every request it matches",
                _ORDER_HINT.format(a=a.id, b=b.id))
    return None


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


MAX_RULE_ERRORS = 200  # a file of thousands of broken rules needs no thousand lines more


class LintEnvironment(Mapping):
    """The process environment, with a placeholder for every pseudonym key it lacks; ``missing``
    names the variables that were stood in for."""

    PLACEHOLDER = "placeholder-key-for-policy-checks-only"

    def __init__(self, real: Mapping[str, str] | None = None) -> None:
        self.real = os.environ if real is None else real
        self.missing: list[str] = []

    def __getitem__(self, name: str) -> str:
        value = self.real.get(name)
        if value:
            return value
        if name not in self.missing:
            self.missing.append(name)
        return self.PLACEHOLDER

    def get(self, name, default=None):
        return self[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.real)

    def __len__(self) -> int:
        return len(self.real)


def broad_rules(policy: Policy) -> list[PolicyWarning]:
    """Allow rules that let every verified caller do everything on a host."""
    out = []
    everyone = PrincipalMatch()
    for rule in policy.rules:
        if rule.action is not Action.ALLOW or rule.when != everyone or rule.schedule is not None:
            continue
        for om in rule.operations:
            if ANY_METHOD in om.methods and any(p.segments == ("**",) for p in om.paths) and (
                    rule.limits_for(om) is None):
                out.append(PolicyWarning(
                    rule.line, rule.column,
                    f"rule '{rule.id}' allows every request to {om.host} for every verified caller",
                    "name who it is for (when: app_ids, object_ids, groups, ...) and what they need "
                    "(methods, paths); 'nhi-gateway policy suggest' writes that from recorded traffic",
                ))
                break
    return out


def report_warnings(policy: Policy) -> list[PolicyWarning]:
    """A policy in report mode forwards what no rule allows, masked by the default profile only."""
    if policy.report_default and policy.default_profile is None:
        return [PolicyWarning(1, 1, "mode: report forwards requests no rule allows, and with no "
                              "masking.default_profile their answers are not masked",
                              "set masking.default_profile, or report rule by rule instead")]
    return []


def all_errors(path: str | Path, environ: Mapping[str, str] | None = None) -> list[PolicyError]:
    """Every error of the policy file: [] when it loads."""
    source = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError):
        from nhi_gateway.policy.loader import load_policy

        try:
            load_policy(path, environ=environ)
        except PolicyError as e:
            return [e]
        return []
    try:
        parse_policy(text, source, environ=environ)
        return []
    except PolicyError as e:
        first = e
    spans = _rule_spans(text)
    sections = _section_spans(text)
    if spans is None or sections is None:
        return [first]  # not YAML, or rules that share lines: the first error is all there is to say
    lines = text.splitlines(keepends=True)
    errors: dict[tuple[int, int, str], PolicyError] = {}
    # The sections outside the rules, with the rules blanked: a broken section is stood in for by
    # a valid stub on its own lines (positions stay), and the next one is read.
    section_errors, sections_text = _section_errors(_blank(lines, spans, keep=None), sections, source, environ)
    errors.update({(e.line, e.column, e.message): e for e in section_errors})
    # Each rule on its own. Against stubs (when a section is broken), only what a rule says of
    # itself counts: what it says of the sections it names (hosts, tenants, profiles) waits.
    base = sections_text.splitlines(keepends=True)
    rule_lines = [line if any(a <= n < b for a, b in spans) else base[n] for n, line in enumerate(lines)]
    for i in range(min(len(spans), MAX_RULE_ERRORS)):
        try:
            parse_policy(_blank(rule_lines, spans, keep=i), source, environ=environ)
        except PolicyError as e:
            if section_errors and any(x in e.message for x in _CROSS_REFERENCES):
                continue
            errors.setdefault((e.line, e.column, e.message), e)
    errors.update({(e.line, e.column, e.message): e for e in _duplicate_ids(text, source)})
    if (first.line, first.column, first.message) not in errors:
        errors[(first.line, first.column, first.message)] = first
    return [errors[k] for k in sorted(errors)]


# Valid stand-ins for a broken required section, one line each (the others are left out).
_STUBS = {
    "version": "version: 1\n",
    "identity": 'identity: {tenants: ["00000000-0000-0000-0000-000000000000"], '
                'bearer: {audiences: [stub], issuers: ["https://stub.invalid/{tenantid}"]}, '
                'proxy: {audiences: [stub], issuers: ["https://stub.invalid/{tenantid}"]}}\n',
    "upstreams": "upstreams: []\n",
}


_CROSS_REFERENCES = ("is not listed under upstreams", "is not in identity.tenants", "unknown mask profile")


def _section_errors(text: str, sections: dict[str, tuple[int, int]], source: str,
                    environ: Mapping[str, str] | None) -> tuple[list[PolicyError], str]:
    """The errors of the sections (rules blanked), and the text with each broken one stubbed."""
    found: list[PolicyError] = []
    lines = text.splitlines(keepends=True)
    stubbed: set[str] = set()
    for _ in range(len(sections) + 1):
        try:
            parse_policy("".join(lines), source, environ=environ)
            return found, "".join(lines)
        except PolicyError as e:
            if e.line and any(f.line == e.line and f.message == e.message for f in found):
                return found, "".join(lines)
            key = next((k for k, (start, end) in sections.items() if start <= e.line - 1 < end), None)
            if key is None or key in stubbed or key == "rules":
                found.append(e)  # nothing more to stand in for: this one is the last
                return found, "".join(lines)
            found.append(e)
            stubbed.add(key)
            start, end = sections[key]
            for n in range(start, min(end, len(lines))):
                lines[n] = "\n"
            if key in _STUBS and start < len(lines):
                lines[start] = _STUBS[key]
    return found, "".join(lines)


def _section_spans(text: str) -> dict[str, tuple[int, int]] | None:
    """0-based [start, end) line ranges of each top-level key, or None when it is not YAML."""
    from ruamel.yaml import YAML

    try:
        doc = YAML(typ="rt").load(text)
        if not isinstance(doc, dict):
            return None
        starts = sorted((doc.lc.key(k)[0], str(k)) for k in doc)
    except Exception:  # noqa: BLE001 - any reading problem: fall back to the loader's one error
        return None
    total = len(text.splitlines())
    return {k: (line, starts[i + 1][0] if i + 1 < len(starts) else total) for i, (line, k) in enumerate(starts)}


def _rule_spans(text: str) -> list[tuple[int, int]] | None:
    """0-based [start, end) line ranges of each item under ``rules`` ([] without rules), or None
    when they cannot be told apart by lines."""
    from ruamel.yaml import YAML

    try:
        doc = YAML(typ="rt").load(text)
        if not isinstance(doc, dict):
            return None
        rules = doc.get("rules")
        if not isinstance(rules, list) or not rules:
            return []
        starts = [rules.lc.item(i)[0] for i in range(len(rules))]
        rules_line = doc.lc.key("rules")[0]
        after = [doc.lc.key(k)[0] for k in doc if doc.lc.key(k)[0] > rules_line]
    except Exception:  # noqa: BLE001 - any reading problem: fall back to the loader's one error
        return None
    end = min(after) if after else len(text.splitlines())
    if starts[0] <= rules_line or len(set(starts)) != len(starts):
        return None  # flow-style rules ([{...}, {...}]) share lines: blanking cannot split them
    return [(s, starts[i + 1] if i + 1 < len(starts) else end) for i, s in enumerate(starts)]


def _blank(lines: list[str], spans: list[tuple[int, int]], keep: int | None) -> str:
    out = list(lines)
    for i, (start, end) in enumerate(spans):
        if i == keep:
            continue
        for n in range(start, min(end, len(out))):
            out[n] = "\n"
    return "".join(out)


def _duplicate_ids(text: str, source: str) -> list[PolicyError]:
    from ruamel.yaml import YAML

    doc = YAML(typ="rt").load(text)
    seen: dict[str, int] = {}
    out = []
    for item in doc.get("rules") or []:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        line, col = item.lc.value("id") if hasattr(item, "lc") else (0, 0)
        rid = item["id"]
        if rid in seen:
            out.append(PolicyError(source, line + 1, col + 1, f"duplicate rule id '{rid}'",
                                   f"the first rule with this id is at line {seen[rid]}"))
        else:
            seen[rid] = line + 1
    return out
