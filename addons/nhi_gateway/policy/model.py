"""The policy: which verified identities may perform which Graph and Entra operations.

A policy is one YAML file. Every mistake in it is reported as :class:`PolicyError` with
``file:line:column``, what is wrong and what to do, and nothing else ever escapes the loader, so a
bad edit stops a start (or is refused on reload, keeping the last good policy) instead of failing
requests later.

Schema (``policies/example.yaml`` is a commented, working example)::

    version: 1                                   # required; the only version is 1
    mode: enforce                                # optional; enforce | report (see "Report mode")
    identity:                                    # required: which tokens the gateway accepts at all
      tenants: [<tenant GUID>, ...]              # required, non-empty allow-list of tenant ids (tid)
      bearer:                                    # tokens in Authorization: Bearer (at least one of
                                                 # bearer and proxy is required; a source not given
                                                 # accepts no token at all)
        audiences: [https://graph.microsoft.com, ...]  # required, non-empty; compared exactly with aud
        issuers:                                 # required, non-empty; {tenantid} becomes the token's tid
          - https://sts.windows.net/{tenantid}/  # discovery: <issuer>/.well-known/... (v1: see below)
          - issuer: https://login.microsoftonline.com/{tenantid}/v2.0   # or a mapping with an
            discovery: https://.../v2.0/.well-known/openid-configuration  # explicit discovery URL
      proxy:                                     # tokens in the proxy credentials
                                                 # (HTTPS_PROXY=http://name:<token>@host:port)
        audiences: [api://nhi-gateway, <gateway client id>]  # as under bearer
        issuers: [https://login.microsoftonline.com/{tenantid}/v2.0]
        graph_token: false                       # optional, default false; true: this source carries
                                                 # the Graph token itself (see below)
      leeway_seconds: 60                         # optional, default 60, 0..300 (clock skew for exp/nbf)
      client_secret_grants: flag                 # optional, default flag; allow | flag | refuse (see below)
    upstreams:                                   # required (may be empty): the only hosts reachable at all
      - host: graph.microsoft.com
        token: any                               # optional, default any; any | proxy | bearer | both | none
    masking:                                     # optional (see "Masking" below)
      default_profile: directory-pii             # optional; used by allow rules without `mask`
      pseudonym_key_env: NHI_MASK_KEY            # required if a profile uses pseudonym: the variable
                                                 # that holds the HMAC key (never the key itself)
      profiles:
        directory-pii:                           # at least one of fields, paths, detectors
          fields: [mail, mobilePhone]            # member names matched anywhere; a list redacts,
          # fields: {mail: partial, userPrincipalName: pseudonym}   # a mapping names the style
          paths: {"$.value[*].identities[*].issuerAssignedId": redact}  # or a list
          detectors: {email: partial, phone: redact}   # or a list: email phone jwt bearer
                                                 # graph_secret high_entropy
          binary: refuse                         # optional; pass | refuse (default: refuse): bodies
                                                 # it cannot read (binary; text without detectors)
    approvals:                                   # optional
      webhook: https://hooks.example/...         # optional: told of every request held for approval
      client_id: <GUID>                          # the gateway's app registration: the aud of approvers'
                                                 # v2 tokens; without it no token can approve
      app_id_uri: api://<GUID>                   # optional, needs client_id: the aud of v1 tokens
      scope: Approvals.Decide                    # optional, default Approvals.Decide: required in scp
      require_auth_context: c1                   # optional: c1..c99, required in the token's acrs
      require_mfa: true                          # optional, default false: amr must contain mfa (v1)
      login_client_id: <GUID>                    # optional: the public client of `approvals login`
    rules:                                       # optional, default none (= deny everything)
      - id: directory-read                       # required, unique; letters, digits . _ : -
        description: ...                         # optional
        action: allow                            # required; allow | deny | approve
        when: {app_ids: [<GUID>]}                # optional; who (see below)
        operations:                              # required, non-empty; what (see below)
          - host: graph.microsoft.com            # required; must be listed under upstreams
            methods: [GET]                       # required; GET HEAD POST PUT PATCH DELETE OPTIONS or "*"
            paths: ["/users", "/users/{id}"]     # required, non-empty
            versions: [v1.0]                     # optional, Graph hosts only; default v1.0 and beta
            odata: {max_top: 100}                # optional, Graph hosts only: limits of this operation
        odata:                                   # optional, Graph operations only: limits of every one
          forbid_select: [keyCredentials]        # properties a request must not $select
          forbid_expand: [owners]                # navigation properties it must not $expand
          allow_select: [id, displayName]        # optional: the only properties it may ask for
          max_top: 100                           # the largest $top, 1..1000000
        schedule:                                # optional: when the rule is in force
          days: [mon-fri]                        # mon..sun and ranges (fri-mon wraps); local to timezone
          hours: ["08:00-18:00"]                 # HH:MM-HH:MM, end exclusive, 24:00 = midnight
          timezone: Europe/Berlin                # IANA name; required with days or hours
          valid_from: 2025-07-01T00:00:00Z       # inclusive; an offset, or local to timezone
          valid_until: 2025-08-01T00:00:00+02:00 # exclusive
        approval:                                # required on approve rules, refused on others
          approvers: {users: [<oid>], groups: [<group id>]}  # at least one
          timeout: 5m                            # optional, default 5m, 1s..1h: how long a request waits
          max_grant: 1h                          # optional, 1s..7d: how long an approval may cover
                                                 # repeats; without it, the one request only
        mask: directory-pii                      # optional, allow and approve rules; a profile name
        mode: report                             # optional, deny and approve rules; enforce | report

Each token source has its own trust: a token is checked against the audiences and issuers of
the source it was presented in, so a token minted for one source is refused (401/407 naming the
check) in the other. The usual pair: the proxy credentials carry a token for the gateway's own API
(v2 issuer, ``aud`` = the gateway's client id or App ID URI), and ``Authorization: Bearer`` carries
the Graph token (v1 issuer ``sts.windows.net``, Graph's audience spellings). Only when the proxy
source says ``graph_token: true`` is its token Graph's own, and presented upstream as
``Authorization: Bearer`` for a request that has none; a proxy source that lists a Graph audience
must say so, and one that says so must list one. An upstream's ``token: proxy``/``bearer``/``both``
needs the sources it names. Approvers' tokens (the approval API) are neither source's: they are
judged with the tenants, the issuers of every source and the audiences of ``approvals``.
Policies written before this (``audiences`` and ``issuers`` directly under ``identity``) do not
load: the error says how to write them.

An issuer without ``{tenantid}`` is a single-tenant issuer. ``https://sts.windows.net/{tenantid}/``
(the v1 issuer) defaults to the v1 discovery document on login.microsoftonline.com, because
sts.windows.net serves no metadata of its own.

``token`` says which token sources a request to the host must present: ``any`` (at least one of
Proxy-Authorization on CONNECT or Authorization: Bearer), ``proxy``, ``bearer``, ``both``, or
``none`` (no token is looked for: the Entra token endpoint, where callers have none yet).

``client_secret_grants`` says what happens to a token request (a POST to an Entra token
endpoint, see :mod:`nhi_gateway.identity.token_requests`) that authenticates the client with a static
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

Paths are matched against the canonical path of :mod:`nhi_gateway.policy.operation` (decoded once,
case-folded, ``users('x')`` and ``users(id='x')`` read as ``users/x``, ``applications(appId='x')``
as ``applications/appid=x``, ``microsoft.graph.addPassword`` as ``addPassword``,
``/directoryObjects/{id}/microsoft.graph.user`` as ``/users/{id}``). A pattern that names an object
by its id (``/applications/6f1c.../addPassword``) also decides requests that name that object by an
alternate key (``applications(appId='...')``, ``applications(uniqueName='...')``, a user's UPN,
``/directoryObjects/{id}`` without a cast): the gateway resolves the key with its own Graph
credential, and refuses such requests (503) when it cannot (:mod:`nhi_gateway.policy.objects`). A pattern is written in that form: ``{name}`` or ``*`` matches exactly
one segment, ``**`` (last segment only) matches zero or more segments, anything else matches
literally and case-insensitively. On Graph hosts a pattern may start with a version
(``/v1.0/users``); without one it matches ``/v1.0`` and ``/beta`` unless ``versions`` narrows it.

``odata`` (Microsoft Graph only) limits what a request may ask of OData. ``$select``,
``$expand`` and ``$top`` are read at every depth (``$expand=owners($select=keyCredentials)``
selects ``keyCredentials`` as surely as ``$select=keyCredentials`` does), names are compared
case-insensitively as Graph compares them, every segment of a path (``microsoft.graph.user/mail``)
counts, and ``*`` asks for every name, so ``$select=*`` breaks any ``forbid_select``. Options the
gateway cannot read unambiguously (unbalanced parentheses or quotes, a percent-escape left after
decoding, ``$compute``/``$apply``) break every limit. ``max_top`` judges ``$top`` only; a request
without ``$top`` gets Graph's own page size. Limits given on the rule and on one of its operations
both apply to that operation. What they mean depends on the action, so that each reads as "what is
forbidden":

- on an ``allow`` or ``approve`` rule they bound what the rule covers: a request that breaks them is
  not covered by it. If no other rule allows the request, the refusal names the rule and the
  limit: ``no rule allows <op>: rule 'app-read' would, but $select asks for 'keyCredentials'
  (odata.forbid_select)`` (``rule_id`` is that rule, ``check`` is ``odata``);
- on a ``deny`` rule they say what is denied: the rule matches only requests that break them
  (``denied by rule 'no-key-material': $select asks for 'keyCredentials' ...``), so one deny rule
  keeps a property away from every caller.

A property a request may not ``$select`` (``forbid_select``) it may not ``$filter``, ``$orderby``
or ``$search`` on either, at any depth: each can test its value without returning it
(``$filter=startswith(keyCredentials/...)``). ``allow_select`` is the allow-list form: the only
properties a request may ``$select``, ``$expand``, filter, sort or search on; such a request must
``$select`` (Graph's default properties are on nobody's list), and so must each ``$expand``.

``$select`` limits what Graph is asked to return, not what it returns by default: mask a field
that must never leave, whatever the request asks.

No query oracles: a request allowed (or held for approval) under a mask profile is refused (403,
``check`` ``masking``, naming the property) when a ``$filter``, ``$orderby`` or ``$search`` at any
depth, a parameter alias (``@p``), or a ``$batch`` item's, tests a property the profile hides: its
fields, the names its paths end on, and the Graph properties its detectors exist for
(:data:`~nhi_gateway.masking.masks.DETECTED_PROPERTIES`; ``email``: ``mail``, ``otherMails``,
``proxyAddresses``, ``userPrincipalName`` ...; ``phone``: ``mobilePhone``, ``businessPhones``,
``faxNumber``). ``$filter=startswith(mail,'a')`` would otherwise tell a caller every address it
only ever sees masked. A ``$search`` term that names no property (it searches the default
properties) and options that cannot be read unambiguously are refused too under such a profile.

``schedule`` says when a rule is in force; outside it the rule does not match at all (a deny rule
out of its schedule denies nothing). ``days`` and ``hours`` are read on the local date and time in
``timezone`` of each request, independently: ``days: [mon-fri]`` with ``hours: ["22:00-24:00"]``
covers Friday 23:00 but not Saturday 01:00. A range never runs past midnight: write
``["22:00-24:00", "00:00-06:00"]``. ``valid_from``/``valid_until`` are instants; written without
an offset they are read in ``timezone``. Decisions read the clock only when a candidate rule has
a schedule (``Policy.decide(..., at=...)`` takes the time for tests, ``explain`` and ``replay``).

Decisions (precedence deny > approve > allow, default deny):

1. a matching ``deny`` rule refuses the request, whatever else matches (the first in file order
   is reported);
2. otherwise the first matching ``approve`` rule makes an ``APPROVE`` decision: a person named by
   its ``approval.approvers`` must allow the request first. ``APPROVE`` is not an allow: the
   decision carries the status (403) and code of a refusal, so every stage that passes only
   ``ALLOW`` refuses it with "approval required by rule '<id>'", until an approval stage holds the
   request and turns it into an allow or a denial;
3. otherwise the first matching ``allow`` rule allows it (with its mask profile);
4. otherwise the request is refused: "no rule allows <op>".

Report mode (``mode: report``): a deny or approve rule that reports does not refuse or hold. The
request is decided as if the reporting rules were not there (rules that enforce still refuse or
hold; an allow rule still picks the mask profile) and forwarded when that allows it; the decision
carries ``extra["report"] = {"would": "deny" | "hold", "rule", "reason"}`` of what the full policy
said, and its reason says "would deny by rule 'x'". ``mode: report`` at the top is the default of
every deny and approve rule (``mode: enforce`` on a rule keeps it enforcing) and makes the default
refusal report too: a request no rule allows is forwarded, masked by ``masking.default_profile``.
An allow rule cannot report (it refuses nothing). Only rules report: everything the gateway
refuses before the rules (tokens, unreadable requests, hosts not under upstreams, malformed
batches, refused client-secret grants) is refused in every mode. ``Decision.verdict()`` gives
back what the rules said, for tools that compare decisions (``replay``, ``suggest``).

Masking (:mod:`nhi_gateway.masking.masks` has the details) hides what an allowed response holds, by
the profile of the rule (``mask``) or ``masking.default_profile``. A profile matches ``fields``
(member names, case-insensitively, at any depth), ``paths`` (JSON paths: ``$``, ``.name``,
``['name']``, ``.*``/``[*]``, ``[0]``, ``..name``; filters, slices and unions are refused) and
``detectors`` (``email``, ``phone``, ``jwt``, ``bearer``, ``graph_secret``, ``high_entropy``:
shapes found inside any string and text body). Each entry names a style: ``redact`` (the value
becomes ``"[masked]"``), ``partial`` (a hint: ``a***@contoso.com``, ``abc***``) or
``pseudonym`` (``pseudonym:<16 hex>``, HMAC-SHA256 keyed with the value of the environment
variable ``pseudonym_key_env`` names, at least 16 bytes; the same value gives the same token
within a deployment). A policy whose profiles make pseudonyms does not load while that variable
is unset or short: the gateway refuses to start, and a reload keeps the last good policy.
``binary`` says whether a body the profile cannot read (a binary body that is not JSON: images,
PDFs, octet streams; a text body under a profile without detectors) is passed or refused (502);
it defaults to refuse. A body that parses as JSON is masked as JSON whatever its Content-Type
says; an answer with two Content-Type headers, and a body that does not parse as what it must be
(JSON, form, text in its charset) is always refused (502). Response headers are masked too
(detectors, and the values masked in the body wherever a header repeats them), and a property
asked for by its own path (``/users/{id}/mobilePhone``, ``.../$value``) is masked by its name.

``nhi-gateway policy lint`` reports the loader's errors (:mod:`nhi_gateway.policy.loader`) and warns about rules that can never decide;
``policy explain`` shows which rules matched one request and why; ``policy replay`` re-decides
recorded traffic under an edited policy (:mod:`nhi_gateway.cli.policy`).
The shape of the file is described once, by the models of :mod:`nhi_gateway.policy.shape`: the
loader (:mod:`nhi_gateway.policy.loader`) validates with them, and ``policies/policy.schema.json``
(for YAML language servers) is generated from them; the loader checks more than the schema can
(hosts under upstreams, unique ids, known profiles and time zones).
"""


