"""The policy: which verified identities may perform which Graph and Entra operations.

A policy is one YAML file. Every mistake in it is reported as :class:`PolicyError` with
``file:line:column``, what is wrong and what to do, and nothing else ever escapes the loader, so a
bad edit stops a start (or is refused on reload, keeping the last good policy) instead of failing
requests later.

Schema (``policies/example.yaml`` is a commented, working example)::

    version: 1                                   # required; the only version is 1
    identity:                                    # required: which tokens the gateway accepts at all
      tenants: [<tenant GUID>, ...]              # required, non-empty allow-list of tenant ids (tid)
      audiences: [https://graph.microsoft.com, ...]  # required, non-empty; compared exactly with aud
      issuers:                                   # required, non-empty; {tenantid} becomes the token's tid
        - https://login.microsoftonline.com/{tenantid}/v2.0  # discovery: <issuer>/.well-known/...
        - issuer: https://sts.windows.net/{tenantid}/          # or a mapping with an explicit discovery URL
          discovery: https://login.microsoftonline.com/{tenantid}/.well-known/openid-configuration
      leeway_seconds: 60                         # optional, default 60, 0..300 (clock skew for exp/nbf)
      client_secret_grants: flag                 # optional, default flag; allow | flag | refuse (see below)
    upstreams:                                   # required (may be empty): the only hosts reachable at all
      - host: graph.microsoft.com
        token: any                               # optional, default any; any | proxy | bearer | both | none
    masking:                                     # optional
      default_profile: directory-pii             # optional; used by allow rules without `mask`
      profiles:
        directory-pii:
          fields: [mail, mobilePhone]            # JSON member names masked wherever they occur
    rules:                                       # optional, default none (= deny everything)
      - id: directory-read                       # required, unique; letters, digits, . _ : -
        description: ...                         # optional
        action: allow                            # required; allow | deny
        when: {app_ids: [<GUID>]}                # optional; who (see below)
        operations:                              # required, non-empty; what (see below)
          - host: graph.microsoft.com            # required; must be listed under upstreams
            methods: [GET]                       # required; GET HEAD POST PUT PATCH DELETE OPTIONS or "*"
            paths: ["/users", "/users/{id}"]     # required, non-empty
            versions: [v1.0]                     # optional, Graph hosts only; default v1.0 and beta
        mask: directory-pii                      # optional, allow rules only; a masking profile name

An issuer without ``{tenantid}`` is a single-tenant issuer. ``https://sts.windows.net/{tenantid}/``
(the v1 issuer) defaults to the v1 discovery document on login.microsoftonline.com, because
sts.windows.net serves no metadata of its own.

``token`` says which token sources a request to the host must present: ``any`` (at least one of
Proxy-Authorization on CONNECT or Authorization: Bearer), ``proxy``, ``bearer``, ``both``, or
``none`` (no token is looked for: the Entra token endpoint, where callers have none yet).

``client_secret_grants`` says what happens to a token request (a POST to an Entra token
endpoint, see :mod:`nhi_gateway.token_requests`) that authenticates the client with a static
secret (``client_secret`` in the body or HTTP Basic): ``allow`` forwards it; ``flag`` (the default)
forwards it and the decision carries the flag ``client_secret_grant`` (a request that cannot be
classified carries ``unclassified_grant``); ``refuse`` answers 403 and forwards only certificate
and federated credential grants, so a request the gateway cannot classify is refused too. The
request is first judged by the rules like any other; the grant check applies to allowed ones.

``when`` (the principal): every key given must match (AND); inside a list any element matches
(OR). Keys:

- ``app_ids``, ``object_ids``, ``groups``, ``tenants``: GUIDs, compared case-insensitively.
- ``roles``: app role values (the token's ``roles``), compared case-insensitively.
- ``auth_methods``: how the identity authenticated to Entra, from ``appidacr``/``azpacr``:
  ``certificate`` ("2": certificate, federated credential or managed identity; Entra's token does
  not tell these apart), ``client_secret`` ("1"), ``public_client`` ("0") or ``unknown`` (no or
  another value). ``auth_methods: [certificate]`` keeps identities with static secrets out.
- ``app_only``: ``true`` matches app-only tokens (``idtyp: app``; without ``idtyp``, no ``scp``),
  ``false`` delegated (user) tokens.
- ``token_sources``: ``proxy`` and/or ``bearer``; matches when the request presented its token in
  at least one of the listed places (a request carrying both matches either). To require both,
  set the upstream's ``token: both``.
- ``managed_identities``: ARM resource ids, the token's ``xms_mirid``
  (``/subscriptions/<id>/resourcegroups/<rg>/providers/Microsoft.ManagedIdentity/
  userAssignedIdentities/<name>``), compared case-insensitively. Never matches a caller that is
  not a managed identity.
- ``anonymous``: ``true`` matches only requests without a verified principal and cannot be
  combined with other keys; every other rule never matches an anonymous request.

``when: {}`` or no ``when`` matches any verified principal. The grant of a token request is not a
``when`` key: token requests are anonymous (the caller has no token yet) and what is asked of
them is said once, by ``identity.client_secret_grants``.

Paths are matched against the canonical path of :mod:`nhi_gateway.operation` (decoded once,
case-folded, ``users('x')`` read as ``users/x``, ``applications(appId='x')`` as
``applications/appid=x``). A pattern is written in that form: ``{name}`` or ``*`` matches exactly
one segment, ``**`` (last segment only) matches zero or more segments, anything else matches
literally and case-insensitively. On Graph hosts a pattern may start with a version
(``/v1.0/users``); without one it matches ``/v1.0`` and ``/beta`` unless ``versions`` narrows it.

Decisions: a matching ``deny`` rule wins over every ``allow`` (the first in file order is
reported); otherwise the first matching ``allow`` rule decides; otherwise the request is refused
because no rule allows it.
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from nhi_gateway.decision import Action, Decision, Stage
from nhi_gateway.operation import GRAPH_HOSTS, GRAPH_VERSIONS, Operation, OperationError, normalize_host
from nhi_gateway.principal import AuthMethod, Principal, TokenSource

REFUSAL_STATUS = 403
REFUSAL_CODE = "Authorization_RequestDenied"
DEFAULT_LEEWAY = 60
MAX_LEEWAY = 300
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ANY_METHOD = "*"

_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]*")
_PLACEHOLDER = re.compile(r"\{[^}]*\}")
_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_BAD_LITERAL = re.compile(r"[{}*%\\\s\x00-\x1f\x7f?#]")
_STS_V1 = "https://sts.windows.net/{tenantid}/"
_STS_V1_DISCOVERY = "https://login.microsoftonline.com/{tenantid}/.well-known/openid-configuration"
# xms_mirid: /subscriptions/<sub>/resourcegroups/<rg>/providers/<namespace>/<type>/<name>[/...]
_ARM_ID = re.compile(r"/subscriptions/[^/\s]+/resourcegroups/[^/\s]+/providers/[^/\s]+(/[^/\s]+){2,}", re.I)


# --- errors -------------------------------------------------------------------------------------


class PolicyError(Exception):
    """A policy file that cannot be used, with where (1-based line and column) and what to do.

    ``line == 0`` means the error has no position (the file could not be read at all).
    """

    def __init__(self, source: str, line: int, column: int, message: str, hint: str = "") -> None:
        self.source = str(source)
        self.line = line
        self.column = column
        self.message = message
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}:{self.column}" if self.line else self.source
        text = f"{where}: {self.message}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text


# --- the policy's parts --------------------------------------------------------------------------


class TokenRequirement(StrEnum):
    """Which token sources a request to an upstream must present."""

    ANY = "any"
    PROXY = "proxy"
    BEARER = "bearer"
    BOTH = "both"
    NONE = "none"


@dataclass(frozen=True)
class Upstream:
    host: str
    token: TokenRequirement = TokenRequirement.ANY


@dataclass(frozen=True)
class IssuerConfig:
    template: str  # e.g. https://login.microsoftonline.com/{tenantid}/v2.0
    discovery_template: str

    def issuer(self, tenant_id: str) -> str:
        return self.template.replace("{tenantid}", tenant_id)

    def discovery(self, tenant_id: str) -> str:
        return self.discovery_template.replace("{tenantid}", tenant_id)


class ClientSecretGrants(StrEnum):
    """What happens to token requests that authenticate with a static client secret."""

    ALLOW = "allow"
    FLAG = "flag"  # forwarded; the decision carries the flag "client_secret_grant"
    REFUSE = "refuse"  # 403: only certificate and federated credential grants are forwarded


@dataclass(frozen=True)
class IdentityConfig:
    tenants: frozenset[str]  # lower-case GUIDs
    audiences: frozenset[str]
    issuers: tuple[IssuerConfig, ...]
    leeway_seconds: int = DEFAULT_LEEWAY
    client_secret_grants: ClientSecretGrants = ClientSecretGrants.FLAG


@dataclass(frozen=True)
class MaskProfile:
    name: str
    fields: frozenset[str]


@dataclass(frozen=True)
class PrincipalMatch:
    """A rule's ``when``. ``None`` means the key was not given (matches anything)."""

    anonymous: bool = False
    app_ids: frozenset[str] | None = None  # lower-case
    object_ids: frozenset[str] | None = None  # lower-case
    groups: frozenset[str] | None = None  # lower-case
    roles: frozenset[str] | None = None  # case-folded
    tenants: frozenset[str] | None = None  # lower-case
    auth_methods: frozenset[AuthMethod] | None = None
    app_only: bool | None = None
    token_sources: frozenset[TokenSource] | None = None  # any of them
    managed_identities: frozenset[str] | None = None  # lower-case ARM ids (xms_mirid)

    def matches(self, principal: Principal | None) -> bool:
        if principal is None or self.anonymous:
            return principal is None and self.anonymous
        if self.tenants is not None and principal.tenant_id.lower() not in self.tenants:
            return False
        if self.auth_methods is not None and principal.auth_method not in self.auth_methods:
            return False
        if self.app_only is not None and principal.app_only is not self.app_only:
            return False
        if self.token_sources is not None and self.token_sources.isdisjoint(principal.token_sources):
            return False
        if (
            self.managed_identities is not None
            and principal.managed_identity.lower() not in self.managed_identities
        ):
            return False
        if self.app_ids is not None and principal.app_id.lower() not in self.app_ids:
            return False
        if self.object_ids is not None and principal.object_id.lower() not in self.object_ids:
            return False
        if self.groups is not None and not any(g.lower() in self.groups for g in principal.groups):
            return False
        if self.roles is not None and not any(r.casefold() in self.roles for r in principal.roles):
            return False
        return True

    def index_keys(self) -> Iterator[tuple[str, ...]]:
        """The buckets this rule is filed under: its most selective key, so a principal only ever
        looks at rules that could name it (see :func:`_principal_keys`)."""
        if self.anonymous:
            yield ("anonymous",)
            return
        # auth_methods, app_only and token_sources have a handful of values each: as buckets they
        # would not narrow anything, so they are checked by matches() on the few candidates.
        for name in ("object_ids", "app_ids", "managed_identities", "groups", "roles", "tenants"):
            values = getattr(self, name)
            if values is not None:
                for v in sorted(values):
                    yield (name, v)
                return
        yield ("any",)


