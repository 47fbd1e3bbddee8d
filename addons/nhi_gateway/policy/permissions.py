"""Which Microsoft Graph permissions an identity needs for what it did, and which it holds in excess.

Microsoft publishes, per permission, the Graph paths and methods it allows and, for each path,
which permission is the least privileged one (``graph-permissions/permissions.json``, MIT, shipped
beside this module; its README says where it comes from). :class:`PermissionReference` reads it
once and answers, for one canonical :class:`~nhi_gateway.policy.operation.Operation`: which
application (or delegated) permissions allow it, with their privilege levels (1 low .. 5 high),
and which of them is the least privileged.

:func:`advise` puts that together per identity: the permissions its tokens carry (``roles`` of
app-only tokens, ``scp`` of delegated ones), the operations it performed, what they need, and the
excess: "holds Directory.ReadWrite.All (level 4); what it did needs User.ReadBasic.All (level 3)".

Reading the data, not trusting it blindly (its README warns of quirks):

- paths are matched segment by segment in the gateway's canonical form: ``{id}`` placeholders
  match one segment, and OData key and function segments are read as the gateway reads them
  (``applications(appid={value})`` is ``applications/appid=...``);
- a path set lists GET next to POST, so a ReadWrite permission is sometimes marked "least" for a
  GET together with a Read one: among the permissions marked least, only those of the lowest
  privilege level count as least (:meth:`PermissionReference.least`);
- a ReadWrite permission marked least for a read next to a Read one is dropped (the same quirk
  seen from the read's side);
- a path no permission marks as least gets the lowest-level permission that allows it.

Least privilege by path and method cannot see ``$select``: ``User.ReadBasic.All`` covers
``GET /users`` only for the basic properties. The advice says so rather than pretend.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from nhi_gateway.policy.observed import Observation
from nhi_gateway.policy.operation import Operation

DATA = Path(__file__).with_name("graph-permissions") / "permissions.json"
APPLICATION = "Application"
DELEGATED = "DelegatedWork"
_PLACEHOLDER = re.compile(r"\{[^}/]*\}")
_READS = frozenset({"GET", "HEAD"})
_WRITES = re.compile(r"Write|Manage|Delete|Send|Create", re.I)
_CALL = re.compile(r"([a-z_][a-z0-9_.]*)\((.*)\)")


@dataclass(frozen=True)
class Permission:
    name: str
    level: int  # Microsoft's privilegeLevel for the scheme asked about, 1 (low) .. 5 (high); 0: unknown
    admin_consent: bool = True

    def describe(self) -> str:
        return f"{self.name} (level {self.level})" if self.level else self.name


@dataclass(frozen=True)
class _Entry:
    permission: str
    methods: frozenset[str]
    segments: tuple[re.Pattern[str] | str, ...]  # literal, or a pattern for segments with placeholders
    schemes: frozenset[str]
    least: frozenset[str]  # schemes for which this permission is the least privileged for the path


def _pattern_segments(path: str) -> tuple[re.Pattern[str] | str, ...]:
    """A reference path in the canonical form of :mod:`nhi_gateway.policy.operation`."""
    out: list[re.Pattern[str] | str] = []
    for seg in path.strip("/").split("/"):
        if not seg:
            continue
        m = _CALL.fullmatch(seg)
        parts = [seg]
        if m:
            args = [a.strip() for a in m.group(2).split(",") if a.strip()]
            named = sorted(a.replace("'", "") for a in args if "=" in a)
            positional = [a.strip("'") for a in args if "=" not in a]
            parts = [m.group(1)] + ([",".join(named)] if named else []) + positional
        for part in parts:
            if "{" in part:
                literal = [re.escape(x) for x in _PLACEHOLDER.split(part)]
                out.append(re.compile("[^/]+".join(literal)))
            else:
                out.append(part)
    return tuple(out)


class PermissionReference:
    """Microsoft's Graph permissions reference, indexed by method and path length."""

    def __init__(self, data: dict) -> None:
        self.permissions: dict[str, dict] = data.get("permissions", {})
        self._index: dict[tuple[str, int], list[_Entry]] = {}
        for name, perm in self.permissions.items():
            for path_set in perm.get("pathSets") or []:
                schemes = frozenset(path_set.get("schemeKeys") or ())
                methods = frozenset(m.upper() for m in path_set.get("methods") or ())
                for path, note in (path_set.get("paths") or {}).items():
                    least = frozenset()
                    for part in str(note or "").split(";"):
                        if part.startswith("least="):
                            least = frozenset(s.strip() for s in part[len("least="):].split(","))
                    segments = _pattern_segments(path)
                    entry = _Entry(name, methods, segments, schemes, least)
                    for method in methods:
                        self._index.setdefault((method, len(segments)), []).append(entry)

    @classmethod
    def load(cls, path: Path = DATA) -> PermissionReference:
        return _load(str(path))

    def permission(self, name: str, scheme: str = APPLICATION) -> Permission:
        """``name`` as the reference knows it (case-insensitively); level 0 when unknown."""
        perm = self.permissions.get(name) or next(
            (p for n, p in self.permissions.items() if n.casefold() == name.casefold()), None)
        real = next((n for n in self.permissions if n.casefold() == name.casefold()), name)
        info = ((perm or {}).get("schemes") or {}).get(scheme) or {}
        return Permission(real, int(info.get("privilegeLevel") or 0), bool(info.get("requiresAdminConsent", True)))

    def knows(self, name: str) -> bool:
        return any(n.casefold() == name.casefold() for n in self.permissions)

    def _entries(self, op: Operation, scheme: str) -> list[_Entry]:
        segments = op.segments
        found = []
        for entry in self._index.get((op.method, len(segments)), ()):
            if scheme not in entry.schemes:
                continue
            if all(p == s if isinstance(p, str) else p.fullmatch(s) for p, s in zip(entry.segments, segments)):
                found.append(entry)
        return found

    def allowing(self, op: Operation, scheme: str = APPLICATION) -> list[Permission]:
        """Every permission that allows ``op`` under ``scheme``, lowest privilege first."""
        names = {e.permission for e in self._entries(op, scheme)}
        return sorted((self.permission(n, scheme) for n in names), key=lambda p: (p.level, p.name))

    def least(self, op: Operation, scheme: str = APPLICATION) -> list[Permission]:
        """The least privileged permissions for ``op``: those Microsoft marks least, of the lowest
        level among them; or, when none is marked, the lowest-level ones that allow it."""
        entries = self._entries(op, scheme)
        marked = {e.permission for e in entries if scheme in e.least}
        pool = [self.permission(n, scheme) for n in (marked or {e.permission for e in entries})]
        if not pool:
            return []
        if op.method in _READS:
            # Correction of a quirk of the data: a path set groups GET with POST, so a write
            # permission is marked least for a read (GET /groups: Group-NestingSupport.ReadWrite.All
            # next to Group.ReadBasic.All). A read needs no write permission when a read one exists.
            reads = [p for p in pool if not _WRITES.search(p.name)]
            pool = reads or pool
        lowest = min(p.level for p in pool)
        return sorted((p for p in pool if p.level == lowest), key=lambda p: p.name)