from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from zoneinfo import ZoneInfo

from nhi_gateway.identity.principal import AuthMethod, Principal, TokenSource
from nhi_gateway.masking.masks import MaskProfile
from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.policy.operation import ODataQuery, Operation, OperationError, normalize_host

REFUSAL_STATUS = 403
REFUSAL_CODE = "Authorization_RequestDenied"
DEFAULT_LEEWAY = 60
MAX_LEEWAY = 300
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
ANY_METHOD = "*"
MAX_TOP = 1_000_000
MODES = ("enforce", "report")  # a rule's (or the policy's) mode: report forwards what it would refuse


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
class SourceTrust:
    """What one token source (``identity.proxy`` or ``identity.bearer``) accepts."""

    audiences: frozenset[str]
    issuers: tuple[IssuerConfig, ...]
    # proxy only: the token is Graph's own, and is presented upstream as the bearer
    graph_token: bool = False


@dataclass(frozen=True)
class IdentityConfig:
    tenants: frozenset[str]  # lower-case GUIDs
    proxy: SourceTrust | None  # None: no token is accepted in the proxy credentials
    bearer: SourceTrust | None  # None: no token is accepted in Authorization: Bearer
    leeway_seconds: int = DEFAULT_LEEWAY
    client_secret_grants: ClientSecretGrants = ClientSecretGrants.FLAG

    def trust_for(self, source: TokenSource) -> SourceTrust | None:
        return self.proxy if source is TokenSource.PROXY else self.bearer


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