def _principal_keys(principal: Principal | None) -> list[tuple[str, ...]]:
    if principal is None:
        return [("anonymous",)]
    keys: list[tuple[str, ...]] = [
        ("any",),
        ("object_ids", principal.object_id.lower()),
        ("app_ids", principal.app_id.lower()),
        ("tenants", principal.tenant_id.lower()),
    ]
    if principal.managed_identity:
        keys.append(("managed_identities", principal.managed_identity.lower()))
    keys += [("groups", g.lower()) for g in set(principal.groups)]
    keys += [("roles", r.casefold()) for r in set(principal.roles)]
    return keys


@dataclass(frozen=True)
class PathPattern:
    text: str  # as written in the policy
    segments: tuple[str, ...]  # canonical: literal, "*" (one segment) or "**" (last: zero or more)
    versions: frozenset[str]  # "" for hosts without versions

    def matches(self, op: Operation) -> bool:
        if op.version not in self.versions:
            return False
        segs, pat = op.segments, self.segments
        if pat and pat[-1] == "**":
            pat = pat[:-1]
            if len(segs) < len(pat):
                return False
        elif len(segs) != len(pat):
            return False
        return all(p == "*" or p == s for p, s in zip(pat, segs, strict=False))


@dataclass(frozen=True)
class OperationMatch:
    host: str
    methods: frozenset[str]  # upper-case, or {"*"}
    paths: tuple[PathPattern, ...]

    def matches(self, op: Operation) -> bool:
        if op.host != self.host:
            return False
        if ANY_METHOD not in self.methods and op.method not in self.methods:
            return False
        return any(p.matches(op) for p in self.paths)