@lru_cache(maxsize=2)
def _load(path: str) -> PermissionReference:
    with open(path, encoding="utf-8") as f:
        return PermissionReference(json.load(f))


# --- the advice per identity ---------------------------------------------------------------------


@dataclass
class OperationAdvice:
    operation: str  # "GET /v1.0/users/{id}"
    count: int
    least: list[Permission]  # the least privileged permissions for it (alternatives)
    covered_by: list[str]  # the held permissions that allow it
    known: bool  # Microsoft's reference lists it


@dataclass
class IdentityAdvice:
    key: str  # app id
    name: str
    object_ids: list[str]
    scheme: str  # Application (app-only tokens) or DelegatedWork
    held: list[Permission]
    operations: list[OperationAdvice] = field(default_factory=list)
    needed: list[Permission] = field(default_factory=list)
    excess: list[Permission] = field(default_factory=list)

    @property
    def uncovered(self) -> list[OperationAdvice]:
        return [o for o in self.operations if o.known and not o.covered_by]

    @property
    def unknown(self) -> list[OperationAdvice]:
        return [o for o in self.operations if not o.known]

    def summary(self) -> str:
        """"holds Directory.ReadWrite.All (level 4); what it did needs User.ReadBasic.All (level 3)"."""
        held = ", ".join(p.describe() for p in self.held) or "no permissions"
        needed = ", ".join(p.describe() for p in self.needed) or "no Graph permission"
        return f"holds {held}; what it did needs {needed}"

    def to_dict(self) -> dict:
        def perm(p: Permission) -> dict:
            return {"name": p.name, "level": p.level}

        return {
            "app_id": self.key, "name": self.name, "object_ids": self.object_ids, "scheme": self.scheme,
            "held": [perm(p) for p in self.held], "needed": [perm(p) for p in self.needed],
            "excess": [perm(p) for p in self.excess], "summary": self.summary(),
            "operations": [{"operation": o.operation, "count": o.count, "least": [perm(p) for p in o.least],
                            "covered_by": o.covered_by, "in_reference": o.known} for o in self.operations],
        }