# --- OData limits, schedules and approvals -------------------------------------------------------


@dataclass(frozen=True)
class ODataLimits:
    """What a rule lets a request ask of OData (``odata:``). Names as written in the policy;
    compared case-insensitively, as Graph compares property names.

    A property a request may not ``$select`` it may not filter, sort or search on either
    (``$filter``, ``$orderby``, ``$search``, at any depth): each can test its value without
    returning it. ``allow_select`` (``None``: no allow-list) lists the only properties a request
    may ask for, filter, sort or search on; such a request must ``$select``, and so must each of
    its expansions (Graph's default properties are not on anyone's list)."""

    forbid_select: tuple[str, ...] = ()
    forbid_expand: tuple[str, ...] = ()
    max_top: int | None = None
    allow_select: tuple[str, ...] | None = None
    _select: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)
    _expand: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)
    _allow: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_select", {n.casefold(): n for n in self.forbid_select})
        object.__setattr__(self, "_expand", {n.casefold(): n for n in self.forbid_expand})
        if self.allow_select is not None:
            object.__setattr__(self, "_allow", {n.casefold(): n for n in self.allow_select})

    def __hash__(self) -> int:
        return hash((self.forbid_select, self.forbid_expand, self.max_top, self.allow_select))

    def merged(self, other: ODataLimits) -> ODataLimits:
        """Both sets of limits at once (a rule's and one of its operations')."""
        tops = [t for t in (self.max_top, other.max_top) if t is not None]
        allows = [a for a in (self.allow_select, other.allow_select) if a is not None]
        allow = None
        if allows:
            allow = allows[0] if len(allows) == 1 else tuple(
                n for n in allows[0] if n.casefold() in {m.casefold() for m in allows[1]})
        return ODataLimits(
            tuple(dict.fromkeys(self.forbid_select + other.forbid_select)),
            tuple(dict.fromkeys(self.forbid_expand + other.forbid_expand)),
            min(tops) if tops else None,
            allow,
        )

    def violation(self, q: ODataQuery) -> str | None:
        """Why the request breaks these limits, or None."""
        if q.problem:
            # What cannot be read cannot be shown to respect the limits.
            return f"its OData options cannot be judged ({q.problem})"
        for names, asked, option, key in (
            (self._select, q.selects, "$select", "odata.forbid_select"),
            (self._expand, q.expands, "$expand", "odata.forbid_expand"),
        ):
            if not names:
                continue
            for path in asked:
                if "*" in path:
                    return f"{option}=* asks for every property, including {_names(names.values())} ({key})"
                for seg in path:
                    if seg in names:
                        return f"{option} asks for '{names[seg]}' ({key})"
        if self._select:
            for option, name in q.tested:
                if name in self._select:
                    return f"{option} tests '{self._select[name]}', which no request may ask for (odata.forbid_select)"
        if self._allow is not None:
            broken = self._allow_violation(q, self._allow)
            if broken:
                return f"{broken} (odata.allow_select: {_names(self._allow.values())})"
        if self.max_top is not None:
            for top in q.tops:
                if not (top.isascii() and top.isdigit()):
                    return f"$top={top!r} is not a whole number (odata.max_top)"
                if int(top) > self.max_top:
                    return f"$top={int(top)} is more than {self.max_top} (odata.max_top)"
        return None

    @staticmethod
    def _allow_violation(q: ODataQuery, allow: dict[str, str]) -> str | None:
        if not q.selected:
            return "$select is required: without it Graph answers its default properties"
        for option, paths in (("$select", q.selects), ("$expand", q.expands)):
            for path in paths:
                if "*" in path:
                    return f"{option}=* asks for every property"
                for seg in path:
                    if "." not in seg and seg not in allow:  # a cast (microsoft.graph.user) is no property
                        return f"{option} asks for '{seg}', which is not listed"
        if q.bare_expands:
            return f"$expand of '{'/'.join(q.bare_expands[0])}' has no $select of its own"
        for option, name in q.tested:
            if name == "*":
                return f"{option} names no property, so it searches the default properties"
            if name not in allow:
                return f"{option} tests '{name}', which is not listed"
        return None