@dataclass(frozen=True)
class Rule:
    id: str
    action: Action
    operations: tuple[OperationMatch, ...]
    when: PrincipalMatch = field(default_factory=PrincipalMatch)
    mask: str | None = None
    description: str = ""
    line: int = 0  # 1-based line of the rule in its file, for lint and explain output

    def matches(self, principal: Principal | None, op: Operation) -> bool:
        """The plain reading of the rule; :meth:`Policy.decide` uses an index that must agree."""
        return self.when.matches(principal) and any(o.matches(op) for o in self.operations)


# --- the decision engine ---------------------------------------------------------------------


class _PathNode:
    """One level of a segment trie: rules whose patterns end here, or continue with ``**``."""

    __slots__ = ("literal", "wild", "end", "tail")

    def __init__(self) -> None:
        self.literal: dict[str, _PathNode] = {}
        self.wild: _PathNode | None = None
        self.end: list[int] = []
        self.tail: list[int] = []

    def insert(self, segments: tuple[str, ...], rule_index: int) -> None:
        node = self
        for seg in segments:
            if seg == "**":
                node.tail.append(rule_index)
                return
            if seg == "*":
                node.wild = node.wild or _PathNode()
                node = node.wild
            else:
                node = node.literal.setdefault(seg, _PathNode())
        node.end.append(rule_index)

    def collect(self, segments: tuple[str, ...], out: set[int]) -> None:
        # Iterative: a trie node sits at one depth, so the work is bounded by the trie, not by
        # the number of ways a path could be matched, and a very long path cannot recurse deeply.
        stack = [(self, 0)]
        n = len(segments)
        while stack:
            node, i = stack.pop()
            out.update(node.tail)
            if i == n:
                out.update(node.end)
                continue
            child = node.literal.get(segments[i])
            if child is not None:
                stack.append((child, i + 1))
            if node.wild is not None:
                stack.append((node.wild, i + 1))


