"""Objects named by something other than their id: which object is it, and what does the policy say?

Graph lets a request name one object in several ways that no text rewriting can relate:
``applications(appId='...')`` and ``applications(uniqueName='...')`` name an application by an
alternate key, ``/users/adele@contoso.com`` a user by UPN, and ``/directoryObjects/{id}`` an object
of a type only Graph knows (a user, an application, ...). :mod:`nhi_gateway.policy.operation`
reduces every *spelling* to one path; what remains is an :class:`ObjectKey`.

Most rules do not care: ``/applications/{id}/addPassword`` matches ``applications/appid=x/addpassword``
as it matches the object id. A rule that names a literal object (``/applications/6f1c.../addPassword``)
does care, and so does every rule on a typed entity set when the request says ``directoryObjects``.
For those requests the gateway resolves the key with its own Graph credential
(:class:`ObjectResolver`, cached like group membership) and the policy judges the object:
:func:`decide` decides the operation on the object's own path (``applications/<id>/addpassword``),
and a deny rule that matches the request as sent still wins. When the key cannot be resolved the
request is refused (fail closed, ``check: object_unresolved``), whatever else the policy says.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol
from urllib.parse import quote

from nhi_gateway.identity.principal import Principal
from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.policy.model import ANY_METHOD, Policy, Rule
from nhi_gateway.policy.operation import DIRECTORY_OBJECTS, ENTITY_TYPES, TYPE_SETS, Operation

logger = logging.getLogger(__name__)

CHECK = "object_unresolved"
OBJECTS_KEY = "nhi.objects"  # flow.metadata: {ObjectKey.cache_key: [entity set, object id]} of the request
DEFAULT_TTL = 300  # seconds a resolved key is reused (an appId or UPN rarely moves to another object)
DEFAULT_CACHE_SIZE = 10_000

_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# Graph's own spelling of the canonical (case-folded) names, for the lookups the gateway sends.
GRAPH_SETS = {
    "users": "users", "groups": "groups", "applications": "applications",
    "serviceprincipals": "servicePrincipals", "devices": "devices", "contacts": "contacts",
    "directoryroles": "directoryRoles", "directoryroletemplates": "directoryRoleTemplates",
    "administrativeunits": "administrativeUnits", DIRECTORY_OBJECTS: "directoryObjects",
}
# Alternate keys Graph documents, by entity set.
ALTERNATE_KEYS = {
    "applications": {"appid": "appId", "uniquename": "uniqueName"},
    "serviceprincipals": {"appid": "appId", "uniquename": "uniqueName"},
    "groups": {"uniquename": "uniqueName"},
    "devices": {"deviceid": "deviceId"},
    "directoryroles": {"roletemplateid": "roleTemplateId"},
}
UPN = "userprincipalname"


@dataclass(frozen=True)
class ObjectKey:
    """How a request names its object when that is not ``/{set}/{object id}``."""

    entity_set: str  # canonical: "applications", ..., or "directoryobjects" (type unknown)
    name: str  # "appid", "uniquename", "userprincipalname"; "id" for an untyped directory object
    value: str

    @property
    def untyped(self) -> bool:
        return self.entity_set == DIRECTORY_OBJECTS

    @property
    def cache_key(self) -> str:
        return f"{self.entity_set}|{self.name}|{self.value}"

    def describe(self) -> str:
        if self.untyped:
            return f"directoryObjects/{self.value} (an object of a type only Graph knows)"
        return f"{GRAPH_SETS.get(self.entity_set, self.entity_set)} by {self.name} '{self.value}'"


def object_key(op: Operation) -> ObjectKey | None:
    """The object key of a Graph operation, when it names its object other than by type and id."""
    if not op.is_graph:
        return None
    segments = op.segments
    if len(segments) < 2:
        return None
    head, key = segments[0], segments[1]
    if head == DIRECTORY_OBJECTS:
        return ObjectKey(head, "id", key) if _GUID.fullmatch(key) else None
    if head not in ENTITY_TYPES:
        return None
    if "=" in key:  # applications(appId='x') -> appid=x; several keys stay whole, and unresolvable
        name, _, value = key.partition("=")
        return ObjectKey(head, name if "," not in key else key, value if "," not in key else "")
    if head == "users" and "@" in key:
        return ObjectKey(head, UPN, key)
    return None


def resolved_operation(op: Operation, entity_set: str, object_id: str) -> Operation:
    """``op`` on the object's own path: ``/{entity_set}/{object_id}/...``."""
    segments = [entity_set, object_id, *op.segments[2:]]
    return dataclasses.replace(op, path="/" + "/".join(segments))