def _names(names: Iterable[str]) -> str:
    return ", ".join(names)


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class Schedule:
    """When a rule is in force (``schedule:``). Outside it, the rule does not match.

    ``days`` are ``datetime.weekday()`` numbers (0 = Monday) and ``hours`` half-open ranges of
    seconds since local midnight, both read in ``timezone``; ``valid_from`` (inclusive) and
    ``valid_until`` (exclusive) are instants. An empty ``days``/``hours`` means "any".
    """

    days: frozenset[int] = frozenset()
    hours: tuple[tuple[int, int], ...] = ()
    timezone: str = ""
    valid_from: datetime | None = None
    valid_until: datetime | None = None

    def contains(self, at: datetime) -> bool:
        if self.valid_from is not None and at < self.valid_from:
            return False
        if self.valid_until is not None and at >= self.valid_until:
            return False
        if self.days or self.hours:
            local = at.astimezone(ZoneInfo(self.timezone))
            if self.days and local.weekday() not in self.days:
                return False
            if self.hours:
                second = local.hour * 3600 + local.minute * 60 + local.second
                return any(start <= second < end for start, end in self.hours)
        return True

    def describe(self) -> str:
        parts = []
        if self.days:
            parts.append(",".join(WEEKDAYS[d] for d in sorted(self.days)))
        if self.hours:
            parts.append(",".join(f"{_hhmm(s)}-{_hhmm(e)}" for s, e in self.hours))
        if self.timezone and (self.days or self.hours):
            parts.append(self.timezone)
        if self.valid_from is not None:
            parts.append(f"from {self.valid_from.isoformat()}")
        if self.valid_until is not None:
            parts.append(f"until {self.valid_until.isoformat()}")
        return " ".join(parts)