class Policy:
    """A loaded policy. Immutable once built; :meth:`decide` is safe to call from any thread."""

    def __init__(
        self,
        source: str,
        identity: IdentityConfig,
        upstreams: Iterable[Upstream],
        mask_profiles: dict[str, MaskProfile],
        rules: Iterable[Rule],
        default_profile: str | None = None,
    ) -> None:
        self.source = str(source)
        self.identity = identity
        self.upstreams = tuple(upstreams)
        self._upstreams = {u.host: u for u in self.upstreams}
        self.mask_profiles = dict(mask_profiles)
        self.default_profile = default_profile
        self.rules = tuple(rules)
        self._rules_by_id = {r.id: r for r in self.rules}
        # (principal key, host, method, version) -> trie of path segments -> rule indices.
        # A decision looks up a handful of buckets and walks one short trie in each, so its cost
        # follows the rules that could apply to this principal and path, not the size of the file.
        self._index: dict[tuple, _PathNode] = {}
        for i, rule in enumerate(self.rules):
            for pkey in rule.when.index_keys():
                for om in rule.operations:
                    for pattern in om.paths:
                        for version in pattern.versions:
                            for method in om.methods:
                                root = self._index.get((pkey, om.host, method, version))
                                if root is None:
                                    root = self._index[(pkey, om.host, method, version)] = _PathNode()
                                root.insert(pattern.segments, i)

    def __repr__(self) -> str:
        return f"<Policy {self.source} rules={len(self.rules)}>"

    def upstream(self, host: str) -> Upstream | None:
        try:
            return self._upstreams.get(normalize_host(host))
        except OperationError:
            return None

    def rule(self, rule_id: str) -> Rule | None:
        return self._rules_by_id.get(rule_id)

    def matching_rules(self, principal: Principal | None, op: Operation) -> list[Rule]:
        """Every rule that matches, in file order: what ``explain`` shows."""
        candidates: set[int] = set()
        segments = op.segments
        for pkey in _principal_keys(principal):
            for method in (op.method, ANY_METHOD):
                root = self._index.get((pkey, op.host, method, op.version))
                if root is not None:
                    root.collect(segments, candidates)
        rules = (self.rules[i] for i in sorted(candidates))
        return [r for r in rules if r.when.matches(principal)]

    def decide(self, principal: Principal | None, op: Operation) -> Decision:
        matched = self.matching_rules(principal, op)
        who = principal.to_dict() if principal is not None else None
        deny = next((r for r in matched if r.action is Action.DENY), None)
        if deny is not None:
            return Decision.deny(
                Stage.POLICY,
                REFUSAL_STATUS,
                REFUSAL_CODE,
                f"denied by rule '{deny.id}'",
                rule_id=deny.id,
                operation=str(op),
                principal=who,
            )
        if matched:
            allow = matched[0]
            return Decision(
                action=Action.ALLOW,
                stage=Stage.POLICY,
                reason=f"allowed by rule '{allow.id}'",
                rule_id=allow.id,
                operation=str(op),
                principal=who,
                mask_profile=allow.mask or self.default_profile,
            )
        return Decision.deny(
            Stage.POLICY,
            REFUSAL_STATUS,
            REFUSAL_CODE,
            f"no rule allows {op}",
            operation=str(op),
            principal=who,
        )


class PolicyStore:
    """The current policy of a running gateway. ``reload()`` swaps in a new policy only when it
    loads cleanly; otherwise it raises the :class:`PolicyError` and the last good policy stays.

    Readers take ``store.current`` once per request: the swap is a single reference assignment,
    so a request never sees half of one policy and half of another.
    """

    def __init__(self, policy: Policy | str | Path) -> None:
        """From a loaded policy (reloads read ``policy.source``) or from a path, loaded now."""
        if isinstance(policy, Policy):
            self._path = Path(policy.source)
            self._policy = policy
        else:
            self._path = Path(policy)
            self._policy = load_policy(self._path)
        self._lock = threading.Lock()
        self._generation = 1

    @property
    def path(self) -> Path:
        return self._path

    @property
    def current(self) -> Policy:
        return self._policy

    @property
    def generation(self) -> int:
        """Counts successful loads, so caches keyed on the policy can tell it changed."""
        return self._generation

    def reload(self) -> Policy:
        with self._lock:  # two reloads racing must not install the older file last
            policy = load_policy(self._path)
            self._policy = policy
            self._generation += 1
            return policy


# --- loading -------------------------------------------------------------------------------------


def load_policy(path: str | Path) -> Policy:
    """Read and check a policy file; raises :class:`PolicyError` and nothing else."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PolicyError(source, 0, 0, f"cannot read the policy file: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - the loader's promise is PolicyError only
        raise PolicyError(source, 0, 0, f"cannot read the policy file: {e}") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1  # in bytes: the text has no columns yet
        raise PolicyError(source, line, col, "the policy file is not UTF-8", "save it as UTF-8") from e
    return parse_policy(text, source)


def parse_policy(text: str | bytes, source_name: str = "<policy>") -> Policy:
    """Parse and check policy text; raises :class:`PolicyError` and nothing else."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8-sig")
        return _Loader(source_name, text).load()
    except PolicyError:
        raise
    except RecursionError as e:
        raise PolicyError(source_name, 1, 1, "the policy is nested too deeply to read") from e
    except UnicodeDecodeError as e:
        raise PolicyError(source_name, 1, 1, "the policy text is not UTF-8", "save it as UTF-8") from e
    except Exception as e:  # noqa: BLE001 - the loader's promise is PolicyError only
        raise PolicyError(
            source_name,
            1,
            1,
            f"could not read the policy ({type(e).__name__}: {e})",
            "this is a bug in nhi-gateway's policy loader; please report it with the file",
        ) from e


def _line_col(text: str, offset: int) -> tuple[int, int]:
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


Pos = tuple[int, int]  # 0-based, as ruamel.yaml reports them


@dataclass(frozen=True)
class _Value:
    """A YAML value with where it was written."""

    value: Any
    pos: Pos
    key_pos: Pos | None = None  # where the key that holds it was written, for "missing key" errors


def _kind(v: object) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list | tuple):  # tuple: ruamel's complex key "? [a, b]"
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, date):
        return "a date"
    if isinstance(v, bytes):
        return "binary data"
    if type(v).__name__ == "TaggedScalar":
        return "a value with a custom tag"
    return f"a {type(v).__name__}"


def _lc(fn, *args) -> Pos | None:
    try:
        line, col = fn(*args)
        return (int(line), int(col))
    except Exception:  # noqa: BLE001 - merged (<<) keys and odd nodes have no recorded position
        return None


def _node_pos(node: object, default: Pos) -> Pos:
    lc = getattr(node, "lc", None)
    if lc is not None and getattr(lc, "line", None) is not None:
        return (lc.line, lc.col)
    return default


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean '{close[0]}'?" if close else ""


