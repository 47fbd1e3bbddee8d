"""A least-privilege policy, suggested from what identities were seen doing (``policy suggest``).

The input is a list of :class:`~nhi_gateway.policy.observed.Observation` (recorded flows or audit
lines the gateway already decided). The output is the project's YAML:

- one ``allow`` rule per identity (``when: {app_ids: [...]}``; the display name goes in the
  description), and one ``approve`` rule more for the operations a person approved, naming the
  people who did as its approvers: what was held before is held again, never silently allowed;
- token requests (anonymous) get one ``anonymous: true`` rule;
- each operation is a template of the canonical path: keys (GUIDs, user principal names,
  ``appid=...`` keys, numbers, long opaque ids) become ``{id}``, names stay literal, the version
  seen is kept, and only the methods seen are listed. Nothing is broader than what was seen unless
  ``widen`` is asked for: then every template under one top-level collection becomes
  ``/<collection>/**``;
- ``$select`` properties seen: as ``odata.allow_select`` when the loader accepts that key, else as
  a comment (the request then keeps its full reach: say so, do not pretend);
- comments with the number of requests and the first and last time each was seen.

With a base policy (``--base``), its ``identity``, ``upstreams``, ``masking`` and ``approvals``
sections and its ``deny`` rules (guard rails such as "nobody mints credentials") are kept, so the
suggestion masks and refuses what the base did; without one, the identity section is built from
the tenants and issuers of the tokens seen, and the upstreams from the hosts seen.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from nhi_gateway.identity.principal import TokenSource
from nhi_gateway.policy.decision import Action
from nhi_gateway.policy.observed import Observation

ID = "{id}"
TOKEN_HOST = "login.microsoftonline.com"
GRAPH_AUDIENCES = ["https://graph.microsoft.com", "https://graph.microsoft.com/", "00000003-0000-0000-c000-000000000000"]

_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Graph's own names (entity sets, navigation properties, actions, casts, $count/$ref/$value) are
# letters, digits, dots and a leading $: anything else in a segment is a value someone chose.
_NAME = re.compile(r"\$?[a-z][a-z0-9.]*")
_LONG_OPAQUE = 24  # message, drive item and site ids: long, with digits, unlike any Graph name


def is_key(segment: str) -> bool:
    """Whether a canonical path segment is a value (an id, a UPN, a key) rather than a name."""
    if _GUID.fullmatch(segment) or "@" in segment or "=" in segment or segment.isdigit():
        return True
    if not _NAME.fullmatch(segment):
        return True  # spaces, commas, '!' (drive ids), '_' , '-', quotes, ...
    return len(segment) >= _LONG_OPAQUE and any(c.isdigit() for c in segment)


def template(o: Observation) -> str:
    """The path pattern that covers this operation and others like it: keys become ``{id}``."""
    segments = [ID if is_key(s) else s for s in o.op.segments]
    version = [o.op.version] if o.op.version else []
    return "/" + "/".join(version + segments)


def widened(path: str, graph: bool) -> str:
    """``/v1.0/users/{id}/memberof`` -> ``/v1.0/users/**``: the collection, whatever lies under it."""
    parts = path.strip("/").split("/")
    keep = 2 if graph and parts and parts[0] in ("v1.0", "beta") else 1
    if len(parts) <= keep:
        return path
    return "/" + "/".join(parts[:keep] + ["**"])


@dataclass
class Seen:
    """How often something was seen, and when first and last."""

    count: int = 0
    first: datetime | None = None
    last: datetime | None = None

    def add(self, at: datetime) -> None:
        self.count += 1
        self.first = at if self.first is None or at < self.first else self.first
        self.last = at if self.last is None or at > self.last else self.last

    def describe(self) -> str:
        times = "request" if self.count == 1 else "requests"
        if self.first is None or self.last is None:
            return f"{self.count} {times}"
        first, last = _iso(self.first), _iso(self.last)
        return f"{self.count} {times}, first {first}" + (f", last {last}" if last != first else "")


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class PathSeen:
    seen: Seen = field(default_factory=Seen)
    methods: set[str] = field(default_factory=set)
    selects: set[str] = field(default_factory=set)


@dataclass
class IdentitySeen:
    key: str  # app id, or "anonymous"
    names: set[str] = field(default_factory=set)
    object_ids: set[str] = field(default_factory=set)
    tenants: set[str] = field(default_factory=set)
    app_only: set[bool] = field(default_factory=set)
    seen: Seen = field(default_factory=Seen)
    # (host, approved?, mask profile) -> template -> PathSeen
    paths: dict[tuple[str, bool, str], dict[str, PathSeen]] = field(default_factory=dict)
    approvers: set[str] = field(default_factory=set)


def collect(observations: Iterable[Observation], *, widen: bool = False) -> dict[str, IdentitySeen]:
    identities: dict[str, IdentitySeen] = {}
    for o in observations:
        ident = identities.setdefault(o.identity_key, IdentitySeen(o.identity_key))
        if o.principal is not None:
            if o.principal.display_name:
                ident.names.add(o.principal.display_name)
            ident.object_ids.add(o.principal.object_id.lower())
            ident.tenants.add(o.principal.tenant_id.lower())
            ident.app_only.add(o.principal.app_only)
        ident.seen.add(o.at)
        approved = bool(o.approved_by)
        if approved and o.approved_by != "unknown":
            ident.approvers.add(o.approved_by)
        path = template(o)
        if widen:
            path = widened(path, o.op.is_graph)
        key = (o.op.host, approved, o.mask_profile or "")
        entry = ident.paths.setdefault(key, {}).setdefault(path, PathSeen())
        entry.seen.add(o.at)
        entry.methods.add(o.op.method)
        for selected in o.op.odata.selects:
            if selected and selected[0] != "*":
                entry.selects.add(selected[0])
            elif selected:
                entry.selects.add("*")
    return identities


# --- the YAML ----------------------------------------------------------------------------------


def _rule_id(ident: IdentitySeen, used: set[str], suffix: str = "") -> str:
    base = "token-endpoint" if ident.key == "anonymous" else (sorted(ident.names) or [ident.key])[0]
    base = re.sub(r"[^A-Za-z0-9_.:-]+", "-", base).strip("-").lower() or ident.key
    base = f"suggested-{base}{suffix}"
    rid, n = base, 2
    while rid in used:
        rid, n = f"{base}-{n}", n + 1
    used.add(rid)
    return rid


def allow_select_supported() -> bool:
    """Whether this gateway's loader accepts ``odata.allow_select`` on an operation: the key is
    emitted only then (an unknown key would make the whole suggestion unloadable)."""
    from nhi_gateway.policy.loader import PolicyError, parse_policy

    probe = """
version: 1
identity: {tenants: [00000000-0000-0000-0000-000000000001],
           bearer: {audiences: [https://graph.microsoft.com], issuers: ["https://sts.windows.net/{tenantid}/"]}}
upstreams: [{host: graph.microsoft.com}]
rules:
  - id: probe
    action: allow
    operations:
      - {host: graph.microsoft.com, methods: [GET], paths: [/users], odata: {allow_select: [id]}}
"""
    try:
        parse_policy(probe, "<allow_select probe>", environ={})
    except PolicyError:
        return False
    return True


def _operations(by_template: dict[str, PathSeen], host: str, with_select: bool) -> list[Any]:
    """Operations of one host: templates with the same methods (and $select) share one entry."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    groups: dict[tuple, list[str]] = defaultdict(list)
    for path in sorted(by_template):
        entry = by_template[path]
        selects = tuple(sorted(entry.selects)) if with_select and "*" not in entry.selects else ()
        groups[(tuple(sorted(entry.methods)), selects)].append(path)
    out = []
    for (methods, selects), paths in groups.items():
        op = CommentedMap()
        op["host"] = host
        op["methods"] = _flow(list(methods))
        seq = CommentedSeq(paths)
        for i, path in enumerate(paths):
            entry = by_template[path]
            note = entry.seen.describe()
            if entry.selects and not selects:
                shown = ", ".join(sorted(entry.selects))
                note += f"; $select seen: {shown}"
            seq.yaml_add_eol_comment(note, i)
        op["paths"] = seq
        if selects:
            op["odata"] = CommentedMap(allow_select=_flow(list(selects)))
        out.append(op)
    return out


def _plain(node: Any) -> Any:
    """A copy of a round-trip YAML node without its comments (a comment written above one rule of
    the base would otherwise land under the rule before it), keeping flow-style lists and maps."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(node, dict):
        out = CommentedMap((k, _plain(v)) for k, v in node.items())
    elif isinstance(node, list):
        out = CommentedSeq(_plain(v) for v in node)
    else:
        return node
    fa = getattr(node, "fa", None)
    if fa is not None and fa.flow_style():
        out.fa.set_flow_style()
    return out


def _flow(items: list) -> Any:
    from ruamel.yaml.comments import CommentedSeq

    seq = CommentedSeq(items)
    seq.fa.set_flow_style()
    return seq


def suggest_rules(identities: dict[str, IdentitySeen], *, known_profiles: Iterable[str] = (),
                  with_select: bool | None = None, trusted_tenants: Iterable[str] = ()) -> list[Any]:
    """The suggested rules, as ruamel round-trip mappings with their comments."""
    from ruamel.yaml.comments import CommentedMap

    with_select = allow_select_supported() if with_select is None else with_select
    known = set(known_profiles)
    # An app id is the same in every tenant: where the policy trusts several, the rule names the
    # tenants the identity was seen in, and no other.
    tenants = {t.lower() for t in trusted_tenants}
    used: set[str] = set()
    rules: list[Any] = []
    for key in sorted(identities, key=lambda k: (k != "anonymous", sorted(identities[k].names), k)):
        ident = identities[key]
        name = ", ".join(sorted(ident.names)) or ("token requests" if key == "anonymous" else key)
        # One allow rule per identity; one more for what a person approved; and, should its
        # requests have been answered under different mask profiles, one per profile, so that
        # every answer is masked as it was.
        groups = sorted({(a, m if m in known else "") for (_, a, m) in ident.paths})
        for n, (approved, mask) in enumerate(groups):
            hosts: dict[str, dict[str, PathSeen]] = {}
            for (h, a, m), templates in ident.paths.items():
                if a is approved and (m if m in known else "") == mask:
                    for path, entry in templates.items():
                        hosts.setdefault(h, {})[path] = entry
            if approved and not ident.approvers:
                continue  # nobody known to name as approver: left out rather than allowed
            rule = CommentedMap()
            suffix = "-approved" if approved else ""
            if sum(1 for a, _ in groups if a is approved) > 1 and n > 0 and mask:
                suffix += f"-{mask}"
            rule["id"] = _rule_id(ident, used, suffix)
            total = Seen()
            for templates in hosts.values():
                for entry in templates.values():
                    for t in (entry.seen.first, entry.seen.last):
                        if t is not None:
                            total.add(t)
            total.count = sum(e.seen.count for t in hosts.values() for e in t.values())
            if key == "anonymous":
                what = "Requests without a token (the Entra token endpoint)"
            else:
                what = f"{name} (app id {key}; service principal {', '.join(sorted(ident.object_ids))})"
            rule["description"] = (f"{what}: what it was seen doing" + (", each time a person approved it"
                                   if approved else "") + f" ({total.describe()}).")
            rule["action"] = "approve" if approved else "allow"
            if key == "anonymous":
                rule["when"] = CommentedMap(anonymous=True)
            else:
                when = CommentedMap(app_ids=_flow([key]))
                if len(tenants) > 1 and ident.tenants & tenants:
                    when["tenants"] = _flow(sorted(ident.tenants & tenants))
                if len(ident.app_only) == 1:
                    when["app_only"] = next(iter(ident.app_only))
                rule["when"] = when
            operations = []
            for host in sorted(hosts):
                operations += _operations(hosts[host], host, with_select)
            rule["operations"] = operations
            if approved:
                rule["approval"] = CommentedMap(approvers=CommentedMap(users=_flow(sorted(ident.approvers))))
            if mask:
                rule["mask"] = mask
            rules.append(rule)
    return rules


def default_sections(observations: list[Observation]) -> dict[str, Any]:
    """identity and upstreams when no base policy is given: from the tokens and hosts seen."""
    from ruamel.yaml.comments import CommentedMap

    tenants = sorted({o.principal.tenant_id.lower() for o in observations if o.principal})
    issuers = set()
    for o in observations:
        if o.principal and o.principal.issuer:
            issuers.add(o.principal.issuer.replace(o.principal.tenant_id, "{tenantid}"))
    issuers = issuers or {"https://sts.windows.net/{tenantid}/"}
    hosts = sorted({o.op.host for o in observations})
    # Each token source has its own trust: the recorded tokens are Graph's, so the bearer trusts
    # Graph's audiences; when callers were seen carrying them in the proxy credentials, the proxy
    # source says so (graph_token: true). A token for the gateway's own API is not in recordings.
    identity = CommentedMap(tenants=tenants or ["00000000-0000-0000-0000-000000000000"])
    identity["bearer"] = CommentedMap(audiences=GRAPH_AUDIENCES, issuers=sorted(issuers))
    if any(o.principal and TokenSource.PROXY in o.principal.token_sources for o in observations):
        identity["proxy"] = CommentedMap(graph_token=True, audiences=GRAPH_AUDIENCES, issuers=sorted(issuers))
    # The token endpoint is where callers come without a token; every other host needs one.
    upstreams = [CommentedMap(host=h, token="none" if h == TOKEN_HOST else "any") for h in hosts]
    return {"identity": identity, "upstreams": upstreams}


@dataclass(frozen=True)
class Suggestion:
    text: str
    rules: int
    allow_select: bool  # whether $select was written as odata.allow_select


def suggest_policy(observations: list[Observation], *, base: Path | None = None, widen: bool = False,
                   header: str = "") -> Suggestion:
    """The suggested policy as YAML text (see the module docstring)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    yaml = YAML(typ="rt")
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)
    doc = CommentedMap()
    doc["version"] = 1
    kept_denies: list[Any] = []
    profiles: list[str] = []
    if base is not None:
        source = yaml.load(Path(base).read_text(encoding="utf-8-sig"))
        for section in ("identity", "upstreams", "masking", "approvals"):
            if section in source:
                doc[section] = _plain(source[section])
        profiles = list(((source.get("masking") or {}).get("profiles") or {}).keys())
        kept_denies = [_plain(r) for r in (source.get("rules") or [])
                       if isinstance(r, dict) and r.get("action") == "deny"]
    else:
        doc.update(default_sections(observations))
    with_select = allow_select_supported()
    trusted = [str(t) for t in ((doc.get("identity") or {}).get("tenants") or [])]
    rules = suggest_rules(collect(observations, widen=widen), known_profiles=profiles, with_select=with_select,
                          trusted_tenants=trusted)
    text = _dump(yaml, doc, kept_denies, rules, header)
    # A deny rule of the base that refuses what was allowed when recorded (the base is not the
    # policy the traffic was decided under) would make the suggestion refuse its own evidence:
    # it is left out, and the header says so.
    dropped = _denies_refusing(text, observations, {r["id"] for r in kept_denies})
    if dropped:
        kept_denies = [r for r in kept_denies if r["id"] not in dropped]
        header += "".join(f"\nLeft out the base's deny rule '{rid}': it refuses {_count(n)} allowed when recorded."
                          for rid, n in sorted(dropped.items()))
        text = _dump(yaml, doc, kept_denies, rules, header)
    return Suggestion(text, len(rules), with_select)


def _count(n: int) -> str:
    return f"{n} request{'s' * (n != 1)}"


def _dump(yaml, doc, kept_denies: list, rules: list, header: str) -> str:
    from ruamel.yaml.comments import CommentedSeq

    seq = CommentedSeq(kept_denies + rules)
    if kept_denies:
        seq.yaml_set_comment_before_after_key(0, before="Kept from the base policy: its deny rules.", indent=2)
    if rules:
        seq.yaml_set_comment_before_after_key(
            len(kept_denies),
            before="Suggested from observed traffic: each identity may do what it was seen doing, nothing more.",
            indent=2)
    doc["rules"] = seq
    if header:
        doc.yaml_set_start_comment(header)
    buf = io.StringIO()
    yaml.dump(doc, buf)
    return buf.getvalue()


def _denies_refusing(text: str, observations: list[Observation], deny_ids: set[str]) -> dict[str, int]:
    from nhi_gateway.policy.loader import PolicyError, parse_policy

    if not deny_ids:
        return {}
    try:
        policy = parse_policy(text, "<suggestion>", environ=_AnyKey())
    except PolicyError:
        return {}
    found: dict[str, int] = {}
    for o in observations:
        if not o.allowed:
            continue
        d = policy.decide(o.principal, o.op, o.at)
        if d.action is Action.DENY and d.rule_id in deny_ids:
            found[d.rule_id] = found.get(d.rule_id, 0) + 1
    return found


class _AnyKey(dict):
    """An environment in which every pseudonym key is set: the check above decides, never masks."""

    def get(self, name, default=None):
        return "k" * 32