def _hhmm(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}"


@dataclass(frozen=True)
class Approval:
    """Who may approve a request that an ``approve`` rule holds, and for how long (``approval:``).

    The approval machinery is not part of this module; until the gateway has it, an ``approve``
    decision is a refusal (see :meth:`Policy.decide`).
    """

    users: frozenset[str] = frozenset()  # lower-case object ids of people who may approve
    groups: frozenset[str] = frozenset()  # lower-case group ids whose members may approve
    timeout_seconds: int = 300  # how long a request waits for an answer before it is refused
    max_grant_seconds: int | None = None  # how long an approval may cover repeats; None: this request only

    def to_dict(self) -> dict:
        return {
            "users": sorted(self.users),
            "groups": sorted(self.groups),
            "timeout_seconds": self.timeout_seconds,
            "max_grant_seconds": self.max_grant_seconds,
        }


@dataclass(frozen=True)
class ApprovalsConfig:
    """The policy's ``approvals:`` section: how approvers are told a request waits for them, and
    what token proves an approver to the approval API.

    The approval API accepts only delegated tokens of people issued for the gateway's own app
    registration (``client_id``, ``app_id_uri``) with ``scope``: a person's Graph token, or a token
    for any other API, is no key to it (an agent acting on a person's behalf holds exactly such
    tokens). ``require_auth_context`` asks for a Conditional Access authentication context in the
    token's ``acrs``; ``require_mfa`` for ``mfa`` in ``amr`` (v1 tokens only: v2 tokens carry no
    ``amr``). Without ``client_id`` the approval API refuses every token (401).
    """

    webhook: str | None = None  # an https URL that receives a chat-style message per held request
    client_id: str | None = None  # the gateway's app registration: aud of v2 tokens (lower-case GUID)
    app_id_uri: str | None = None  # its App ID URI: aud of v1 tokens (with or without a trailing slash)
    scope: str = "Approvals.Decide"  # the delegated scope an approver's token must carry in scp
    require_auth_context: str | None = None  # e.g. c1: must be in the token's acrs
    require_mfa: bool = False  # amr must contain mfa (refuses v2 tokens, which carry no amr)
    login_client_id: str | None = None  # the public client `approvals login` signs in with (default client_id)

    @property
    def audiences(self) -> frozenset[str]:
        """The ``aud`` values an approver's token may carry."""
        out = set()
        if self.client_id:
            out.add(self.client_id)
        if self.app_id_uri:
            uri = self.app_id_uri.rstrip("/")
            out |= {uri, uri + "/"}
        return frozenset(out)

    @property
    def step_up(self) -> bool:
        return bool(self.require_auth_context or self.require_mfa)