class _Loader:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.text = text
        self.profiles: dict[str, MaskProfile] = {}
        self.upstream_hosts: set[str] = set()
        self.tenants: frozenset[str] = frozenset()

    def fail(self, pos: Pos, message: str, hint: str = "") -> NoReturn:
        raise PolicyError(self.source, pos[0] + 1, pos[1] + 1, message, hint)

    # -- YAML ----------------------------------------------------------------------------------

    def read_yaml(self) -> Any:
        from ruamel.yaml import YAML
        from ruamel.yaml.error import MarkedYAMLError, YAMLError
        from ruamel.yaml.reader import ReaderError

        yaml = YAML(typ="rt")  # round-trip: keeps .lc line/column on every mapping and list
        try:
            return yaml.load(self.text)
        except MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            problem = e.problem or e.context or "invalid YAML"
            if e.problem and e.context and e.problem.startswith("but "):
                problem = f"{e.context}, {e.problem}"  # "expected X, but found Y"
            elif e.problem and e.context:
                problem = f"{e.problem} ({e.context})"
            message = f"YAML syntax error: {problem}"
            hint = "check the indentation and quoting at this position"
            if "duplicate key" in problem:
                hint = "each key may appear only once in a mapping"
            elif "'\\t'" in problem:
                hint = "indent YAML with spaces, not tabs"
            elif "another document" in problem:
                hint = "a policy file holds one YAML document: remove the '---' line"
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            raise PolicyError(self.source, line, col, message, hint) from e
        except ReaderError as e:
            line, col = _line_col(self.text, e.position or 0)
            raise PolicyError(
                self.source, line, col, f"YAML cannot contain this character: {e.reason}"
            ) from e
        except YAMLError as e:
            raise PolicyError(self.source, 1, 1, f"YAML error: {e}") from e

    # -- generic shapes ------------------------------------------------------------------------

    def entries(self, node: _Value, what: str) -> list[tuple[str, Pos, _Value]]:
        """The (key, key position, value) of a mapping; keys must be strings."""
        m = node.value
        if not isinstance(m, dict):
            self.fail(node.pos, f"{what} must be a mapping, not {_kind(m)}")
        pos = _node_pos(m, node.pos)
        lc = getattr(m, "lc", None)
        out = []
        for k, v in m.items():
            kpos = (_lc(lc.key, k) if lc is not None else None) or pos
            if not isinstance(k, str):
                self.fail(kpos, f"{what}: keys must be strings, not {_kind(k)}")
            vpos = (_lc(lc.value, k) if lc is not None else None) or kpos
            out.append((k, kpos, _Value(v, _node_pos(v, vpos) if isinstance(v, dict | list) else vpos, kpos)))
        return out

    def mapping(self, node: _Value, what: str, keys: dict[str, bool]) -> dict[str, _Value]:
        """Check ``node`` is a mapping with only ``keys`` (name -> required); null values are
        treated as absent."""
        out: dict[str, _Value] = {}
        for k, kpos, v in self.entries(node, what):
            if k not in keys:
                allowed = ", ".join(keys)
                self.fail(kpos, f"unknown key '{k}' in {what}; allowed keys: {allowed}", _suggest(k, keys))
            if v.value is not None:
                out[k] = v
            elif keys[k]:
                self.fail(kpos, f"{what}: '{k}' has no value")
        for k, required in keys.items():
            if required and k not in out:
                self.fail(node.key_pos or node.pos, f"{what} is missing the required key '{k}'")
        return out

    def seq(self, node: _Value, what: str, *, non_empty: bool = False, hint: str = "") -> list[_Value]:
        s = node.value
        if not isinstance(s, list):
            example = f"write [{s}]" if isinstance(s, str | int) and not isinstance(s, bool) else hint
            self.fail(node.pos, f"{what} must be a list, not {_kind(s)}", example)
        if non_empty and not s:
            self.fail(node.pos, f"{what} must not be empty", hint)
        base = _node_pos(s, node.pos)
        items = []
        for i, v in enumerate(s):
            ipos = (_lc(s.lc.item, i) if hasattr(s, "lc") else None) or base
            items.append(_Value(v, _node_pos(v, ipos) if isinstance(v, dict | list) else ipos))
        return items

    def string(self, node: _Value, what: str, hint: str = "") -> str:
        if not isinstance(node.value, str):
            self.fail(node.pos, f"{what} must be a string, not {_kind(node.value)}", hint)
        if not node.value.strip():
            self.fail(node.pos, f"{what} must not be empty", hint)
        return str(node.value)

    def strings(self, node: _Value, what: str, hint: str = "") -> list[tuple[str, Pos]]:
        return [
            (self.string(v, f"{what}[{i}]", hint), v.pos)
            for i, v in enumerate(self.seq(node, what, non_empty=True, hint=hint))
        ]

    def guids(self, node: _Value, what: str) -> list[tuple[str, Pos]]:
        """Lower-cased GUIDs with their positions."""
        out = []
        for i, (value, pos) in enumerate(self.strings(node, what)):
            if not _GUID.fullmatch(value.strip()):
                self.fail(
                    pos,
                    f"{what}[{i}]: '{value}' is not a GUID",
                    "use the object's id GUID (e.g. 72f988bf-86f1-41af-91ab-2d7cd011db47), "
                    "not a name or domain",
                )
            out.append((value.strip().lower(), pos))
        return out

    def integer(self, node: _Value, what: str, lo: int, hi: int) -> int:
        v = node.value
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(node.pos, f"{what} must be a whole number, not {_kind(v)}")
        if not lo <= v <= hi:
            self.fail(node.pos, f"{what} must be between {lo} and {hi}, not {v}")
        return int(v)

    def choice(self, node: _Value, what: str, choices: Iterable[str]) -> str:
        choices = list(choices)
        value = self.string(node, what, f"one of: {', '.join(choices)}")
        if value not in choices:
            hint = _suggest(value, choices) or f"use one of: {', '.join(choices)}"
            self.fail(node.pos, f"{what} must be one of {', '.join(choices)}, not '{value}'", hint)
        return value

    # -- the policy ----------------------------------------------------------------------------

    def load(self) -> Policy:
        doc = self.read_yaml()
        if doc is None:
            raise PolicyError(
                self.source,
                1,
                1,
                "the policy file is empty",
                "start with 'version: 1'; see policies/example.yaml",
            )
        top = self.mapping(
            _Value(doc, (0, 0)),
            "the policy",
            {"version": True, "identity": True, "upstreams": True, "masking": False, "rules": False},
        )
        version = top["version"]
        if isinstance(version.value, bool) or version.value != 1 or not isinstance(version.value, int):
            self.fail(
                version.pos,
                f"unsupported policy version {version.value!r}",
                "this gateway reads 'version: 1'",
            )
        identity = self.identity(top["identity"])
        upstreams = self.upstreams(top["upstreams"])
        default_profile = self.masking(top["masking"]) if "masking" in top else None
        rules = self.rules(top["rules"]) if "rules" in top else []
        return Policy(self.source, identity, upstreams, self.profiles, rules, default_profile)

    def identity(self, node: _Value) -> IdentityConfig:
        m = self.mapping(
            node,
            "identity",
            {
                "tenants": True,
                "audiences": True,
                "issuers": True,
                "leeway_seconds": False,
                "client_secret_grants": False,
            },
        )
        self.tenants = frozenset(t for t, _ in self.guids(m["tenants"], "identity.tenants"))
        audiences = frozenset(a.strip() for a, _ in self.strings(m["audiences"], "identity.audiences"))
        issuers = tuple(
            self.issuer(item, f"identity.issuers[{i}]")
            for i, item in enumerate(self.seq(m["issuers"], "identity.issuers", non_empty=True))
        )
        leeway = DEFAULT_LEEWAY
        if "leeway_seconds" in m:
            leeway = self.integer(m["leeway_seconds"], "identity.leeway_seconds", 0, MAX_LEEWAY)
        secret_grants = ClientSecretGrants.FLAG
        if "client_secret_grants" in m:
            secret_grants = ClientSecretGrants(
                self.choice(
                    m["client_secret_grants"],
                    "identity.client_secret_grants",
                    [c.value for c in ClientSecretGrants],
                )
            )
        return IdentityConfig(self.tenants, audiences, issuers, leeway, secret_grants)

    def issuer(self, node: _Value, what: str) -> IssuerConfig:
        if isinstance(node.value, dict):
            m = self.mapping(node, what, {"issuer": True, "discovery": False})
            template = self.url(m["issuer"], f"{what}.issuer")
            discovery = self.url(m["discovery"], f"{what}.discovery") if "discovery" in m else None
        else:
            template = self.url(node, what)
            discovery = None
        if discovery is None:
            if template == _STS_V1:
                discovery = _STS_V1_DISCOVERY  # sts.windows.net serves no metadata itself
            else:
                discovery = template.rstrip("/") + "/.well-known/openid-configuration"
        return IssuerConfig(template, discovery)

    def url(self, node: _Value, what: str) -> str:
        hint = "e.g. https://login.microsoftonline.com/{tenantid}/v2.0"
        value = self.string(node, what, hint).strip()
        for placeholder in _PLACEHOLDER.findall(value):
            if placeholder != "{tenantid}":
                self.fail(
                    node.pos,
                    f"{what}: unknown placeholder {placeholder}",
                    "the only placeholder is {tenantid}",
                )
        try:
            parts = urlsplit(value.replace("{tenantid}", "t"))
            ok = parts.scheme == "https" and bool(parts.hostname)
        except ValueError:
            ok = False
        if not ok:
            self.fail(node.pos, f"{what}: '{value}' is not an https URL", hint)
        return value

    def upstreams(self, node: _Value) -> list[Upstream]:
        out = []
        for i, item in enumerate(self.seq(node, "upstreams")):
            what = f"upstreams[{i}]"
            m = self.mapping(item, what, {"host": True, "token": False})
            host = self.host(m["host"], f"{what}.host")
            if host in self.upstream_hosts:
                self.fail(m["host"].pos, f"{what}: host '{host}' is listed twice")
            self.upstream_hosts.add(host)
            token = TokenRequirement.ANY
            if "token" in m:
                token = TokenRequirement(
                    self.choice(m["token"], f"{what}.token", [t.value for t in TokenRequirement])
                )
            out.append(Upstream(host, token))
        return out

    def host(self, node: _Value, what: str) -> str:
        value = self.string(node, what, "a host name such as graph.microsoft.com")
        try:
            return normalize_host(value)
        except OperationError:
            self.fail(
                node.pos,
                f"{what}: '{value}' is not a host name",
                "write the host only, without scheme, port or path",
            )

    def masking(self, node: _Value) -> str | None:
        m = self.mapping(node, "masking", {"default_profile": False, "profiles": False})
        if "profiles" in m:
            for name, kpos, pnode in self.entries(m["profiles"], "masking.profiles"):
                what = f"masking profile '{name}'"
                if not _RULE_ID.fullmatch(name):
                    self.fail(kpos, f"{what}: invalid name", "use letters, digits and . _ : -")
                fields = self.mapping(pnode, what, {"fields": True})
                names = frozenset(f.strip() for f, _ in self.strings(fields["fields"], f"{what}.fields"))
                self.profiles[name] = MaskProfile(name, names)
        if "default_profile" in m:
            return self.profile_ref(m["default_profile"], "masking.default_profile")
        return None

    def profile_ref(self, node: _Value, what: str) -> str:
        name = self.string(node, what)
        if name not in self.profiles:
            known = ", ".join(self.profiles) or "none are defined"
            hint = _suggest(name, self.profiles) or f"define it under masking.profiles (known: {known})"
            self.fail(node.pos, f"{what}: unknown mask profile '{name}'", hint)
        return name

    def rules(self, node: _Value) -> list[Rule]:
        rules: list[Rule] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(self.seq(node, "rules")):
            rule, id_pos = self.rule(item, i)
            if rule.id in seen:
                self.fail(
                    id_pos,
                    f"duplicate rule id '{rule.id}'",
                    f"the first rule with this id is at line {seen[rule.id]}",
                )
            seen[rule.id] = rule.line
            rules.append(rule)
        return rules

    def rule(self, node: _Value, index: int) -> tuple[Rule, Pos]:
        keys = {
            "id": True,
            "description": False,
            "action": True,
            "when": False,
            "operations": True,
            "mask": False,
        }
        if isinstance(node.value, dict) and isinstance(node.value.get("id"), str):
            what = f"rule '{node.value['id']}'"
        else:
            what = f"rules[{index}]"
        m = self.mapping(node, what, keys)
        rule_id = self.string(m["id"], f"{what}: id")
        if not _RULE_ID.fullmatch(rule_id):
            self.fail(
                m["id"].pos,
                f"{what}: invalid rule id '{rule_id}'",
                "use letters, digits and . _ : - (no spaces)",
            )
        action = Action(self.choice(m["action"], f"{what}: action", [a.value for a in Action]))
        description = self.string(m["description"], f"{what}: description") if "description" in m else ""
        when = self.when(m["when"], what) if "when" in m else PrincipalMatch()
        operations = tuple(
            self.operation(item, f"{what}: operations[{i}]")
            for i, item in enumerate(self.seq(m["operations"], f"{what}: operations", non_empty=True))
        )
        mask = None
        if "mask" in m:
            if action is Action.DENY:
                self.fail(m["mask"].pos, f"{what}: 'mask' has no effect on a deny rule", "remove it")
            mask = self.profile_ref(m["mask"], f"{what}: mask")
        return Rule(rule_id, action, operations, when, mask, description, node.pos[0] + 1), m["id"].pos

    def when(self, node: _Value, rule: str) -> PrincipalMatch:
        what = f"{rule}: when"
        keys = {
            "anonymous": False,
            "app_ids": False,
            "object_ids": False,
            "groups": False,
            "roles": False,
            "tenants": False,
            "auth_methods": False,
            "app_only": False,
            "token_sources": False,
            "managed_identities": False,
        }
        m = self.mapping(node, what, keys)
        anonymous = self.boolean(m["anonymous"], f"{what}.anonymous") if "anonymous" in m else False
        if anonymous and len(m) > 1:
            other = next(k for k in m if k != "anonymous")
            self.fail(
                m[other].pos,
                f"{what}: '{other}' cannot be combined with anonymous: true",
                "an anonymous request has no identity to match; write two rules",
            )
        found: dict[str, Any] = {}
        for k in ("app_ids", "object_ids", "groups", "tenants"):
            if k in m:
                found[k] = frozenset(g for g, _ in self.guids(m[k], f"{what}.{k}"))
        if "roles" in m:
            found["roles"] = frozenset(
                r.strip().casefold() for r, _ in self.strings(m["roles"], f"{what}.roles")
            )
        if "tenants" in m:
            for i, (tenant, pos) in enumerate(self.guids(m["tenants"], f"{what}.tenants")):
                if tenant not in self.tenants:
                    self.fail(
                        pos,
                        f"{what}.tenants[{i}]: tenant '{tenant}' is not in identity.tenants, "
                        "so this never matches",
                        "add it to identity.tenants or remove it here",
                    )
        if "auth_methods" in m:
            found["auth_methods"] = frozenset(
                AuthMethod(self.auth_method(v, f"{what}.auth_methods[{i}]"))
                for i, v in enumerate(self.seq(m["auth_methods"], f"{what}.auth_methods", non_empty=True))
            )
        if "app_only" in m:
            found["app_only"] = self.boolean(m["app_only"], f"{what}.app_only")
        if "token_sources" in m:
            found["token_sources"] = frozenset(
                TokenSource(self.choice(v, f"{what}.token_sources[{i}]", [t.value for t in TokenSource]))
                for i, v in enumerate(self.seq(m["token_sources"], f"{what}.token_sources", non_empty=True))
            )
        if "managed_identities" in m:
            ids = self.strings(m["managed_identities"], f"{what}.managed_identities")
            found["managed_identities"] = frozenset(
                self.arm_id(value, pos, f"{what}.managed_identities[{i}]") for i, (value, pos) in enumerate(ids)
            )
        return PrincipalMatch(anonymous=anonymous, **found)

    def boolean(self, node: _Value, what: str) -> bool:
        if not isinstance(node.value, bool):
            self.fail(
                node.pos,
                f"{what} must be true or false, not {_kind(node.value)}",
                "YAML 1.2: write true, not yes",
            )
        return node.value

    def auth_method(self, node: _Value, what: str) -> str:
        value = node.value.strip() if isinstance(node.value, str) else node.value
        if value in ("federated", "federated_credential", "managed_identity"):
            # appidacr/azpacr "2" covers all three: a rule cannot tell them apart, so say so.
            self.fail(
                node.pos,
                f"{what}: '{value}' is not told apart by Entra's tokens",
                "appidacr/azpacr \"2\" means certificate, federated credential or managed identity "
                "alike: write certificate (and managed_identities to name managed identities)",
            )
        choices = [AuthMethod.CERTIFICATE, AuthMethod.CLIENT_SECRET, AuthMethod.PUBLIC_CLIENT, AuthMethod.UNKNOWN]
        return self.choice(_Value(value, node.pos, node.key_pos), what, [str(a) for a in choices])

    def arm_id(self, value: str, pos: Pos, what: str) -> str:
        value = value.strip()
        if not _ARM_ID.fullmatch(value):
            self.fail(
                pos,
                f"{what}: '{value}' is not an Azure resource id",
                "use the token's xms_mirid, e.g. /subscriptions/<subscription>/resourcegroups/<group>"
                "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>",
            )
        return value.lower()

    def operation(self, node: _Value, what: str) -> OperationMatch:
        m = self.mapping(node, what, {"host": True, "methods": True, "paths": True, "versions": False})
        host = self.host(m["host"], f"{what}.host")
        if host not in self.upstream_hosts:
            self.fail(
                m["host"].pos,
                f"{what}: host '{host}' is not listed under upstreams",
                "the gateway refuses every host not under upstreams; add it there",
            )
        graph = host in GRAPH_HOSTS
        methods = set()
        for i, (method, pos) in enumerate(
            self.strings(m["methods"], f"{what}.methods", 'e.g. [GET] or ["*"]')
        ):
            method = method.strip().upper()
            if method != ANY_METHOD and method not in METHODS:
                self.fail(
                    pos,
                    f"{what}.methods[{i}]: unknown method '{method}'",
                    _suggest(method, METHODS) or f'use {", ".join(METHODS)} or "*"',
                )
            methods.add(method)
        if ANY_METHOD in methods:
            methods = {ANY_METHOD}
        versions = None
        if "versions" in m:
            if not graph:
                self.fail(
                    m["versions"].pos,
                    f"{what}: versions apply to Graph hosts only, not '{host}'",
                    "remove versions",
                )
            versions = frozenset(
                self.choice(v, f"{what}.versions[{i}]", GRAPH_VERSIONS)
                for i, v in enumerate(self.seq(m["versions"], f"{what}.versions", non_empty=True))
            )
        paths = tuple(
            self.path(v, f"{what}.paths[{i}]", graph, versions)
            for i, v in enumerate(self.seq(m["paths"], f"{what}.paths", non_empty=True))
        )
        return OperationMatch(host, frozenset(methods), paths)

    def path(self, node: _Value, what: str, graph: bool, versions: frozenset[str] | None) -> PathPattern:
        text = self.string(node, what, 'e.g. "/users/{id}"')
        if not text.startswith("/"):
            self.fail(node.pos, f"{what}: path pattern '{text}' must start with '/'")
        raw = text[1:].split("/") if text != "/" else []
        pattern_version = None
        if graph and raw and raw[0].casefold() in GRAPH_VERSIONS:
            pattern_version = raw.pop(0).casefold()
            if versions is not None:
                self.fail(
                    node.pos,
                    f"{what}: '{text}' names a version and the operation has versions too",
                    "give the version in one place",
                )
        segments: list[str] = []
        for i, seg in enumerate(raw):
            problem, hint = self.segment_problem(seg, last=i == len(raw) - 1, graph=graph)
            if problem:
                self.fail(node.pos, f"{what}: bad path pattern '{text}': {problem}", hint)
            segments.append("*" if _PARAM.fullmatch(seg) else seg.casefold())
        if pattern_version is not None:
            pattern_versions = frozenset({pattern_version})
        elif graph:
            pattern_versions = versions or frozenset(GRAPH_VERSIONS)
        else:
            pattern_versions = frozenset({""})
        return PathPattern(text, tuple(segments), pattern_versions)

    @staticmethod
    def segment_problem(seg: str, *, last: bool, graph: bool) -> tuple[str, str]:
        if seg == "":
            if last:
                return "trailing '/'", "drop it: the canonical path has no trailing slash"
            return "empty segment ('//')", "write a single '/'"
        if seg == "**":
            return (
                ("", "") if last else ("'**' must be the last segment", "use '*' or {name} for one segment")
            )
        if seg == "*" or _PARAM.fullmatch(seg):
            return "", ""
        if seg in (".", ".."):
            return f"'{seg}' segment", "write the path without dot segments"
        if "{" in seg or "}" in seg or "*" in seg:
            return f"wildcard inside segment '{seg}'", "{name}, '*' and '**' must be a whole segment"
        if "%" in seg:
            return (
                f"percent-encoding in '{seg}'",
                "write the decoded text: patterns match the path decoded once",
            )
        if graph and ("(" in seg or ")" in seg):
            return (
                f"OData key syntax in '{seg}'",
                "write the canonical form: /users/{id} matches /users('x'); "
                "/applications/{id} matches /applications(appId='x')",
            )
        if _BAD_LITERAL.search(seg):
            return (
                f"invalid character in '{seg}'",
                "segments are plain text: no spaces, backslashes, '?' or '#'",
            )
        return "", ""
