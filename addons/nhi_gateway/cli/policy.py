"""``nhi-gateway policy lint|explain|replay|suggest``: the policy engine, used exactly as the gateway uses it.

None of them needs the pseudonym key a policy's masks name: a missing key is stood in for (and
lint says so); only the gateway itself refuses to load without it.

lint FILE...
    Loads each file as the gateway would. Valid: one summary line per file, exit 0. Invalid: every
    ``file:line:column: message`` and its hint, in one run (:mod:`nhi_gateway.policy.lint`), exit 1.
    Rules that can never decide (shadowed by another rule, with a hint that follows the
    precedence), expired rules and allow rules for everything and everyone are warnings: they do
    not change the exit code unless ``--strict``. Rules that only report (``mode: report``) are
    listed.

explain FILE --as PRINCIPAL METHOD URL [--at TIME] [--body FILE]
    Prints the decision the gateway would take, the rule that made it and what every other rule
    naming this caller and operation made of the request. PRINCIPAL is ``anonymous``, an inline
    spec ``app=<appid>,oid=<oid>,tenant=<tid>,groups=g1;g2,roles=r1;r2,auth=certificate,
    sources=proxy;bearer,mi=<xms_mirid>,app_only=false``, a JSON file (a recorded principal, or token
    claims), or a JWT, which is decoded WITHOUT verification, for explaining only. A ``$batch`` is
    judged from its body (``--body``), every inner request as if sent alone, as the gateway does.
    Exit status: 0 allow, 1 deny, 3 approve (a person must approve first), 2 usage or input errors.

replay --policy NEW RECORDING...
    Re-decides every recorded flow under NEW, at the time it was recorded, and lists each flow whose
    decision would change (old -> new, rule ids); a ``$batch`` is judged again from its recorded
    body, every inner request as if sent alone. What the rules said is compared: a request a person
    approved was "approve", one forwarded in report mode "would deny". Flows refused before the
    rules (identity failures, unreadable requests) and calls to the approval API are listed as
    skipped, not as changes. Exit status: 0 nothing changes, 1 something would, 2 usage or input
    errors. RECORDING is a ``.mitm`` file or a directory of them (the gateway's ``--recordings``
    directory).

suggest [--base POLICY] (RECORDING... | --audit FILE) [-o FILE]
    Writes a least-privilege policy from what identities were seen doing
    (:mod:`nhi_gateway.policy.suggest`): one rule per identity, keys as ``{id}``, the methods seen,
    counts and first/last seen. ``--principal``, ``--since``, ``--until`` narrow what is read;
    ``--include-denied`` also allows what was refused; ``--widen`` allows whole collections.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.policy.operation import Operation, OperationError
from nhi_gateway.policy.presented import decider_for
from nhi_gateway.policy.lint import PolicyWarning, policy_warnings
from nhi_gateway.policy.loader import PolicyError, load_policy
from nhi_gateway.policy.model import REFUSAL_CODE, REFUSAL_STATUS, Outcome, Policy
from nhi_gateway.identity.principal import AuthMethod, Principal, TokenSource
from nhi_gateway.policy.observed import APPROVALS_API_HOST

EXIT_ALLOW, EXIT_DENY, EXIT_USAGE, EXIT_APPROVE = 0, 1, 2, 3
EXIT_UNCHANGED, EXIT_CHANGED = 0, 1
ZERO_GUID = "00000000-0000-0000-0000-000000000000"
UNVERIFIED = ("UNVERIFIED: decoded for explain only; its signature, issuer, audience and lifetime "
              "were not checked")

_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class UsageError(Exception):
    """Bad input on the command line: printed, exit 2."""


def register(sub) -> None:
    p = sub.add_parser("policy", help="check, explain, regression-test and suggest policy files")
    cmds = p.add_subparsers(dest="policy_command", required=True)

    lint = cmds.add_parser("lint", help="check policy files as the gateway loads them")
    lint.add_argument("files", nargs="+", type=Path, metavar="FILE")
    lint.add_argument("--strict", action="store_true", help="warnings fail too (exit 1)")
    lint.set_defaults(handler=cmd_lint)

    explain = cmds.add_parser(
        "explain", help="the decision for one request, and the rules behind it",
        description="Exit status: 0 allow, 1 deny, 3 approve, 2 usage or input errors.",
    )
    explain.add_argument("file", type=Path, metavar="FILE")
    explain.add_argument(
        "--as", dest="principal", required=True, metavar="PRINCIPAL",
        help="anonymous | app=<id>,oid=<id>,tenant=<id>,groups=g1;g2,roles=r1;r2,auth=certificate,"
             "sources=bearer,mi=<xms_mirid>,app_only=true | FILE.json | a JWT (NOT verified)",
    )
    explain.add_argument("method", metavar="METHOD")
    explain.add_argument("url", metavar="URL", help="e.g. 'https://graph.microsoft.com/v1.0/users?$top=5'")
    explain.add_argument("--at", type=_instant, default=None, metavar="TIME",
                         help="decide at this ISO 8601 time (default: now), for rules with a schedule")
    explain.add_argument("--body", type=Path, metavar="FILE",
                         help="the request body: a $batch is then judged as the gateway judges it, "
                              "every inner request as if sent alone ('-' reads stdin)")
    explain.add_argument("--content-type", default="application/json", metavar="TYPE",
                         help="the body's Content-Type (default: application/json)")
    explain.set_defaults(handler=cmd_explain)

    replay = cmds.add_parser(
        "replay", help="re-decide recorded flows under another policy; exit 1 if any decision changes",
    )
    replay.add_argument("--policy", required=True, type=Path, metavar="NEW")
    replay.add_argument("recordings", nargs="+", type=Path, metavar="RECORDING",
                        help=".mitm files or directories of them")
    replay.add_argument("--now", action="store_true",
                        help="decide at the current time, not at each flow's recorded time")
    replay.add_argument("-v", "--verbose", action="store_true",
                        help="also list unchanged flows and flows decided by another rule to the same effect")
    replay.set_defaults(handler=cmd_replay)

    schema = cmds.add_parser(
        "schema", help="print the policy's JSON Schema (policies/policy.schema.json), generated from the loader's models",
    )
    schema.add_argument("-o", "--output", type=Path, metavar="FILE", help="write it to FILE instead")
    schema.set_defaults(handler=cmd_schema)

    suggest = cmds.add_parser(
        "suggest", help="write a least-privilege policy from recorded traffic or the audit trail",
        description="One rule per identity, allowing what it was seen doing and nothing more. "
                    "Check it with 'policy replay --policy SUGGESTED RECORDING...' before enforcing it.",
    )
    suggest.add_argument("recordings", nargs="*", type=Path, metavar="RECORDING",
                         help=".mitm files or directories of them (or give --audit)")
    suggest.add_argument("--audit", type=Path, metavar="FILE", help="read the audit trail instead of recordings")
    suggest.add_argument("--base", type=Path, metavar="POLICY",
                         help="keep this policy's identity, upstreams, masking, approvals and deny rules")
    suggest.add_argument("--principal", metavar="NAME", help="only this identity: display name, app id or object "
                         "id (* and ? match)")
    suggest.add_argument("--since", metavar="TIME", help="from this time (inclusive): 2026-11-28, "
                         "2026-11-28T09:30Z or a time ago (15m, 2h, 7d)")
    suggest.add_argument("--until", metavar="TIME", help="to this time (exclusive)")
    suggest.add_argument("--include-denied", action="store_true",
                         help="also allow what was refused (off: a refused request is never suggested)")
    suggest.add_argument("--widen", action="store_true",
                         help="allow whole collections (/v1.0/users/**) instead of the templates seen")
    suggest.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here instead of stdout")
    suggest.set_defaults(handler=cmd_suggest)


def _instant(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from e
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no offset: add Z or +01:00")
    return value.astimezone(UTC)


# --- schema ---------------------------------------------------------------------------------------


def cmd_schema(args, out: TextIO | None = None) -> int:
    """The schema editors use is generated from the models the loader validates with, so the two
    cannot drift apart; tests/unit/test_policy_schema.py fails when the committed file is stale."""
    from nhi_gateway.policy.shape import schema_text

    text = schema_text()
    if args.output is not None:
        args.output.write_text(text, encoding="utf-8")
    else:
        (out or sys.stdout).write(text)
    return 0


# --- lint -----------------------------------------------------------------------------------------


def _lint_environ(path: Path | None = None):
    """Checking a policy (lint, explain, replay, suggest's base) never needs the pseudonym key."""
    from nhi_gateway.policy.lint import LintEnvironment

    return LintEnvironment()


def cmd_lint(args, out: TextIO | None = None) -> int:
    from nhi_gateway.policy.lint import all_errors, broad_rules, report_warnings

    out = out or sys.stdout
    status = 0
    for path in args.files:
        environ = _lint_environ(path)
        errors = all_errors(path, environ)
        if errors:
            for e in errors:
                print(str(e), file=out)
            print(f"{path}: {_count(len(errors), 'error')}", file=out)
            status = 1
            continue
        policy = load_policy(path, environ=environ)
        found = (policy_warnings(policy) + unresolvable_object_warnings(policy) + broad_rules(policy)
                 + report_warnings(policy))
        warnings = sorted(found, key=lambda w: (w.line, w.column))
        for w in warnings:
            print(f"{path}:{w.line}:{w.column}: warning: {w.message}", file=out)
            if w.hint:
                print(f"  hint: {w.hint}", file=out)
        for name in environ.missing:
            print(f"{path}: note: {name} is not set here, so the pseudonym key was not checked (a placeholder "
                  f"stood in); the gateway needs it, at least 16 bytes, to load this policy", file=out)
        reporting = report_rules(policy)
        if reporting:
            print(f"{path}: note: {_count(len(reporting), 'rule')} only report{'s' * (len(reporting) == 1)} "
                  f"(mode: report), refusing and "
                  f"holding nothing: {', '.join(reporting)}", file=out)
        if policy.report_default:
            print(f"{path}: note: mode: report: a request no rule allows is forwarded and reported", file=out)
        if warnings and args.strict:
            status = 1
        counted = f", {_count(len(warnings), 'warning')}" if warnings else ""
        print(f"{path}: ok: {summary(policy)}{counted}", file=out)
    return status


def report_rules(policy: Policy) -> list[str]:
    """Ids of the rules that only report (mode: report)."""
    return [r.id for r in policy.rules if r.report_only]


def unresolvable_object_warnings(policy: Policy, environ=None) -> list[PolicyWarning]:
    """Rules that name objects by id, when this deployment has no Graph credential to learn which
    object an alternate key (appId, uniqueName, a UPN, directoryObjects) names: such requests are
    refused (503). The credential is read as ``nhi-gateway run`` reads it, from the environment."""
    from nhi_gateway.identity.groups import CredentialError, credential_from_settings
    from nhi_gateway.policy.objects import literal_object_rules

    try:
        configured = credential_from_settings(environ=os.environ if environ is None else environ) is not None
    except CredentialError:
        configured = False
    if configured:
        return []
    out, seen = [], set()
    for rule, pattern in literal_object_rules(policy):
        if rule.id in seen:
            continue
        seen.add(rule.id)
        out.append(PolicyWarning(
            rule.line, rule.column,
            f"rule '{rule.id}' names an object by id ({pattern}), and no Graph credential is configured: "
            "requests that name that object by an alternate key (appId, uniqueName, a UPN, "
            "/directoryObjects/{id}) cannot be resolved and are refused (503)",
            "configure the gateway's Graph credential (NHI_GRAPH_CLIENT_ID, NHI_GRAPH_TENANT_ID and "
            "NHI_GRAPH_CERTIFICATE), or name objects with {id} and narrow the rule by `when`"))
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def summary(policy: Policy) -> str:
    counts = {a: sum(r.action is a for r in policy.rules) for a in Action}
    return (
        f"{_count(len(policy.rules), 'rule')} ({counts[Action.ALLOW]} allow, {counts[Action.DENY]} deny, "
        f"{counts[Action.APPROVE]} approve), {_count(len(policy.upstreams), 'upstream')}, "
        f"{_count(len(policy.mask_profiles), 'mask profile')}"
    )


# --- explain --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExplainedPrincipal:
    principal: Principal | None
    unverified: bool = False  # read from a token nobody verified


SPEC_KEYS = ("app", "oid", "tenant", "groups", "roles", "auth", "sources", "mi", "app_only", "name")


def parse_principal(text: str, policy: Policy) -> ExplainedPrincipal:
    """``--as``: anonymous, an inline spec, a JSON file or a JWT (see the module docstring)."""
    text = text.strip()
    if text.lower() == "anonymous":
        return ExplainedPrincipal(None)
    if _JWT.fullmatch(text) and text.startswith("eyJ"):
        return ExplainedPrincipal(principal_from_unverified_token(text), unverified=True)
    path = Path(text)
    if "=" not in text and path.is_file():
        return _principal_from_file(path)
    if "=" in text:
        return ExplainedPrincipal(principal_from_spec(text, policy))
    raise UsageError(
        f"--as {text[:60]!r}: expected 'anonymous', app=...,oid=...,tenant=..., a JSON file or a JWT"
    )


def principal_from_spec(spec: str, policy: Policy) -> Principal:
    values: dict[str, str] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in SPEC_KEYS:
            raise UsageError(f"--as: cannot read {part.strip()!r}; keys: {', '.join(SPEC_KEYS)}")
        if key in values:
            raise UsageError(f"--as: {key} is given twice")
        values[key] = value.strip()

    def items(key: str) -> tuple[str, ...]:
        return tuple(v.strip() for v in values.get(key, "").split(";") if v.strip())

    tenant = values.get("tenant")
    if not tenant:
        if len(policy.identity.tenants) != 1:
            raise UsageError("--as: give tenant=<tenant id>: the policy accepts several tenants")
        tenant = next(iter(policy.identity.tenants))
    try:
        auth = AuthMethod(values.get("auth", "unknown").lower())
    except ValueError:
        raise UsageError(f"--as: auth must be one of {', '.join(a.value for a in AuthMethod)}") from None
    try:
        sources = tuple(TokenSource(s.lower()) for s in items("sources")) or (TokenSource.BEARER,)
    except ValueError:
        raise UsageError("--as: sources are proxy and/or bearer, e.g. sources=proxy;bearer") from None
    app_only_text = values.get("app_only", "true").lower()
    if app_only_text not in ("true", "false"):
        raise UsageError("--as: app_only is true or false")
    return Principal(
        tenant_id=tenant.lower(),
        object_id=values.get("oid", ZERO_GUID).lower(),
        app_id=values.get("app", ZERO_GUID).lower(),
        display_name=values.get("name", ""),
        roles=items("roles"),
        groups=tuple(g.lower() for g in items("groups")),
        auth_method=auth,
        app_only=app_only_text == "true",
        token_sources=sources,
        managed_identity=values.get("mi", ""),
    )


def principal_from_unverified_token(token: str) -> Principal:
    """The claims of a token read without checking anything: for explaining, never for deciding."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError) as e:
        raise UsageError(f"--as: the token's payload cannot be read: {e}") from None
    return _principal_from_claims(claims, "the token")


def _principal_from_claims(claims: object, what: str) -> Principal:
    from nhi_gateway.identity.tokens import TokenRejected, principal_from_claims

    if not isinstance(claims, dict):
        raise UsageError(f"--as: {what} holds no claims object")
    missing = [c for c in ("tid", "oid") if not isinstance(claims.get(c), str)]
    if missing:
        raise UsageError(f"--as: {what} has no {' or '.join(missing)} claim")
    try:
        return principal_from_claims({"exp": 0, **claims}, TokenSource.BEARER, str(claims.get("iss", "")))
    except TokenRejected as e:
        raise UsageError(f"--as: {what}: {e.message}") from None


def _principal_from_file(path: Path) -> ExplainedPrincipal:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--as {path}: cannot read it as JSON: {e}") from None
    if isinstance(data, dict) and "tenant_id" in data:
        try:
            return ExplainedPrincipal(Principal.from_dict(data))
        except ValueError as e:
            raise UsageError(f"--as {path}: {e}") from None
    return ExplainedPrincipal(_principal_from_claims(data, str(path)), unverified=True)


def operation_from_url(method: str, url: str) -> Operation:
    """Raises :class:`OperationError` for what the gateway would refuse before any rule."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UsageError(f"{url!r} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{url!r}: give a full URL such as https://graph.microsoft.com/v1.0/users")
    target = url[url.index(parts.netloc) + len(parts.netloc):] or "/"
    return Operation.from_request(method, parts.scheme, parts.hostname, port, target)


def gate_refusal(policy: Policy, op: Operation, scheme: str, who: ExplainedPrincipal) -> Decision | None:
    """The refusals the gateway makes before the rules, mirrored for explain."""
    upstream = policy.upstream(op.host)
    problem = ""
    if upstream is None:
        problem = f"host {op.host!r} is not an upstream named in the policy"
    elif scheme != "https":
        problem = f"plain HTTP to {op.host!r} is refused; use https"
    elif op.port != 443:
        problem = f"port {op.port} of {op.host!r} is not allowed; upstreams are reached on 443"
    if problem:
        return Decision.deny(Stage.POLICY, REFUSAL_STATUS, REFUSAL_CODE, problem, check="upstream",
                             operation=str(op))
    from nhi_gateway.addons.identity import TokenRequirement

    sources = set(who.principal.token_sources) if who.principal else set()
    unmet = TokenRequirement.unmet(str(upstream.token), sources)
    if unmet:
        return Decision.deny(Stage.IDENTITY, 401, "InvalidAuthenticationToken", f"{op.host}: {unmet}",
                             check="missing", operation=str(op))
    return None


def describe_principal(p: Principal | None) -> str:
    if p is None:
        return "anonymous (no token)"
    parts = [f"app={p.app_id}", f"oid={p.object_id}", f"tenant={p.tenant_id}", f"auth={p.auth_method}",
             f"sources={';'.join(p.token_sources) or '-'}", f"app_only={str(p.app_only).lower()}"]
    if p.groups:
        parts.append(f"groups={';'.join(p.groups)}")
    if p.roles:
        parts.append(f"roles={';'.join(p.roles)}")
    if p.managed_identity:
        parts.append(f"mi={p.managed_identity}")
    if p.display_name:
        parts.insert(0, f"name={p.display_name}")
    return " ".join(parts)


def cmd_explain(args, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        policy = load_policy(args.file, environ=_lint_environ(args.file))
    except PolicyError as e:
        print(str(e), file=err)
        return EXIT_USAGE
    try:
        who = parse_principal(args.principal, policy)
        try:
            op = operation_from_url(args.method, args.url)
        except OperationError as e:
            print(f"operation: {args.method.upper()} {args.url}", file=out)
            print("decision:  DENY before any rule (400 BadRequest)", file=out)
            print(f"reason:    the request target cannot be judged safely: {e}", file=out)
            return EXIT_DENY
    except UsageError as e:
        print(f"nhi-gateway policy explain: {e}", file=err)
        return EXIT_USAGE
    at = args.at or datetime.now(UTC)
    print(f"policy:    {policy.source}", file=out)
    print(f"principal: {describe_principal(who.principal)}", file=out)
    if who.unverified:
        print(f"           ({UNVERIFIED})", file=out)
    query = "&".join(f"{k}={v}" for k, v in op.query)
    print(f"operation: {op}" + (f"  ?{query}" if query else ""), file=out)
    print(f"time:      {at.isoformat()}", file=out)
    scheme = urlsplit(args.url).scheme
    gate = gate_refusal(policy, op, scheme, who)
    if gate is not None:
        print(f"decision:  DENY before any rule ({gate.stage} stage, {gate.status} {gate.code})", file=out)
        print(f"reason:    {gate.reason}", file=out)
        return EXIT_DENY
    from nhi_gateway.policy.batch import names_batch

    if names_batch(op):
        return _explain_batch(args, policy, who, op, at, out, err)

    from nhi_gateway.policy.objects import deciding_rules, object_key

    key = object_key(op)
    rules = deciding_rules(policy, who.principal, op, key) if key is not None else []
    if rules:
        # The gateway would first ask Graph which object this is; explain has no Graph to ask.
        print(f"object:    {key.describe()}: the gateway resolves it with its Graph credential because "
              f"rule(s) {', '.join(repr(r.id) for r in rules)} could decide it otherwise (and refuses 503 "
              "when it cannot); below: the decision for this spelling, before that", file=out)
    decision, outcomes = policy.explain(who.principal, op, at)
    rule = policy.rule(decision.rule_id) if decision.rule_id else None
    where = f" ({policy.source}:{rule.line}:{rule.column})" if rule else ""
    by = f" by rule '{decision.rule_id}'{where}" if rule and decision.action is not Action.DENY else ""
    if decision.action is Action.DENY and rule:
        by = f", rule '{decision.rule_id}'{where}"
    mask = f", mask profile {decision.mask_profile}" if decision.mask_profile else ""
    print(f"decision:  {decision.action.upper()}{by}{mask}", file=out)
    print(f"reason:    {decision.reason}", file=out)
    if rule is not None and rule.approval is not None and decision.action is Action.APPROVE:
        a = rule.approval
        print(f"approval:  users={';'.join(sorted(a.users)) or '-'} groups={';'.join(sorted(a.groups)) or '-'} "
              f"timeout={a.timeout_seconds}s max_grant={a.max_grant_seconds or 0}s", file=out)
    if outcomes:
        print("rules naming this caller and operation, in file order:", file=out)
        width = max(len(o.rule.id) for o in outcomes)
        for o in outcomes:
            mark = "->" if o.rule.id == decision.rule_id else "  "
            note = {
                Outcome.APPLIES: "applies",
                Outcome.NOT_IN_FORCE: "not in force (schedule: {})",
                Outcome.LIMITS_BROKEN: "does not apply: {}",
                Outcome.LIMITS_KEPT: "does not apply: the request keeps within its odata limits",
            }[o.outcome].format(o.detail)
            if o.outcome is Outcome.APPLIES and o.detail:
                note += f": {o.detail}"
            action = f"{o.rule.action}{' (reports only)' if o.rule.report_only else ''}"
            print(f"  {mark} {o.rule.id:<{width}}  {action:<7}  line {o.rule.line:<5} {note}", file=out)
    else:
        print("rules naming this caller and operation: none", file=out)
    return {Action.ALLOW: EXIT_ALLOW, Action.DENY: EXIT_DENY, Action.APPROVE: EXIT_APPROVE}[decision.action]


def _explain_batch(args, policy: Policy, who: ExplainedPrincipal, op: Operation, at: datetime,
                   out: TextIO, err: TextIO) -> int:
    """A ``$batch`` needs no rule of its own: it is judged from its body, as the gateway does."""
    from nhi_gateway.policy.batch import judge_batch

    if args.body is None:
        print("nhi-gateway policy explain: a $batch is judged by its inner requests: give its body with "
              "--body FILE", file=err)
        return EXIT_USAGE
    try:
        raw = sys.stdin.buffer.read() if str(args.body) == "-" else args.body.read_bytes()
    except OSError as e:
        print(f"nhi-gateway policy explain: {args.body}: {e.strerror or e}", file=err)
        return EXIT_USAGE
    decision = judge_batch(_DecidingAt(policy, at), who.principal, op, raw, args.content_type)
    inner = decision.extra.get("batch") or []
    verdict = "ALLOW" if decision.allowed else "DENY"
    status = "" if decision.allowed else f" ({decision.status} {decision.code})"
    print(f"decision:  {verdict}{status}: the batch goes to Graph only when every inner request is allowed",
          file=out)
    print(f"reason:    {decision.reason}", file=out)
    if inner:
        print("inner requests, each judged as if sent alone:", file=out)
        width = max(len(str(e.get("id", ""))) for e in inner)
        for e in inner:
            rule = f" rule '{e['rule']}'" if e.get("rule") else ""
            print(f"  {str(e.get('id', '')):<{width}}  {str(e.get('decision', '?')).upper():<7}  "
                  f"{e.get('operation') or (str(e.get('method', '')) + ' ' + str(e.get('url', '')))}{rule}: "
                  f"{e.get('reason', '')}", file=out)
    return EXIT_ALLOW if decision.allowed else EXIT_DENY


# --- replay ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replayed:
    """One recorded flow re-decided (or skipped, with why)."""

    flow_id: str
    source: str  # file
    operation: str
    who: str
    old: Decision | None = None
    new: Decision | None = None
    skipped: str = ""  # why the flow was not re-decided
    compare_mask: bool = True

    @property
    def changed(self) -> bool:
        if self.skipped or self.old is None or self.new is None:
            return False
        if self.old.action is not self.new.action:
            return True
        return self.compare_mask and self.new.allowed and self.old.mask_profile != self.new.mask_profile

    @property
    def other_rule(self) -> bool:
        return not self.skipped and not self.changed and self.old is not None and self.new is not None \
            and self.old.rule_id != self.new.rule_id


def recording_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.rglob("*.mitm"))
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{path}: no such file or directory")
    return files


def read_flows(path: Path) -> Iterator[object]:
    from mitmproxy import exceptions, io

    with open(path, "rb") as f:
        try:
            yield from io.FlowReader(f).stream()
        except exceptions.FlowReadException as e:
            # A gateway killed mid-write leaves a truncated last record: what came before counts.
            print(f"{path}: stopped reading: {e}", file=sys.stderr)


def replay_flow(flow, policy: Policy, source: str, at: datetime | None) -> Replayed:
    """Re-decide one recorded flow under ``policy``."""
    from nhi_gateway.policy.decision import DECISION_KEY

    r = flow.request
    what = f"{r.method} {r.host} {r.path[:120]}"
    raw = flow.metadata.get(DECISION_KEY)
    base = {"flow_id": flow.id, "source": source, "operation": what, "who": "?"}
    if not isinstance(raw, dict):
        return Replayed(**base, skipped="no decision was recorded")
    try:
        old = Decision.from_dict(raw)
    except (KeyError, ValueError, TypeError) as e:
        return Replayed(**base, skipped=f"the recorded decision cannot be read ({e!r})")
    # Report mode: compare what the rules said, not whether it was forwarded.
    old = old.verdict()
    try:
        principal = Principal.from_dict(old.principal) if old.principal else None
    except ValueError as e:
        return Replayed(**base, old=old, skipped=f"the recorded principal cannot be read ({e})")
    base["who"] = principal.label if principal else "anonymous"
    base["operation"] = old.operation or what
    if old.stage is Stage.IDENTITY:
        return Replayed(**base, old=old, skipped=f"refused at the identity stage ({old.check or old.code}) "
                        "before any rule")
    if old.check == "approvals_api" or "approvals_api" in old.extra or r.host.lower() == APPROVALS_API_HOST:
        return Replayed(**base, old=old, skipped="a call to the gateway's approval API: decided by its "
                        "approvers and their tokens, not by the rules")
    if old.stage in (Stage.GUARD, Stage.ERROR):
        return Replayed(**base, old=old, skipped=f"refused by the gateway's {old.stage} stage, not by the policy")
    if old.stage is Stage.POLICY and old.check == "operation":
        return Replayed(**base, old=old, skipped=f"refused before the rules ({old.check}): {old.reason}")
    compare_mask = True
    approval = old.extra.get("approval") if isinstance(old.extra, dict) else None
    if isinstance(approval, dict) and "state" in approval:
        # A person approved or refused it (or nobody answered): the rules' part was "approve".
        # Compare that, not what the person made of it, so an unchanged policy changes nothing.
        old = Decision(Action.APPROVE, Stage.POLICY, f"approval {approval.get('state')} "
                       f"({approval.get('id', '?')})", rule_id=old.rule_id, operation=old.operation,
                       principal=old.principal, mask_profile=old.mask_profile, extra=old.extra)
        compare_mask = False
    elif old.stage is Stage.MASKING:
        # The rules allowed it; the response was withheld afterwards. Compare the rules' part.
        old = Decision(Action.ALLOW, Stage.POLICY, "allowed, then withheld by masking", rule_id=old.rule_id,
                       operation=old.operation, principal=old.principal)
        compare_mask = False
    at = at or datetime.fromtimestamp(r.timestamp_start, UTC)
    try:
        op = Operation.from_request(r.method, r.scheme, r.host, r.port, r.path)
    except OperationError as e:
        return Replayed(**base, old=old, skipped=f"the recorded request cannot be judged ({e})")
    if policy.upstream(op.host) is None:
        new = Decision.deny(Stage.POLICY, REFUSAL_STATUS, REFUSAL_CODE,
                            f"host {op.host!r} is not an upstream named in the policy", check="upstream",
                            operation=str(op))
        return Replayed(**base, old=old, new=new, compare_mask=compare_mask)
    if old.check == "upstream":
        return Replayed(**base, old=old, skipped="refused as an unknown upstream; the new policy lists the "
                        "host, so the caller's identity would be checked first, which a recording cannot show")
    from nhi_gateway.policy.batch import names_batch

    if names_batch(op):
        # The outer request of a batch has no rule of its own: judge the recorded batch again,
        # every inner request as if sent alone, as the gateway does.
        new = _rejudge_batch(policy, principal, op, flow, at)
        return Replayed(**base, old=old, new=new, compare_mask=False)
    from nhi_gateway.policy.objects import OBJECTS_KEY, ObjectDecider

    # The objects the gateway resolved for this request (alternate keys), as it judged them, for
    # every token the request presented.
    new = decider_for(ObjectDecider(policy, flow.metadata.get(OBJECTS_KEY)), principal).decide(principal, op, at).verdict()
    grant = old.extra.get("grant") if isinstance(old.extra, dict) else None
    if new.allowed and isinstance(grant, dict):
        new = _rejudge_grant(policy, new, grant)
    return Replayed(**base, old=old, new=new, compare_mask=compare_mask)


@dataclass(frozen=True)
class _DecidingAt:
    """The policy, deciding at one fixed time (the batch module asks ``decide(principal, op)``)."""

    policy: Policy
    at: datetime

    def decide(self, principal: Principal | None, op: Operation) -> Decision:
        return self.policy.decide(principal, op, self.at)


@dataclass(frozen=True)
class _VerdictAt(_DecidingAt):
    """For replay: what the rules say of each inner request, report mode or not."""

    def decide(self, principal: Principal | None, op: Operation) -> Decision:
        return self.policy.decide(principal, op, self.at).verdict()


def _rejudge_batch(policy: Policy, principal: Principal | None, op: Operation, flow, at: datetime) -> Decision:
    from nhi_gateway.policy.batch import judge_batch

    r = flow.request
    encoding = ",".join(r.headers.get_all("content-encoding"))
    return judge_batch(_VerdictAt(decider_for(policy, principal), at), principal, op, r.raw_content or b"",
                       r.headers.get("content-type", ""), encoding)


def _rejudge_grant(policy: Policy, decision: Decision, grant: dict) -> Decision:
    """A token request: the recorded grant kind (never its credential) under the new setting."""
    from nhi_gateway.identity.token_requests import GrantKind, TokenGrant, judge_grant

    try:
        kind = GrantKind(grant.get("kind"))
    except ValueError:
        return decision
    recorded = TokenGrant(kind, str(grant.get("client_id", "")), str(grant.get("tenant", "")),
                          str(grant.get("issuer", "")), str(grant.get("problem", "")))
    return judge_grant(policy.identity.client_secret_grants, decision, recorded)


def _outcome(d: Decision | None) -> str:
    if d is None:
        return "-"
    inner = d.extra.get("batch") if isinstance(d.extra, dict) else None
    if isinstance(inner, list) and (inner or d.check == "batch"):
        refused = [f"{e.get('id') or '#' + str(e.get('index', 0) + 1)}"
                   + (f" ({e['rule']})" if e.get("rule") else "")
                   for e in inner if isinstance(e, dict) and e.get("decision") != "allow"]
        return f"{d.action} (batch of {len(inner)}" + (f"; refused: {', '.join(refused)}" if refused else "") + ")"
    rule = d.rule_id or ("upstream" if d.check == "upstream" else "no rule")
    mask = f", mask {d.mask_profile}" if d.allowed and d.mask_profile else ""
    return f"{d.action} ({rule}{mask})"


def cmd_replay(args, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        policy = load_policy(args.policy, environ=_lint_environ(args.policy))
        files = recording_files(args.recordings)
    except PolicyError as e:
        print(str(e), file=err)
        return EXIT_USAGE
    except UsageError as e:
        print(f"nhi-gateway policy replay: {e}", file=err)
        return EXIT_USAGE
    at = datetime.now(UTC) if args.now else None
    results: list[Replayed] = []
    for path in files:
        try:
            for flow in read_flows(path):
                if getattr(flow, "type", "") != "http":
                    continue
                results.append(replay_flow(flow, policy, str(path), at))
        except OSError as e:
            print(f"nhi-gateway policy replay: {path}: {e.strerror or e}", file=err)
            return EXIT_USAGE
    for res in results:
        line = f"flow {res.flow_id}  {res.operation}  by {res.who}"
        if res.changed:
            print(f"CHANGED  {line}\n         {_outcome(res.old)} -> {_outcome(res.new)}"
                  + (f"\n         new reason: {res.new.reason}" if res.new and not res.new.allowed else "")
                  + f"\n         in {res.source}", file=out)
        elif res.skipped:
            print(f"SKIPPED  {line}\n         {res.skipped}", file=out)
        elif args.verbose:
            label = "RULE   " if res.other_rule else "SAME   "
            print(f"{label}  {line}\n         {_outcome(res.old)} -> {_outcome(res.new)}", file=out)
    changed = sum(r.changed for r in results)
    skipped = sum(bool(r.skipped) for r in results)
    other = sum(r.other_rule for r in results)
    decided = len(results) - skipped
    print(
        f"replayed {len(results)} flows from {len(files)} files under {policy.source}: {decided} re-decided, "
        f"{changed} would change, {other} decided by another rule to the same effect, {skipped} skipped",
        file=out,
    )
    return EXIT_CHANGED if changed else EXIT_UNCHANGED


# --- suggest --------------------------------------------------------------------------------------


def read_observations(recordings: list[Path], audit: Path | None) -> tuple[list, str]:
    """What the gateway decided, from recordings (files or directories) or the audit trail, and
    a few words naming the source. Raises :class:`UsageError`."""
    from nhi_gateway.policy.observed import from_audit_records, from_flow
    from nhi_gateway.recording.audit import read_records

    if bool(recordings) == bool(audit):
        raise UsageError("give recordings (files or directories) or --audit FILE, one of the two")
    try:
        if audit:
            records = (rec for _, _, rec in read_records(audit) if rec is not None)
            return list(from_audit_records(records, str(audit))), str(audit)
        files = recording_files(recordings)
        observations = []
        for path in files:
            observations += [o for o in (from_flow(f, str(path)) for f in read_flows(path)) if o is not None]
        return observations, _count(len(files), "recording")
    except OSError as e:
        raise UsageError(f"{e.filename}: {e.strerror or e}") from None


def time_window(args) -> tuple[datetime | None, datetime | None]:
    from nhi_gateway.recording.audit import parse_time

    try:
        return (parse_time(args.since) if args.since else None, parse_time(args.until) if args.until else None)
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_suggest(args, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from nhi_gateway.policy.observed import ObservationFilter
    from nhi_gateway.policy.suggest import suggest_policy

    out, err = out or sys.stdout, err or sys.stderr

    def fail(message: str) -> int:
        print(f"nhi-gateway policy suggest: {message}", file=err)
        return EXIT_USAGE

    try:
        since, until = time_window(args)
    except UsageError as e:
        return fail(str(e))
    if args.base is not None:
        try:
            load_policy(args.base, environ=_lint_environ(args.base))
        except PolicyError as e:
            print(str(e), file=err)
            return EXIT_USAGE
    try:
        observations, sources = read_observations(args.recordings, args.audit)
    except UsageError as e:
        return fail(str(e))
    wanted = ObservationFilter(args.principal, since, until, args.include_denied)
    kept = wanted.apply(observations)
    if not kept:
        return fail(f"no {'' if args.include_denied else 'allowed '}requests match in {sources} "
                    f"({_count(len(observations), 'request')} read)")
    header = (f"Suggested by nhi-gateway policy suggest from {sources}: {_count(len(kept), 'request')}"
              + (" (refused ones included)" if args.include_denied else "")
              + (f", principal {args.principal}" if args.principal else "")
              + (f", since {since.isoformat()}" if since else "") + (f", until {until.isoformat()}" if until else "")
              + ".\nBefore enforcing it: nhi-gateway policy lint FILE; nhi-gateway policy replay --policy FILE "
                "RECORDING...")
    suggestion = suggest_policy(kept, base=args.base, widen=args.widen, header=header)
    if args.output:
        args.output.write_text(suggestion.text)
        print(f"wrote {args.output}: {_count(suggestion.rules, 'suggested rule')} from "
              f"{_count(len(kept), 'request')}" + ("" if suggestion.allow_select else
              "; $select properties seen are comments (this gateway has no odata.allow_select)"), file=err)
    else:
        out.write(suggestion.text)
    return 0