DEFAULT_APPROVAL_TIMEOUT = 300
MAX_APPROVAL_TIMEOUT = 3600
MIN_GRANT = 1  # any grant from 1s: a shorter grant is never less safe (and expiry is quick to test)
MAX_GRANT = 7 * 24 * 3600


# --- rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OperationMatch:
    host: str
    methods: frozenset[str]  # upper-case, or {"*"}
    paths: tuple[PathPattern, ...]
    odata: ODataLimits | None = None  # this operation's own limits, on top of the rule's

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
    odata: ODataLimits | None = None  # limits for every operation of the rule
    schedule: Schedule | None = None
    approval: Approval | None = None  # approve rules only
    column: int = 0  # 1-based column of the rule's first key
    # mode: report (deny and approve rules): what the rule would refuse or hold is forwarded and
    # reported (Decision.extra["report"]), see Policy.decide.
    report_only: bool = False

    @property
    def has_limits(self) -> bool:
        return self.odata is not None or any(o.odata is not None for o in self.operations)

    def limits_for(self, om: OperationMatch) -> ODataLimits | None:
        if self.odata is None or om.odata is None:
            return self.odata or om.odata
        return self.odata.merged(om.odata)

    def in_force(self, at: datetime | None = None) -> bool:
        return self.schedule is None or self.schedule.contains(at or datetime.now(UTC))

    def judge(self, op: Operation) -> tuple[bool, str]:
        """Whether the rule applies to ``op`` once its operations match, and why (or why not).

        OData limits narrow what a rule covers. On an ``allow`` or ``approve`` rule they are what
        the request must respect: a request that breaks them is not covered (the text says
        which limit). On a ``deny`` rule they say what is denied: the rule applies only to
        requests that break them (the text says which limit). Without limits an operation that
        matches is covered. A rule with several matching operations applies if one of them does.
        """
        broken = ""
        for om in self.operations:
            if not om.matches(op):
                continue
            limits = self.limits_for(om)
            if limits is None:
                return True, ""
            violation = limits.violation(op.odata)
            if self.action is Action.DENY:
                if violation is not None:
                    return True, violation
            elif violation is None:
                return True, ""
            else:
                broken = broken or violation
        return False, broken

    def matches(self, principal: Principal | None, op: Operation, at: datetime | None = None) -> bool:
        """The plain reading of the rule; :meth:`Policy.decide` uses an index that must agree."""
        return self.when.matches(principal) and self.in_force(at) and self.judge(op)[0]


class Outcome(StrEnum):
    """What a rule whose ``when`` and operations match made of one request (for ``explain``)."""

    APPLIES = "applies"
    NOT_IN_FORCE = "not in force"  # outside its schedule
    LIMITS_BROKEN = "limits broken"  # allow/approve rule: the request breaks its OData limits
    LIMITS_KEPT = "limits kept"  # deny rule: the request keeps within its OData limits