def advise(observations: Iterable[Observation], reference: PermissionReference | None = None) -> list[IdentityAdvice]:
    """Per identity (app id), what it holds, did, needs and holds in excess. Graph requests only;
    anonymous requests (the token endpoint) hold no permissions and are left out."""
    from nhi_gateway.policy.suggest import template

    reference = reference or PermissionReference.load()
    by_app: dict[str, list[Observation]] = {}
    for o in observations:
        if o.principal is not None and o.op.is_graph:
            by_app.setdefault(o.principal.app_id.lower(), []).append(o)
    out = []
    for key in sorted(by_app, key=lambda k: (by_app[k][0].principal.display_name.casefold(), k)):
        seen = by_app[key]
        app_only = all(o.principal.app_only for o in seen)
        scheme = APPLICATION if app_only else DELEGATED
        held_names: dict[str, None] = {}
        for o in seen:
            for name in (o.principal.roles if app_only else o.principal.scopes):
                held_names.setdefault(reference.permission(name, scheme).name, None)
        held = sorted((reference.permission(n, scheme) for n in held_names), key=lambda p: (-p.level, p.name))
        held_folded = {p.name.casefold() for p in held}
        ops: dict[str, tuple[Operation, int]] = {}
        for o in seen:
            label = f"{o.op.method} {template(o)}"
            first, count = ops.get(label, (o.op, 0))
            ops[label] = (first, count + 1)
        advice = IdentityAdvice(key, ", ".join(sorted({o.principal.display_name for o in seen} - {""})) or key,
                                sorted({o.principal.object_id for o in seen}), scheme, held)
        needed: dict[str, Permission] = {}
        for label in sorted(ops, key=lambda s: (s.split(" ", 1)[1], s)):
            op, count = ops[label]
            allowing = reference.allowing(op, scheme)
            least = reference.least(op, scheme)
            covered = [p.name for p in allowing if p.name.casefold() in held_folded]
            advice.operations.append(OperationAdvice(label, count, least, covered, bool(allowing)))
            if least:
                # One permission per operation: a held one among the least, else the first.
                chosen = next((p for p in least if p.name.casefold() in held_folded), least[0])
                needed.setdefault(chosen.name, chosen)
        advice.needed = sorted(needed.values(), key=lambda p: (-p.level, p.name))
        needed_folded = {n.casefold() for n in needed}
        advice.excess = [p for p in held if p.name.casefold() not in needed_folded]
        out.append(advice)
    return out