# --- which rules could decide differently ----------------------------------------------------------


def _operations_matching(policy: Policy, principal: Principal | None, op: Operation) -> set[tuple[int, int]]:
    return {(i, j) for i, rule in enumerate(policy.rules) if rule.when.matches(principal)
            for j, om in enumerate(rule.operations) if om.matches(op)}


def _literal_at_key(rule: Rule, op: Operation) -> bool:
    """Whether a pattern of ``rule`` names a literal object where ``op`` has its key, and would
    match ``op`` were its key that object."""
    for om in rule.operations:
        if om.host != op.host or (ANY_METHOD not in om.methods and op.method not in om.methods):
            continue
        for pattern in om.paths:
            pat, segs = pattern.segments, op.segments
            if op.version not in pattern.versions or len(pat) < 2 or pat[1] in ("*", "**") or pat[0] == "**":
                continue
            tail = pat[-1] == "**"
            body = pat[:-1] if tail else pat
            if (len(segs) < len(body)) if tail else (len(segs) != len(body)):
                continue
            if all(p == "*" or p == s or i == 1 for i, (p, s) in enumerate(zip(body, segs, strict=False))):
                return True
    return False


def deciding_rules(policy: Policy, principal: Principal | None, op: Operation, key: ObjectKey) -> list[Rule]:
    """The rules that could decide ``op`` otherwise once its object is known; none: the key does
    not matter and the request is decided as it is."""
    if key.untyped:
        as_sent = _operations_matching(policy, principal, op)
        differ: set[int] = set()
        for entity_set in ENTITY_TYPES:
            as_typed = _operations_matching(policy, principal, resolved_operation(op, entity_set, key.value))
            differ |= {i for i, _ in as_sent ^ as_typed}
        return [policy.rules[i] for i in sorted(differ)]
    return [rule for rule in policy.rules if rule.when.matches(principal) and _literal_at_key(rule, op)]


def literal_object_rules(policy: Policy) -> list[tuple[Rule, str]]:
    """Rules with a pattern that names an object of a keyed entity set literally, and the pattern:
    requests naming such an object by an alternate key need the gateway's Graph credential."""
    found = []
    for rule in policy.rules:
        for om in rule.operations:
            for pattern in om.paths:
                seg = pattern.segments
                if len(seg) >= 2 and seg[0] in ENTITY_TYPES and seg[1] not in ("*", "**"):
                    found.append((rule, pattern.text))
    return found


# --- the decision ------------------------------------------------------------------------------------

Resolutions = Mapping[str, Sequence[str]]  # ObjectKey.cache_key -> [entity set, object id]


def unresolved(op: Operation, key: ObjectKey, rules: Iterable[Rule], principal: Principal | None,
               why: str, status: int = 503) -> Decision:
    names = ", ".join(f"'{r.id}'" for r in rules)
    return Decision.deny(
        Stage.POLICY, status, "ServiceUnavailable" if status == 503 else "Authorization_RequestDenied",
        f"{op} names {key.describe()}, and rule(s) {names} could decide it otherwise once the object is "
        f"known; the gateway could not learn which object it is ({why}), so the request was refused "
        "(fail closed). Name the object by its id, or retry later.",
        check=CHECK, operation=str(op), principal=principal.to_dict() if principal else None,
    )