@dataclass(frozen=True)
class RuleOutcome:
    rule: Rule
    outcome: Outcome
    detail: str = ""

    @property
    def applies(self) -> bool:
        return self.outcome is Outcome.APPLIES


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
        approvals: ApprovalsConfig | None = None,
        report_default: bool = False,
    ) -> None:
        self.source = str(source)
        # mode: report at the top: the default "no rule allows" reports too (rules carry their own).
        self.report_default = report_default
        self.approvals = approvals  # None: no approvals section
        self.identity = identity
        self.upstreams = tuple(upstreams)
        self._upstreams = {u.host: u for u in self.upstreams}
        self.mask_profiles = dict(mask_profiles)
        self.default_profile = default_profile
        self.rules = tuple(rules)
        self.reporting = report_default or any(r.report_only for r in self.rules)
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

    def report_notice(self) -> str | None:
        """What the gateway warns of at start and on reload while anything only reports."""
        ids = [r.id for r in self.rules if r.report_only]
        if not ids and not self.report_default:
            return None
        what = []
        if self.report_default:
            what.append("the policy is in mode: report (requests no rule allows are forwarded)")
        if ids:
            what.append(f"{len(ids)} rule{'s' * (len(ids) != 1)} only report{'s' * (len(ids) == 1)}: "
                        f"{', '.join(ids)}")
        return ("REPORT MODE: " + "; ".join(what) + ". What they would refuse or hold is forwarded and "
                "reported; token checks and request checks still refuse.")

    def upstream(self, host: str) -> Upstream | None:
        try:
            return self._upstreams.get(normalize_host(host))
        except OperationError:
            return None

    def rule(self, rule_id: str) -> Rule | None:
        return self._rules_by_id.get(rule_id)

    def candidates(self, principal: Principal | None, op: Operation) -> list[Rule]:
        """Rules whose ``when`` and operations match, in file order, before schedules and
        OData limits are looked at."""
        found: set[int] = set()
        segments = op.segments
        for pkey in _principal_keys(principal):
            for method in (op.method, ANY_METHOD):
                root = self._index.get((pkey, op.host, method, op.version))
                if root is not None:
                    root.collect(segments, found)
        rules = (self.rules[i] for i in sorted(found))
        return [r for r in rules if r.when.matches(principal)]

    def matching_rules(self, principal: Principal | None, op: Operation, at: datetime | None = None) -> list[Rule]:
        """Every rule that matches (in force, OData limits read as :meth:`Rule.judge` says), in
        file order."""
        return [o.rule for o in self.explain(principal, op, at)[1] if o.applies]

    def decide(self, principal: Principal | None, op: Operation, at: datetime | None = None) -> Decision:
        """The decision for ``op`` by ``principal`` at ``at`` (default: now, read only when a
        candidate rule has a schedule). See the module docstring for the precedence."""
        decision = self._decide(principal, op, at, None)
        return self._reported(principal, op, at, decision) if self.reporting else decision

    def _oracle(self, op: Operation, profile_name: str | None) -> str | None:
        profile = self.mask_profiles.get(profile_name) if profile_name else None
        return _oracle_reason(op, profile) if profile is not None else None

    def explain(
        self, principal: Principal | None, op: Operation, at: datetime | None = None
    ) -> tuple[Decision, list[RuleOutcome]]:
        """The decision and what every candidate rule made of the request (for ``explain``)."""
        outcomes: list[RuleOutcome] = []
        decision = self._decide(principal, op, at, outcomes)
        return (self._reported(principal, op, at, decision) if self.reporting else decision), outcomes

    def _reports(self, decision: Decision) -> bool:
        """Whether ``decision`` (a refusal or hold) was made by something that only reports."""
        if decision.allowed or decision.stage is not Stage.POLICY:
            return False
        rule = self.rule(decision.rule_id) if decision.rule_id else None
        if rule is None or decision.check == "odata":  # no rule allows it
            return self.report_default
        return rule.report_only

    def _reported(self, principal: Principal | None, op: Operation, at: datetime | None,
                  would: Decision) -> Decision:
        """Report mode: a refusal or hold by a rule in ``mode: report`` (or the default refusal of a
        policy in report mode) is forwarded as the rules that enforce decide, and says what it would
        have been in ``extra["report"]``. A rule that enforces still refuses or holds."""
        if not self._reports(would):
            return would
        enforced = self._decide(principal, op, at, None, skip_report=True)
        if not enforced.allowed and not self._reports(enforced):
            return enforced
        verb = "hold" if would.action is Action.APPROVE else "deny"
        by = f"by rule '{would.rule_id}'" if would.rule_id and would.check != "odata" else "(no rule allows it)"
        report = {"would": verb, "rule": would.rule_id or "", "reason": would.reason}
        if enforced.allowed:
            return enforced.but(reason=f"{enforced.reason}; would {verb} {by} (report mode)",
                                extra={**enforced.extra, "report": report})
        return Decision(Action.ALLOW, Stage.POLICY, f"would {verb} {by}: {would.reason} (report mode: forwarded)",
                        operation=would.operation, principal=would.principal,
                        mask_profile=self.default_profile, extra={"report": report})

    def _decide(
        self, principal: Principal | None, op: Operation, at: datetime | None, outcomes: list[RuleOutcome] | None,
        skip_report: bool = False,
    ) -> Decision:
        deny: tuple[Rule, str] | None = None
        approve: Rule | None = None
        allow: Rule | None = None
        limited: tuple[Rule, str] | None = None
        for rule in self.candidates(principal, op):
            if skip_report and rule.report_only:
                continue
            if rule.schedule is not None:
                if at is None:
                    at = datetime.now(UTC)
                if not rule.schedule.contains(at):
                    if outcomes is not None:
                        outcomes.append(RuleOutcome(rule, Outcome.NOT_IN_FORCE, rule.schedule.describe()))
                    continue
            applies, detail = rule.judge(op) if rule.has_limits else (True, "")
            if not applies:
                if rule.action is Action.DENY:
                    outcome = Outcome.LIMITS_KEPT
                else:
                    outcome = Outcome.LIMITS_BROKEN
                    limited = limited or (rule, detail)
                if outcomes is not None:
                    outcomes.append(RuleOutcome(rule, outcome, detail))
                continue
            if outcomes is not None:
                outcomes.append(RuleOutcome(rule, Outcome.APPLIES, detail))
            if rule.action is Action.DENY:
                deny = deny or (rule, detail)
                if outcomes is None:
                    break  # a deny wins whatever follows
            elif rule.action is Action.APPROVE:
                approve = approve or rule
            else:
                allow = allow or rule
        who = principal.to_dict() if principal is not None else None
        if deny is None and (approve or allow) is not None:
            chosen = approve or allow
            oracle = self._oracle(op, chosen.mask or self.default_profile)
            if oracle is not None:
                return Decision.deny(
                    Stage.POLICY, REFUSAL_STATUS, REFUSAL_CODE,
                    f"{oracle} (rule '{chosen.id}')",
                    rule_id=chosen.id, check="masking", operation=str(op), principal=who,
                )
        if deny is not None:
            rule, detail = deny
            return Decision.deny(
                Stage.POLICY,
                REFUSAL_STATUS,
                REFUSAL_CODE,
                f"denied by rule '{rule.id}'" + (f": {detail}" if detail else ""),
                rule_id=rule.id,
                operation=str(op),
                principal=who,
            )
        if approve is not None:
            # Not an allow. It carries a refusal's status and code, so any stage that refuses it
            # (every stage that passes only ALLOW) answers a readable 403, never a status 0; the
            # approval stage, when there is one, turns it into an allow or a denial of its own.
            return Decision(
                action=Action.APPROVE,
                stage=Stage.POLICY,
                reason=f"approval required by rule '{approve.id}'",
                status=REFUSAL_STATUS,
                code=REFUSAL_CODE,
                rule_id=approve.id,
                operation=str(op),
                principal=who,
                mask_profile=approve.mask or self.default_profile,
                extra={"approval": approve.approval.to_dict()} if approve.approval else {},
            )
        if allow is not None:
            return Decision(
                action=Action.ALLOW,
                stage=Stage.POLICY,
                reason=f"allowed by rule '{allow.id}'",
                rule_id=allow.id,
                operation=str(op),
                principal=who,
                mask_profile=allow.mask or self.default_profile,
            )
        if limited is not None:
            rule, detail = limited
            return Decision.deny(
                Stage.POLICY,
                REFUSAL_STATUS,
                REFUSAL_CODE,
                f"no rule allows {op}: rule '{rule.id}' would, but {detail}",
                rule_id=rule.id,
                check="odata",
                operation=str(op),
                principal=who,
            )
        return Decision.deny(
            Stage.POLICY,
            REFUSAL_STATUS,
            REFUSAL_CODE,
            f"no rule allows {op}",
            operation=str(op),
            principal=who,
        )


def _oracle_reason(op: Operation, profile: MaskProfile) -> str | None:
    """Why ``op`` would let a caller under ``profile`` learn what the profile hides without
    reading it (a filter, sort or search that tests a hidden property), or None."""
    hidden = profile.hidden
    if not op.is_graph or not hidden:
        return None
    q = op.odata
    if q.problem:
        return (f"its OData options cannot be judged ({q.problem}), and mask profile '{profile.name}' hides "
                "properties that a filter, sort or search could test")
    for option, name in q.tested:
        if name == "*":
            return (f"{option} names no property, so it searches the default properties, which may include "
                    f"what mask profile '{profile.name}' hides; search on named properties (\"displayName:...\")")
        if name in hidden:
            return (f"{option} tests '{hidden[name]}', which mask profile '{profile.name}' hides: a filter, sort or "
                    "search on a masked property would reveal its values")
    return None
