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

``nhi-gateway policy lint`` reports these errors and warns about rules that can never decide;
``policy explain`` shows which rules matched one request and why; ``policy replay`` re-decides
recorded traffic under an edited policy (:mod:`nhi_gateway.cli.policy`).
``policies/policy.schema.json`` describes the file for YAML language servers; this loader checks
more than the schema can (hosts under upstreams, unique ids, known profiles and time zones).
"""


from __future__ import annotations

import difflib
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.masking.masks import (
    MIN_KEY_BYTES,
    BinaryBodies,
    Detector,
    JSONPathError,
    MaskProfile,
    PseudonymKey,
    Style,
    compile_path,
)
from nhi_gateway.policy.operation import (
    GRAPH_HOSTS,
    GRAPH_VERSIONS,
    ODataQuery,
    Operation,
    OperationError,
    canonical_segments,
    normalize_host,
)
from nhi_gateway.identity.principal import AuthMethod, Principal, TokenSource

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
# Microsoft Graph's audience spellings (compared without case and trailing slash).
_GRAPH_AUDIENCES = frozenset({"https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000"})
_OLD_IDENTITY_KEYS = ("audiences", "issuers")
_SOURCE_NAMES = {TokenSource.PROXY: "the proxy credentials (HTTPS_PROXY=http://name:<token>@host:port)",
                 TokenSource.BEARER: "Authorization: Bearer"}
_PER_SOURCE_HINT = """write them per token source, e.g.
    identity:
      tenants: [...]
      bearer:                   # Authorization: Bearer, usually the Graph token
        audiences: [https://graph.microsoft.com, https://graph.microsoft.com/, 00000003-0000-0000-c000-000000000000]
        issuers: [https://sts.windows.net/{tenantid}/]
      proxy:                    # proxy credentials, usually a token for the gateway's own API
        audiences: [api://<gateway app>, <gateway client id>]
        issuers: [https://login.microsoftonline.com/{tenantid}/v2.0]
  (a proxy source that carries the Graph token itself lists Graph's audiences and says graph_token: true);
  see policies/example.yaml"""
# xms_mirid: /subscriptions/<sub>/resourcegroups/<rg>/providers/<namespace>/<type>/<name>[/...]
# An OData property or navigation property name (a type-cast segment has dots).
_PROPERTY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_HOURS = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
MAX_TOP = 1_000_000
MODES = ("enforce", "report")  # a rule's (or the policy's) mode: report forwards what it would refuse
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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


def load_policy(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Policy:
    """Read and check a policy file; raises :class:`PolicyError` and nothing else.

    ``environ`` (default: this process's environment) holds the pseudonym key named by
    ``masking.pseudonym_key_env``."""
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
    return parse_policy(text, source, environ=environ)


def parse_policy(text: str | bytes, source_name: str = "<policy>", *,
                 environ: Mapping[str, str] | None = None) -> Policy:
    """Parse and check policy text; raises :class:`PolicyError` and nothing else."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8-sig")
        return _Loader(source_name, text, environ).load()
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


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean '{close[0]}'?" if close else ""


class _Loader:
    def __init__(self, source: str, text: str, environ: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.text = text
        self.environ = os.environ if environ is None else environ
        self.profiles: dict[str, MaskProfile] = {}
        self.upstream_hosts: set[str] = set()
        self.tenants: frozenset[str] = frozenset()
        self.token_sources: frozenset[TokenSource] = frozenset()

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
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            # ruamel's constructors raise these, unmarked, for a value its explicit tag cannot
            # hold: `!!int abc`, `!!bool maybe`, `!!timestamp 2025-13-45`, `!!omap 5`.
            line, col, tag = self._first_tag()
            raise PolicyError(
                self.source, line, col,
                f"YAML cannot read the value tagged {tag}: {e}" if tag else f"YAML cannot read this document: {e}",
                "remove the tag: a policy needs no YAML tags, write the plain value",
            ) from e

    def _first_tag(self) -> tuple[int, int, str]:
        """Where the first explicitly tagged node is (1-based), and its tag as written."""
        from ruamel.yaml import YAML

        try:
            for event in YAML(typ="rt").parse(self.text):
                tag = getattr(event, "tag", None)
                if tag:
                    mark = event.start_mark
                    return mark.line + 1, mark.column + 1, tag.replace("tag:yaml.org,2002:", "!!")
        except Exception:  # noqa: BLE001 - only a position is looked for; the error is already known
            pass
        return 1, 1, ""

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
            {
                "version": True,
                "identity": True,
                "upstreams": True,
                "masking": False,
                "approvals": False,
                "rules": False,
                "mode": False,
            },
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
        approvals = self.approvals(top["approvals"]) if "approvals" in top else None
        report_all = "mode" in top and self.choice(top["mode"], "mode", MODES) == "report"
        rules = self.rules(top["rules"], report_all) if "rules" in top else []
        return Policy(self.source, identity, upstreams, self.profiles, rules, default_profile, approvals,
                      report_default=report_all)

    def approvals(self, node: _Value) -> ApprovalsConfig:
        m = self.mapping(node, "approvals", {
            "webhook": False, "client_id": False, "app_id_uri": False, "scope": False,
            "require_auth_context": False, "require_mfa": False, "login_client_id": False,
        })
        webhook = None
        if "webhook" in m:
            hint = "e.g. https://hooks.slack.com/services/... (the message names the request and how to approve it)"
            webhook = self.string(m["webhook"], "approvals.webhook", hint).strip()
            try:
                parts = urlsplit(webhook)
                ok = parts.scheme == "https" and bool(parts.hostname) and not parts.username and not parts.password
            except ValueError:
                ok = False
            if not ok:
                self.fail(m["webhook"].pos, f"approvals.webhook: '{webhook}' is not an https URL", hint)
        ids = {}
        for key in ("client_id", "login_client_id"):
            if key in m:
                value = self.string(m[key], f"approvals.{key}").strip()
                if not _GUID.fullmatch(value):
                    self.fail(m[key].pos, f"approvals.{key}: '{value}' is not a GUID",
                              "the Application (client) ID of the gateway's app registration")
                ids[key] = value.lower()
        app_id_uri = None
        if "app_id_uri" in m:
            app_id_uri = self.string(m["app_id_uri"], "approvals.app_id_uri").strip()
            if any(c.isspace() for c in app_id_uri) or ":" not in app_id_uri:
                self.fail(m["app_id_uri"].pos, f"approvals.app_id_uri: '{app_id_uri}' is not a URI",
                          "the Application ID URI of the gateway's app registration, e.g. api://nhi-gateway")
        if app_id_uri and "client_id" not in ids:
            self.fail(m["app_id_uri"].key_pos or m["app_id_uri"].pos, "approvals.app_id_uri needs approvals.client_id",
                      "name the app registration by its client id too (v2 tokens carry it in aud)")
        scope = "Approvals.Decide"
        if "scope" in m:
            scope = self.string(m["scope"], "approvals.scope").strip()
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,120}", scope):
                self.fail(m["scope"].pos, f"approvals.scope: '{scope}' is not a scope name",
                          "the scope's value as exposed by the app registration, e.g. Approvals.Decide")
        context = None
        if "require_auth_context" in m:
            context = self.string(m["require_auth_context"], "approvals.require_auth_context").strip()
            if not re.fullmatch(r"c([1-9]|[1-9][0-9])", context):
                self.fail(m["require_auth_context"].pos,
                          f"approvals.require_auth_context: '{context}' is not an authentication context id",
                          "Entra's ids are c1 to c99 (Conditional Access > Authentication contexts)")
        mfa = self.boolean(m["require_mfa"], "approvals.require_mfa") if "require_mfa" in m else False
        return ApprovalsConfig(webhook, ids.get("client_id"), app_id_uri, scope, context, mfa,
                               ids.get("login_client_id"))

    def identity(self, node: _Value) -> IdentityConfig:
        for key, kpos, _ in self.entries(node, "identity"):
            if key in _OLD_IDENTITY_KEYS:
                self.fail(kpos, f"identity.{key}: audiences and issuers are now given per token source "
                                "(identity.bearer, identity.proxy), so that a token minted for one source "
                                "is refused in the other", _PER_SOURCE_HINT)
        m = self.mapping(
            node,
            "identity",
            {
                "tenants": True,
                "bearer": False,
                "proxy": False,
                "leeway_seconds": False,
                "client_secret_grants": False,
            },
        )
        self.tenants = frozenset(t for t, _ in self.guids(m["tenants"], "identity.tenants"))
        sources = {source: self.token_source(m[str(source)], source) for source in TokenSource if str(source) in m}
        if not sources:
            self.fail(node.key_pos or node.pos, "identity accepts no token: it names no token source",
                      _PER_SOURCE_HINT)
        self.token_sources = frozenset(sources)
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
        return IdentityConfig(self.tenants, sources.get(TokenSource.PROXY), sources.get(TokenSource.BEARER),
                              leeway, secret_grants)

    def token_source(self, node: _Value, source: TokenSource) -> SourceTrust:
        what = f"identity.{source}"
        keys = {"audiences": True, "issuers": True}
        if source is TokenSource.PROXY:
            keys["graph_token"] = False
        m = self.mapping(node, what, keys)
        audiences = [(a.strip(), pos) for a, pos in self.strings(m["audiences"], f"{what}.audiences")]
        issuers = tuple(
            self.issuer(item, f"{what}.issuers[{i}]")
            for i, item in enumerate(self.seq(m["issuers"], f"{what}.issuers", non_empty=True))
        )
        graph_token = self.boolean(m["graph_token"], f"{what}.graph_token") if "graph_token" in m else False
        graph = [(a, pos) for a, pos in audiences if a.lower().rstrip("/") in _GRAPH_AUDIENCES]
        if source is TokenSource.PROXY and graph and not graph_token:
            self.fail(graph[0][1], f"{what}.audiences: '{graph[0][0]}' is Microsoft Graph's audience: a Graph "
                                   "token in the proxy credentials is presented to Graph on the caller's behalf",
                      "if this deployment's clients put the Graph token itself in HTTPS_PROXY, say so with "
                      "'graph_token: true' under identity.proxy; otherwise list the gateway's own API here "
                      "(its client id or App ID URI) and keep Graph's audiences under identity.bearer")
        if graph_token and not graph:
            self.fail(m["graph_token"].pos, f"{what}.graph_token is true, but {what}.audiences lists none of "
                                            "Microsoft Graph's audiences",
                      "a proxy source that carries the Graph token lists https://graph.microsoft.com (and its "
                      "other spellings); remove graph_token otherwise")
        return SourceTrust(frozenset(a for a, _ in audiences), issuers, graph_token)

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
                needed = {TokenRequirement.PROXY: {TokenSource.PROXY}, TokenRequirement.BEARER: {TokenSource.BEARER},
                          TokenRequirement.BOTH: {TokenSource.PROXY, TokenSource.BEARER}}.get(token, set())
                missing = sorted(needed - self.token_sources)
                if missing:
                    self.fail(m["token"].pos, f"{what}.token: '{token}' needs a token in "
                                              f"{' and '.join(_SOURCE_NAMES[s] for s in missing)}, but "
                                              f"identity.{missing[0]} is not in the policy, so none is accepted there",
                              f"add identity.{missing[0]} (its audiences and issuers), or choose another token")
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
        m = self.mapping(node, "masking", {"default_profile": False, "pseudonym_key_env": False, "profiles": False})
        key_env = None
        if "pseudonym_key_env" in m:
            key_env = self.string(m["pseudonym_key_env"], "masking.pseudonym_key_env", "e.g. NHI_MASK_KEY")
            if not _ENV_NAME.fullmatch(key_env):
                self.fail(m["pseudonym_key_env"].pos,
                          f"masking.pseudonym_key_env: '{key_env}' is not an environment variable name",
                          "name the variable that holds the key (letters, digits and _), e.g. NHI_MASK_KEY; "
                          "never put the key itself in the policy")
        if "profiles" in m:
            for name, kpos, pnode in self.entries(m["profiles"], "masking.profiles"):
                what = f"masking profile '{name}'"
                if not _RULE_ID.fullmatch(name):
                    self.fail(kpos, f"{what}: invalid name", "use letters, digits and . _ : -")
                self.profiles[name] = self.mask_profile(name, pnode, what, m.get("pseudonym_key_env"), key_env)
        if "default_profile" in m:
            return self.profile_ref(m["default_profile"], "masking.default_profile")
        return None

    def mask_profile(self, name: str, node: _Value, what: str, key_node: _Value | None,
                     key_env: str | None) -> MaskProfile:
        m = self.mapping(node, what, {"fields": False, "paths": False, "detectors": False, "binary": False})
        if not any(k in m for k in ("fields", "paths", "detectors")):
            self.fail(node.key_pos or node.pos, f"{what} masks nothing: give fields, paths or detectors",
                      "e.g. fields: [mail, mobilePhone], or detectors: [email, graph_secret]")
        fields = self.mask_targets(m["fields"], f"{what}.fields", self.mask_field) if "fields" in m else {}
        paths = self.mask_targets(m["paths"], f"{what}.paths", self.mask_path) if "paths" in m else {}
        detectors = self.mask_targets(m["detectors"], f"{what}.detectors", self.detector) if "detectors" in m else {}
        binary = None
        if "binary" in m:
            binary = BinaryBodies(self.choice(m["binary"], f"{what}.binary", [b.value for b in BinaryBodies]))
        key = None
        uses = [(t, pos) for targets in (fields, paths, detectors) for t, (style, pos) in targets.items()
                if style is Style.PSEUDONYM]
        if uses:
            key = self.pseudonym_key(uses[0], what, key_node, key_env)
        return MaskProfile(
            name,
            {k: s for k, (s, _) in fields.items()},
            paths={k: s for k, (s, _) in paths.items()},
            detectors={k: s for k, (s, _) in detectors.items()},
            binary=binary,
            pseudonym_key=key,
        )

    def mask_targets(self, node: _Value, what: str, check) -> dict[str, tuple[Style, Pos]]:
        """``[a, b]`` (each redacted) or ``{a: style, b: style}``; ``check(text, pos, what)``
        returns the entry as it is kept."""
        out: dict[str, tuple[Style, Pos]] = {}
        styles = [s.value for s in Style]
        if isinstance(node.value, dict):
            items = []
            for k, kpos, v in self.entries(node, what):
                if v.value is None:
                    self.fail(kpos, f"{what}: '{k}' has no style", f"write '{k}: redact' (or {', '.join(styles)})")
                items.append((k, kpos, Style(self.choice(v, f"{what}: '{k}'", styles))))
            if not items:
                self.fail(node.pos, f"{what} must not be empty")
        else:
            hint = "a list (each entry redacted) or a mapping of entry to style (redact, partial, pseudonym)"
            items = [(k, pos, Style.REDACT) for k, pos in self.strings(node, what, hint)]
        folded: dict[str, str] = {}
        for k, kpos, style in items:
            entry = check(k, kpos, what)
            same = folded.get(str(entry).casefold())
            if same is not None and out[same][0] is not style:
                self.fail(kpos, f"{what}: '{entry}' is listed twice with different styles",
                          "names match case-insensitively; keep one entry")
            folded.setdefault(str(entry).casefold(), entry)
            out[entry] = (style, kpos)
        return out

    def mask_field(self, name: str, pos: Pos, what: str) -> str:
        name = name.strip()
        if not name:
            self.fail(pos, f"{what}: a field name must not be empty")
        if "[" in name or "]" in name or name.startswith("$"):
            # A path spelt as a name would silently match nothing, leaving the value unmasked.
            path = name if name.startswith("$") else "$.." + name.lstrip(".").replace("[]", "[*]")
            self.fail(pos, f"{what}: '{name}' is a path, but fields are member names matched wherever they occur",
                      f"list it under paths as '{path}', or give the last name alone")
        return name

    def mask_path(self, text: str, pos: Pos, what: str) -> str:
        text = text.strip()
        try:
            compile_path(text)
        except JSONPathError as e:
            self.fail(self.inside(pos, text, e.offset),
                      f"{what}: invalid JSON path '{text}': {e.message} (at character {e.offset + 1})",
                      e.hint or "supported: $, .name, ['name'], .* or [*], [0], ..name")
        return text

    def inside(self, pos: Pos, text: str, offset: int) -> Pos:
        """The position of ``text[offset]`` when ``text`` is written as is (plain or quoted, on
        one line) at ``pos``; ``pos`` itself otherwise."""
        lines = self.text.splitlines()
        line = lines[pos[0]] if 0 <= pos[0] < len(lines) else ""
        start = pos[1] + (1 if line[pos[1]:pos[1] + 1] in ("'", '"') else 0)
        return (pos[0], start + offset) if line.startswith(text, start) else pos

    def detector(self, text: str, pos: Pos, what: str) -> str:
        names = [d.value for d in Detector]
        if text not in names:
            hint = _suggest(text, names) or f"use one of: {', '.join(names)}"
            self.fail(pos, f"{what}: unknown detector '{text}'", hint)
        return text

    def pseudonym_key(self, use: tuple[str, Pos], what: str, key_node: _Value | None,
                      key_env: str | None) -> PseudonymKey:
        entry, pos = use
        if key_env is None or key_node is None:
            self.fail(pos, f"{what}: '{entry}' asks for pseudonyms, but masking.pseudonym_key_env is not set",
                      "add 'pseudonym_key_env: NHI_MASK_KEY' under masking and set that environment variable "
                      "to a long random value before the gateway starts")
        raw = self.environ.get(key_env)
        # Never the value itself in a message: only whether it is there and how long it is.
        if not raw:
            self.fail(key_node.pos, f"masking.pseudonym_key_env: the environment variable {key_env} is not set "
                                    f"(or empty), and {what} makes pseudonyms with it",
                      f"set {key_env} to a long random value, e.g. {key_env}=$(openssl rand -base64 32), and keep it "
                      "the same across restarts so that pseudonyms stay the same")
        key = raw.encode("utf-8", "surrogateescape")
        if len(key) < MIN_KEY_BYTES:
            self.fail(key_node.pos, f"masking.pseudonym_key_env: the key in {key_env} is {len(key)} bytes long; "
                                    f"a pseudonym key needs at least {MIN_KEY_BYTES}",
                      f"e.g. {key_env}=$(openssl rand -base64 32)")
        return PseudonymKey(key, f"${key_env}")

    def profile_ref(self, node: _Value, what: str) -> str:
        name = self.string(node, what)
        if name not in self.profiles:
            known = ", ".join(self.profiles) or "none are defined"
            hint = _suggest(name, self.profiles) or f"define it under masking.profiles (known: {known})"
            self.fail(node.pos, f"{what}: unknown mask profile '{name}'", hint)
        return name

    def rules(self, node: _Value, report_all: bool = False) -> list[Rule]:
        rules: list[Rule] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(self.seq(node, "rules")):
            rule, id_pos = self.rule(item, i, report_all)
            if rule.id in seen:
                self.fail(
                    id_pos,
                    f"duplicate rule id '{rule.id}'",
                    f"the first rule with this id is at line {seen[rule.id]}",
                )
            seen[rule.id] = rule.line
            rules.append(rule)
        return rules

    def rule(self, node: _Value, index: int, report_all: bool = False) -> tuple[Rule, Pos]:
        keys = {
            "id": True,
            "description": False,
            "action": True,
            "when": False,
            "operations": True,
            "odata": False,
            "schedule": False,
            "approval": False,
            "mask": False,
            "mode": False,
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
        odata = None
        if "odata" in m:
            odata = self.odata(m["odata"], f"{what}: odata")
            for i, om in enumerate(operations):
                if om.host not in GRAPH_HOSTS:
                    self.fail(
                        m["odata"].key_pos or m["odata"].pos,
                        f"{what}: odata limits apply to Graph requests, but operations[{i}] is for '{om.host}'",
                        "move the odata limits into the Graph operations, or the other operation into "
                        "a rule of its own",
                    )
        schedule = self.schedule(m["schedule"], f"{what}: schedule") if "schedule" in m else None
        approval = None
        if action is Action.APPROVE:
            if "approval" not in m:
                self.fail(
                    m["action"].pos,
                    f"{what}: action approve needs 'approval', naming who may approve",
                    "add e.g. approval: {approvers: {groups: [<group id>]}, timeout: 5m}",
                )
            approval = self.approval(m["approval"], f"{what}: approval")
        elif "approval" in m:
            self.fail(
                m["approval"].key_pos or m["approval"].pos,
                f"{what}: 'approval' applies to action: approve only, not {action}",
                "remove it, or make the rule action: approve",
            )
        mask = None
        if "mask" in m:
            if action is Action.DENY:
                self.fail(m["mask"].pos, f"{what}: 'mask' has no effect on a deny rule", "remove it")
            mask = self.profile_ref(m["mask"], f"{what}: mask")
        rule = Rule(
            rule_id,
            action,
            operations,
            when,
            mask,
            description,
            node.pos[0] + 1,
            odata=odata,
            schedule=schedule,
            approval=approval,
            column=node.pos[1] + 1,
            report_only=self.mode(m.get("mode"), what, action, report_all),
        )
        return rule, m["id"].pos

    def mode(self, node: _Value | None, what: str, action: Action, report_all: bool) -> bool:
        """``mode: enforce | report`` of a rule; the policy's ``mode: report`` is the default of its
        deny and approve rules. An allow rule has nothing to report."""
        if node is None:
            return report_all and action is not Action.ALLOW
        mode = self.choice(node, f"{what}: mode", MODES)
        if mode == "report" and action is Action.ALLOW:
            self.fail(node.pos, f"{what}: mode: report applies to deny and approve rules; an allow rule "
                                "refuses nothing", "remove it")
        return mode == "report"

    def odata(self, node: _Value, what: str) -> ODataLimits:
        keys = {"forbid_select": False, "forbid_expand": False, "max_top": False, "allow_select": False}
        m = self.mapping(node, what, keys)
        if not m:
            self.fail(
                node.key_pos or node.pos,
                f"{what} limits nothing",
                "give forbid_select, forbid_expand, allow_select or max_top, or remove it",
            )
        names = {}
        for key in ("forbid_select", "forbid_expand", "allow_select"):
            if key not in m:
                continue
            out = []
            if key == "allow_select" and isinstance(m[key].value, list) and not m[key].value:
                self.fail(m[key].pos, f"{what}.allow_select must not be empty",
                          "list the properties a request may ask for, e.g. [id, displayName]; "
                          "to refuse every request, use a deny rule")
            for i, (name, pos) in enumerate(self.strings(m[key], f"{what}.{key}", "e.g. [keyCredentials]")):
                name = name.strip()
                if not _PROPERTY.fullmatch(name):
                    self.fail(
                        pos,
                        f"{what}.{key}[{i}]: '{name}' is not a property name",
                        "write one property name such as keyCredentials: '*' and paths are "
                        "covered already, since every segment of a requested path is checked",
                    )
                out.append(name)
            names[key] = tuple(dict.fromkeys(out))
        max_top = self.integer(m["max_top"], f"{what}.max_top", 1, MAX_TOP) if "max_top" in m else None
        return ODataLimits(names.get("forbid_select", ()), names.get("forbid_expand", ()), max_top,
                           names.get("allow_select"))

    def schedule(self, node: _Value, what: str) -> Schedule:
        keys = {"days": False, "hours": False, "timezone": False, "valid_from": False, "valid_until": False}
        m = self.mapping(node, what, keys)
        if not m:
            self.fail(
                node.key_pos or node.pos,
                f"{what} is empty",
                "give days, hours (with timezone), valid_from or valid_until, or remove it",
            )
        timezone = ""
        zone = None
        if "timezone" in m:
            timezone = self.string(m["timezone"], f"{what}.timezone", "an IANA name such as Europe/Berlin or UTC")
            timezone = timezone.strip()
            zone = self.zone(timezone, m["timezone"].pos, f"{what}.timezone")
        days: set[int] = set()
        if "days" in m:
            for i, (text, pos) in enumerate(self.one_or_more(m["days"], f"{what}.days", "e.g. [mon-fri]")):
                days |= self.days(text, pos, f"{what}.days[{i}]")
        hours: list[tuple[int, int]] = []
        if "hours" in m:
            for i, (text, pos) in enumerate(self.one_or_more(m["hours"], f"{what}.hours", 'e.g. "08:00-18:00"')):
                hours.append(self.hours(text, pos, f"{what}.hours[{i}]"))
        if (days or hours) and zone is None:
            first = m.get("days") or m["hours"]
            self.fail(
                first.key_pos or first.pos,
                f"{what}: days and hours need a timezone",
                "add timezone: an IANA name such as Europe/Berlin (or UTC): a rule must not change "
                "its meaning with the gateway host's clock settings",
            )
        valid_from = self.instant(m["valid_from"], f"{what}.valid_from", zone) if "valid_from" in m else None
        valid_until = self.instant(m["valid_until"], f"{what}.valid_until", zone) if "valid_until" in m else None
        if valid_from is not None and valid_until is not None and valid_until <= valid_from:
            self.fail(
                m["valid_until"].pos,
                f"{what}: valid_until ({valid_until.isoformat()}) is not after valid_from "
                f"({valid_from.isoformat()})",
                "the rule would never be in force",
            )
        return Schedule(frozenset(days), tuple(sorted(hours)), timezone, valid_from, valid_until)

    def one_or_more(self, node: _Value, what: str, hint: str) -> list[tuple[str, Pos]]:
        if isinstance(node.value, str):
            return [(self.string(node, what, hint), node.pos)]
        return self.strings(node, what, hint)

    def zone(self, name: str, pos: Pos, what: str) -> ZoneInfo:
        try:
            return ZoneInfo(name)
        except Exception:  # noqa: BLE001 - ZoneInfoNotFoundError, ValueError for odd keys, OSError
            from zoneinfo import available_timezones

            hint = _suggest(name, available_timezones()) or "use an IANA name such as Europe/Berlin or UTC"
            self.fail(pos, f"{what}: unknown time zone '{name}'", hint)

    def days(self, text: str, pos: Pos, what: str) -> set[int]:
        first, dash, last = text.strip().lower().partition("-")
        names = [first, last] if dash else [first]
        for name in names:
            if name.strip() not in WEEKDAYS:
                self.fail(
                    pos,
                    f"{what}: '{text.strip()}' is not a day or a range of days",
                    _suggest(name.strip(), WEEKDAYS) or "use mon tue wed thu fri sat sun, or a range: mon-fri",
                )
        start = WEEKDAYS.index(names[0].strip())
        end = WEEKDAYS.index(names[-1].strip())
        return {(start + i) % 7 for i in range((end - start) % 7 + 1)}

    def hours(self, text: str, pos: Pos, what: str) -> tuple[int, int]:
        m = _HOURS.fullmatch(text.strip())
        hint = 'write "HH:MM-HH:MM" in 24-hour time, e.g. "08:00-18:00"; "24:00" ends at midnight'
        if not m:
            self.fail(pos, f"{what}: '{text.strip()}' is not a range of hours", hint)
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
            self.fail(pos, f"{what}: '{text.strip()}' is not a time of day", hint)
        start, end = h1 * 3600 + m1 * 60, h2 * 3600 + m2 * 60
        if end == start:
            self.fail(pos, f"{what}: '{text.strip()}' is empty", hint)
        if end < start:
            self.fail(
                pos,
                f"{what}: '{text.strip()}' runs past midnight",
                f'write two ranges: ["{_hhmm(start)}-24:00", "00:00-{_hhmm(end)}"] (days are '
                "checked on the local date of each request)",
            )
        return start, end

    def instant(self, node: _Value, what: str, zone: ZoneInfo | None) -> datetime:
        hint = "write an ISO 8601 time with an offset, e.g. 2025-07-01T08:00:00+02:00 or 2025-07-01T06:00:00Z"
        v = node.value
        if isinstance(v, datetime):
            value = datetime(v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, tzinfo=v.tzinfo)
        elif isinstance(v, date):
            self.fail(node.pos, f"{what}: {v.isoformat()} is a date without a time", hint)
        elif isinstance(v, str):
            try:
                value = datetime.fromisoformat(v.strip())
            except ValueError:
                self.fail(node.pos, f"{what}: '{v.strip()}' is not a time", hint)
        else:
            self.fail(node.pos, f"{what} must be a time, not {_kind(v)}", hint)
        if value.tzinfo is None or value.utcoffset() is None:
            if zone is None:
                self.fail(
                    node.pos,
                    f"{what}: '{value.isoformat()}' has no offset and the schedule has no timezone",
                    hint + ", or give the schedule a timezone",
                )
            value = value.replace(tzinfo=zone)
        return value.astimezone(UTC)

    def approval(self, node: _Value, what: str) -> Approval:
        m = self.mapping(node, what, {"approvers": True, "timeout": False, "max_grant": False})
        approvers = self.mapping(m["approvers"], f"{what}.approvers", {"users": False, "groups": False})
        if not approvers:
            self.fail(
                m["approvers"].key_pos or m["approvers"].pos,
                f"{what}.approvers names nobody",
                "give users: [<object id>, ...] and/or groups: [<group id>, ...]",
            )
        users = frozenset(u for u, _ in self.guids(approvers["users"], f"{what}.approvers.users")) \
            if "users" in approvers else frozenset()
        groups = frozenset(g for g, _ in self.guids(approvers["groups"], f"{what}.approvers.groups")) \
            if "groups" in approvers else frozenset()
        timeout = DEFAULT_APPROVAL_TIMEOUT
        if "timeout" in m:
            timeout = self.duration(m["timeout"], f"{what}.timeout", 1, MAX_APPROVAL_TIMEOUT)
        max_grant = None
        if "max_grant" in m:
            max_grant = self.duration(m["max_grant"], f"{what}.max_grant", MIN_GRANT, MAX_GRANT)
        return Approval(users, groups, timeout, max_grant)

    def duration(self, node: _Value, what: str, lo: int, hi: int) -> int:
        hint = "write a duration such as 30s, 5m, 1h or 1h30m"
        v = node.value
        if isinstance(v, int) and not isinstance(v, bool):
            self.fail(node.pos, f"{what}: {v} has no unit", f"{hint} ({v}s if you meant seconds)")
        text = self.string(node, what, hint).strip()
        m = _DURATION.fullmatch(text)
        if not m or not text:
            self.fail(node.pos, f"{what}: '{text}' is not a duration", hint)
        d, h, mi, s = (int(g) if g else 0 for g in m.groups())
        seconds = int(timedelta(days=d, hours=h, minutes=mi, seconds=s).total_seconds())
        if not lo <= seconds <= hi:
            self.fail(
                node.pos,
                f"{what}: {text} is outside {_duration(lo)} to {_duration(hi)}",
                hint,
            )
        return seconds

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
        m = self.mapping(
            node, what, {"host": True, "methods": True, "paths": True, "versions": False, "odata": False}
        )
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
        odata = None
        if "odata" in m:
            if not graph:
                self.fail(
                    m["odata"].key_pos or m["odata"].pos,
                    f"{what}: odata limits apply to Graph hosts only, not '{host}'",
                    "remove odata",
                )
            odata = self.odata(m["odata"], f"{what}.odata")
        return OperationMatch(host, frozenset(methods), paths, odata)

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
        if graph:
            # Written like requests are read: /directoryObjects/{id}/microsoft.graph.user is /users/{id}.
            segments = canonical_segments(segments)
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


# --- findings for policy authors (lint) ------------------------------------------------------------


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