def decide(policy: Policy, principal: Principal | None, op: Operation,
           resolutions: Resolutions | None = None, at: datetime | None = None) -> Decision:
    """The policy's decision on the object ``op`` names. Without a key that matters this is
    ``policy.decide``; with one, the object's resolution must be in ``resolutions``."""
    me = signed_in_user(op, principal)
    if me is not None:
        # /me is the signed-in user: its rules are the user's, known from the verified token.
        return _both_spellings(policy, principal, op, me, at, {"object": {"named": "me", "resolved": me.path}})
    key = object_key(op)
    if key is None:
        return policy.decide(principal, op, at)
    rules = deciding_rules(policy, principal, op, key)
    if not rules:
        return policy.decide(principal, op, at)
    found = (resolutions or {}).get(key.cache_key)
    if not found or len(found) != 2:
        return unresolved(op, key, rules, principal, "it was not resolved for this request")
    entity_set, object_id = found
    note = {"object": {"named": key.describe(), "resolved": f"{GRAPH_SETS.get(entity_set, entity_set)}/{object_id}"}}
    return _both_spellings(policy, principal, op, resolved_operation(op, entity_set, object_id), at, note)


def signed_in_user(op: Operation, principal: Principal | None) -> Operation | None:
    """``/me/...`` of a delegated token as ``/users/{oid}/...``; None for anything else."""
    if not op.is_graph or op.segments[:1] != ("me",) or principal is None or principal.app_only:
        return None
    return dataclasses.replace(op, path="/" + "/".join(["users", principal.object_id.lower(), *op.segments[1:]]))


def _both_spellings(policy: Policy, principal: Principal | None, op: Operation, as_object_op: Operation,
                    at: datetime | None, note: dict) -> Decision:
    as_object = policy.decide(principal, as_object_op, at)
    as_sent = policy.decide(principal, op, at)
    # The rules of both spellings apply, by the usual precedence: a rule that names the object by
    # the key the request used (a UPN, appid=..., /me) is as much about it as one naming its id.
    chosen = next((d for wanted in (_DENIED_BY_RULE, Action.APPROVE, Action.ALLOW)
                   for d in (as_object, as_sent) if _is(policy, d, wanted)), as_object)
    return chosen.but(extra={**chosen.extra, **note})


_DENIED_BY_RULE = "denied by a deny rule"


def _is(policy: Policy, d: Decision, wanted: Action | str) -> bool:
    if wanted == _DENIED_BY_RULE:
        rule = policy.rule(d.rule_id or "")
        return d.action is Action.DENY and rule is not None and rule.action is Action.DENY
    return d.action is wanted


class ObjectDecider:
    """``decide(principal, op)`` with the resolutions of one request (for the inner requests of a batch)."""

    def __init__(self, policy: Policy, resolutions: Resolutions | None) -> None:
        self.policy = policy
        self.resolutions = resolutions

    def decide(self, principal: Principal | None, op: Operation, at: datetime | None = None) -> Decision:
        return decide(self.policy, principal, op, self.resolutions, at)


# --- resolving with the gateway's own Graph credential ------------------------------------------------


class ObjectLookupFailed(Exception):
    """Graph could not say which object a key names: requests that depend on it fail closed."""

    status = 503


class ObjectNotFound(ObjectLookupFailed):
    """Graph knows no object by that key (or no such key exists): the request is refused."""

    status = 403


class GraphSession(Protocol):
    """The gateway's own Graph access (:class:`nhi_gateway.identity.groups.GroupResolver`)."""

    graph_url: str

    async def access_token(self) -> str: ...

    def drop_token(self, token: str) -> None: ...

    async def get_json(self, url: str, token: str) -> tuple[int, object]: ...


