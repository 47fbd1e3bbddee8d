"""``nhi-gateway policy lint|explain|replay``: the policy engine, used exactly as the gateway uses it.

lint FILE...
    Loads each file as the gateway would. Valid: one summary line per file, exit 0. Invalid:
    ``file:line:column: message`` and a hint, exit 1. Rules that can never decide (shadowed by
    another rule) and expired rules are warnings: they do not change the exit code unless
    ``--strict``.

explain FILE --as PRINCIPAL METHOD URL [--at TIME]
    Prints the decision the gateway would take, the rule that made it and what every other rule
    naming this caller and operation made of the request. PRINCIPAL is ``anonymous``, an inline
    spec ``app=<appid>,oid=<oid>,tenant=<tid>,groups=g1;g2,roles=r1;r2,auth=certificate,
    sources=proxy;bearer,mi=<xms_mirid>,app_only=false``, a JSON file (a recorded principal, or token
    claims), or a JWT, which is decoded WITHOUT verification, for explaining only.
    Exit status: 0 allow, 1 deny, 3 approve (a person must approve first), 2 usage or input errors.

replay --policy NEW RECORDING...
    Re-decides every recorded flow under NEW, at the time it was recorded, and lists each flow whose
    decision would change (old -> new, rule ids); a ``$batch`` is judged again from its recorded
    body, every inner request as if sent alone. Flows refused before the rules (identity
    failures, unreadable requests) are listed as skipped, not as changes. Exit status: 0 nothing
    changes, 1 something would, 2 usage or input errors. RECORDING is a ``.mitm`` file or a
    directory of them (the gateway's ``--recordings`` directory).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
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
from nhi_gateway.policy.lint import policy_warnings
from nhi_gateway.policy.loader import PolicyError, load_policy
from nhi_gateway.policy.model import REFUSAL_CODE, REFUSAL_STATUS, Outcome, Policy
from nhi_gateway.identity.principal import AuthMethod, Principal, TokenSource

EXIT_ALLOW, EXIT_DENY, EXIT_USAGE, EXIT_APPROVE = 0, 1, 2, 3
EXIT_UNCHANGED, EXIT_CHANGED = 0, 1
ZERO_GUID = "00000000-0000-0000-0000-000000000000"
UNVERIFIED = ("UNVERIFIED: decoded for explain only; its signature, issuer, audience and lifetime "
              "were not checked")

_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class UsageError(Exception):
    """Bad input on the command line: printed, exit 2."""


def register(sub) -> None:
    p = sub.add_parser("policy", help="check, explain and regression-test policy files")
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


def cmd_lint(args, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    status = 0
    for path in args.files:
        try:
            policy = load_policy(path)
        except PolicyError as e:
            print(str(e), file=out)
            status = 1
            continue
        warnings = policy_warnings(policy)
        for w in warnings:
            print(f"{path}:{w.line}:{w.column}: warning: {w.message}", file=out)
            if w.hint:
                print(f"  hint: {w.hint}", file=out)
        if warnings and args.strict:
            status = 1
        counted = f", {_count(len(warnings), 'warning')}" if warnings else ""
        print(f"{path}: ok: {summary(policy)}{counted}", file=out)
    return status


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
        policy = load_policy(args.file)
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
            print(f"  {mark} {o.rule.id:<{width}}  {o.rule.action:<7}  line {o.rule.line:<5} {note}", file=out)
    else:
        print("rules naming this caller and operation: none", file=out)
    return {Action.ALLOW: EXIT_ALLOW, Action.DENY: EXIT_DENY, Action.APPROVE: EXIT_APPROVE}[decision.action]


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
    try:
        principal = Principal.from_dict(old.principal) if old.principal else None
    except ValueError as e:
        return Replayed(**base, old=old, skipped=f"the recorded principal cannot be read ({e})")
    base["who"] = principal.label if principal else "anonymous"
    base["operation"] = old.operation or what
    if old.stage is Stage.IDENTITY:
        return Replayed(**base, old=old, skipped=f"refused at the identity stage ({old.check or old.code}) "
                        "before any rule")
    if old.stage in (Stage.GUARD, Stage.ERROR):
        return Replayed(**base, old=old, skipped=f"refused by the gateway's {old.stage} stage, not by the policy")
    if old.stage is Stage.POLICY and old.check == "operation":
        return Replayed(**base, old=old, skipped=f"refused before the rules ({old.check}): {old.reason}")
    compare_mask = True
    if old.stage is Stage.MASKING:
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
    new = policy.decide(principal, op, at)
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


def _rejudge_batch(policy: Policy, principal: Principal | None, op: Operation, flow, at: datetime) -> Decision:
    from nhi_gateway.policy.batch import judge_batch

    r = flow.request
    encoding = ",".join(r.headers.get_all("content-encoding"))
    return judge_batch(_DecidingAt(policy, at), principal, op, r.raw_content or b"",
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
        policy = load_policy(args.policy)
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