class ObjectResolver:
    """Which object a key names, from Graph, cached per key for ``ttl`` seconds."""

    def __init__(self, graph: GraphSession, *, ttl: float = DEFAULT_TTL, cache_size: int = DEFAULT_CACHE_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.graph = graph
        self.ttl = ttl
        self.cache_size = cache_size
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, tuple[str, str]]] = OrderedDict()
        self._running: dict[str, asyncio.Future] = {}
        self.lookups = 0

    async def resolve(self, key: ObjectKey) -> tuple[str, str]:
        """``(entity set, object id)``; raises ObjectLookupFailed (or ObjectNotFound)."""
        hit = self._cache.get(key.cache_key)
        if hit is not None:
            if hit[0] > self._clock():
                self._cache.move_to_end(key.cache_key)
                return hit[1]
            del self._cache[key.cache_key]
        task = self._running.get(key.cache_key)
        if task is None:
            task = asyncio.ensure_future(self._lookup(key))
            self._running[key.cache_key] = task
            task.add_done_callback(functools.partial(self._finished, key.cache_key))
        return await asyncio.shield(task)  # one caller going away must not cancel the others' lookup

    def _finished(self, cache_key: str, task: asyncio.Future) -> None:
        if self._running.get(cache_key) is task:
            del self._running[cache_key]
        if not task.cancelled():
            task.exception()

    def lookup_url(self, key: ObjectKey) -> str:
        base = f"{self.graph.graph_url}/v1.0/{GRAPH_SETS[key.entity_set]}"
        if key.untyped:
            return f"{base}/{key.value}?$select=id"
        if key.name == UPN:
            return f"{base}/{quote(key.value, safe='@')}?$select=id"
        prop = ALTERNATE_KEYS.get(key.entity_set, {}).get(key.name)
        if prop is None:
            raise ObjectNotFound(f"Graph documents no alternate key '{key.name}' for {GRAPH_SETS[key.entity_set]}")
        literal = quote(key.value.replace("'", "''"), safe="@")
        return f"{base}({prop}='{literal}')?$select=id"

    async def _lookup(self, key: ObjectKey) -> tuple[str, str]:
        url = self.lookup_url(key)
        for attempt in (1, 2):
            try:
                token = await self.graph.access_token()
            except Exception as e:  # noqa: BLE001 - the gateway's own token: any failure fails closed
                raise ObjectLookupFailed(str(e)) from e
            self.lookups += 1
            try:
                status, body = await self.graph.get_json(url, token)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a network failure is a lookup failure: the caller fails closed
                raise ObjectLookupFailed(f"cannot reach Graph: {type(e).__name__}: {str(e)[:200]}") from e
            if status == 401 and attempt == 1:
                self.graph.drop_token(token)
                continue
            break
        if status in (400, 404):
            raise ObjectNotFound(f"Graph knows no object {key.describe()} ({status})")
        if status != 200 or not isinstance(body, dict):
            raise ObjectLookupFailed(f"Graph answered {status} to the lookup of {key.describe()}")
        object_id = str(body.get("id", "")).lower()
        if not _GUID.fullmatch(object_id):
            raise ObjectLookupFailed(f"Graph's answer for {key.describe()} holds no object id")
        entity_set = key.entity_set
        if key.untyped:
            odata_type = str(body.get("@odata.type", "")).lstrip("#").casefold()
            entity_set = TYPE_SETS.get(odata_type, DIRECTORY_OBJECTS)
        result = (entity_set, object_id)
        self._cache[key.cache_key] = (self._clock() + self.ttl, result)
        self._cache.move_to_end(key.cache_key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        logger.info("object %s resolved: %s/%s", key.describe(), GRAPH_SETS.get(entity_set, entity_set), object_id)
        return result


__all__ = [
    "ObjectDecider", "ObjectKey", "ObjectLookupFailed", "ObjectNotFound", "ObjectResolver", "decide",
    "deciding_rules", "literal_object_rules", "object_key", "resolved_operation", "unresolved",
]
