"""The shape of a policy file, said once: typed models that check a policy and generate its schema.

The loader (:mod:`nhi_gateway.policy.loader`) validates the YAML data with :class:`PolicyDoc` and
turns what it returns into a :class:`~nhi_gateway.policy.model.Policy`;
``policies/policy.schema.json`` (for YAML language servers) is :func:`policy_schema`'s output,
written by ``nhi-gateway policy schema`` and kept equal to it by a test.

Every check raises :func:`problem`: a message whose ``WHAT`` the loader replaces with the name of
the place (``rule 'r': operations[0].methods[1]``), a hint, and optionally a place below the
one validated (``at``) and whether the key rather than the value is meant. The loader turns it into
``file:line:column`` from the positions the YAML reader kept. Checks that need more than one value
(hosts listed under upstreams, unique rule ids, known mask profiles) read what earlier fields
left in the validation context, so a policy is checked in one pass, top to bottom, in file order
of sections, as an author reads it.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticCustomError

from nhi_gateway.identity.principal import AuthMethod, TokenSource
from nhi_gateway.masking.masks import (
    MIN_KEY_BYTES,
    BinaryBodies,
    Detector,
    JSONPathError,
    PseudonymKey,
    Style,
    compile_path,
)
from nhi_gateway.policy.decision import Action
from nhi_gateway.policy.model import (
    ANY_METHOD,
    MAX_APPROVAL_TIMEOUT,
    MAX_GRANT,
    MAX_LEEWAY,
    MAX_TOP,
    METHODS,
    MIN_GRANT,
    MODES,
    WEEKDAYS,
    ClientSecretGrants,
    PathPattern,
    TokenRequirement,
    _hhmm,
)
from nhi_gateway.policy.operation import GRAPH_HOSTS, GRAPH_VERSIONS, OperationError, canonical_segments, normalize_host

WHAT = "\x00"  # replaced by the name of the place; YAML text cannot contain it

GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
NAME = r"[A-Za-z0-9][A-Za-z0-9_.:\-]*"  # rule ids and mask profile names
PROPERTY = r"[A-Za-z_][A-Za-z0-9_.]*"  # an OData property (a type-cast segment has dots)
ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_GUID = re.compile(GUID)
_NAME = re.compile(NAME)
_PROPERTY = re.compile(PROPERTY)
_ENV_NAME = re.compile(ENV_NAME)
_PLACEHOLDER = re.compile(r"\{[^}]*\}")
_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_BAD_LITERAL = re.compile(r"[{}*%\\\s\x00-\x1f\x7f?#]")
_HOURS = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
# xms_mirid: /subscriptions/<sub>/resourcegroups/<rg>/providers/<namespace>/<type>/<name>[/...]
_ARM_ID = re.compile(r"/subscriptions/[^/\s]+/resourcegroups/[^/\s]+/providers/[^/\s]+(/[^/\s]+){2,}", re.I)
_STS_V1 = "https://sts.windows.net/{tenantid}/"
_STS_V1_DISCOVERY = "https://login.microsoftonline.com/{tenantid}/.well-known/openid-configuration"
URL_HINT = "e.g. https://login.microsoftonline.com/{tenantid}/v2.0"
DURATION_HINT = "write a duration such as 30s, 5m, 1h or 1h30m"


def problem(message: str, hint: str = "", at: tuple = (), key: bool = False, inside: tuple | None = None,
            sub: tuple = (), up: int = 0, where: tuple | None = None):
    """What is wrong, where below the place validated (``sub`` is named in the message, ``at`` only
    pointed at; ``key``: the key rather than its value), and what to do. ``message`` says
    :data:`WHAT` for the name of the place (of its parent with ``up=1``) or names nothing."""
    return PydanticCustomError("policy", "a policy problem", {"detail": Detail(
        {"message": message, "hint": hint, "at": at, "key": key, "inside": inside, "sub": sub, "up": up,
         "where": where})})


class Detail(dict):
    """The problem, out of pydantic's reach: pydantic renders every context value as UTF-8 text,
    and a policy's text may hold what UTF-8 cannot encode (a lone surrogate)."""

    def __str__(self) -> str:
        return "a policy problem"

    __repr__ = __str__


def detail_of(err: dict) -> Detail | None:
    return (err.get("ctx") or {}).get("detail")


def kind(v: object) -> str:
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


def suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean '{close[0]}'?" if close else ""


def duration_text(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _ctx(info: ValidationInfo) -> dict:
    return info.context if info is not None and info.context is not None else {}


# --- leaves: one function checks a value, one schema fragment describes it --------------------------


def leaf(check, schema: dict):
    return [PlainValidator(check), WithJsonSchema(schema)]


def _string(v: Any, hint: str = "") -> str:
    if not isinstance(v, str):
        raise problem(f"{WHAT} must be a string, not {kind(v)}", hint)
    if not v.strip():
        raise problem(f"{WHAT} must not be empty", hint)
    return v


def text_of(hint: str = ""):
    return lambda v: _string(v, hint)


def _choice(v: Any, choices: list[str]) -> str:
    value = _string(v, f"one of: {', '.join(choices)}")
    if value not in choices:
        hint = suggest(value, choices) or f"use one of: {', '.join(choices)}"
        raise problem(f"{WHAT} must be one of {', '.join(choices)}, not '{value}'", hint)
    return value


def choice_of(choices: Iterable[str], description: str = ""):
    choices = [str(c) for c in choices]
    schema: dict = {"enum": choices}
    if description:
        schema["description"] = description
    return leaf(lambda v: _choice(v, choices), schema)


def _guid(v: Any) -> str:
    value = _string(v)
    if not _GUID.fullmatch(value.strip()):
        raise problem(
            f"{WHAT}: '{value}' is not a GUID",
            "use the object's id GUID (e.g. 72f988bf-86f1-41af-91ab-2d7cd011db47), not a name or domain",
        )
    return value.strip().lower()


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise problem(f"{WHAT} must be true or false, not {kind(v)}", "YAML 1.2: write true, not yes")
    return v


def integer_between(lo: int, hi: int, description: str):
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise problem(f"{WHAT} must be a whole number, not {kind(v)}")
        if not lo <= v <= hi:
            raise problem(f"{WHAT} must be between {lo} and {hi}, not {v}")
        return int(v)

    return leaf(check, {"type": "integer", "minimum": lo, "maximum": hi, "description": description})


def _url(v: Any) -> str:
    value = _string(v, URL_HINT).strip()
    for placeholder in _PLACEHOLDER.findall(value):
        if placeholder != "{tenantid}":
            raise problem(f"{WHAT}: unknown placeholder {placeholder}", "the only placeholder is {tenantid}")
    try:
        parts = urlsplit(value.replace("{tenantid}", "t"))
        ok = parts.scheme == "https" and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        raise problem(f"{WHAT}: '{value}' is not an https URL", URL_HINT)
    return value


def _host(v: Any) -> str:
    value = _string(v, "a host name such as graph.microsoft.com")
    try:
        return normalize_host(value)
    except OperationError:
        raise problem(
            f"{WHAT}: '{value}' is not a host name", "write the host only, without scheme, port or path"
        ) from None


def _listed(v: Any, hint: str = "", non_empty: bool = True) -> list:
    if not isinstance(v, list):
        example = f"write [{v}]" if isinstance(v, str | int) and not isinstance(v, bool) else hint
        raise problem(f"{WHAT} must be a list, not {kind(v)}", example)
    if non_empty and not v:
        raise problem(f"{WHAT} must not be empty", hint)
    return v


def list_of(item, hint: str = "", non_empty: bool = True, **field):
    """A list of ``item``; ``[x]`` is what a lone value is told to become."""
    return Annotated[list[item], BeforeValidator(lambda v: _listed(v, hint, non_empty)),
                     Field(min_length=1 if non_empty else 0, **field)]


Text = Annotated[str, *leaf(text_of(), {"ref!": "text"})]
Guid = Annotated[str, *leaf(_guid, {"ref!": "guid"})]
Boolean = Annotated[bool, *leaf(_boolean, {"type": "boolean"})]
HttpsUrl = Annotated[str, *leaf(_url, {"ref!": "httpsUrl"})]
Host = Annotated[str, *leaf(_host, {"ref!": "text"})]


def guids(description: str):
    return Annotated[list[Guid], *_list_checks(""), WithJsonSchema({"ref!": "guids", "description": description})]


def texts(description: str, hint: str = ""):
    Item = Annotated[str, *leaf(text_of(hint), {"ref!": "text"})]
    return Annotated[list[Item], *_list_checks(hint), WithJsonSchema({"ref!": "texts", "description": description})]


def _list_checks(hint: str, non_empty: bool = True):
    return [BeforeValidator(lambda v: _listed(v, hint, non_empty))]


DEFS: dict[str, dict] = {
    "text": {"type": "string", "pattern": r"\S"},
    "guid": {"type": "string", "pattern": rf"^\s*{GUID}\s*$", "description": "A GUID (object id, app id, tenant id)."},
    "guids": {"type": "array", "minItems": 1, "items": {"ref!": "guid"}},
    "texts": {"type": "array", "minItems": 1, "items": {"ref!": "text"}},
    "httpsUrl": {
        "type": "string",
        "pattern": r"^\s*[Hh][Tt][Tt][Pp][Ss]://\S",
        "description": "An https URL; the only placeholder is {tenantid}.",
    },
    "maskStyle": {
        "enum": [s.value for s in Style],
        "description": 'redact: the value becomes "[masked]"; partial: a hint is kept (a***@contoso.com, '
        "abc***); pseudonym: a keyed HMAC-SHA256 token, the same for the same value within a deployment "
        "(needs masking.pseudonym_key_env).",
    },
    "dayRange": {
        "type": "string",
        "pattern": r"^\s*(DAY)(\s*-\s*(DAY))?\s*$".replace(
            "DAY", "|".join("".join(f"[{c.upper()}{c}]" for c in d) for d in WEEKDAYS)
        ),
    },
    "hourRange": {"type": "string", "pattern": r"^\s*\d{1,2}:\d{2}\s*-\s*\d{1,2}:\d{2}\s*$"},
    "instant": {
        "type": "string",
        "pattern": r"^\s*\d{4}-\d{2}-\d{2}[T ]\d",
        "description": "An ISO 8601 time with an offset (2025-07-01T08:00:00+02:00, ...Z), or without one "
        "when the schedule has a timezone.",
    },
    "duration": {
        "type": "string",
        "pattern": r"^\s*(?=\d)(\d+d)?(\d+h)?(\d+m)?(\d+s)?\s*$",
        "description": "A duration: 30s, 5m, 1h, 1h30m, 2d.",
    },
    "pathPattern": {
        "type": "string",
        "pattern": "^/",
        "description": "A canonical path: {name} or * is one segment, ** (last) is any number; an optional "
        "/v1.0 or /beta first.",
    },
}


# --- mappings ---------------------------------------------------------------------------------------


class Shape(BaseModel):
    """A mapping of the policy: only its own keys, each once; a key whose value is null is absent
    (a commented-out list), unless it is required."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    _keys: ClassVar[dict[str, bool]]  # key -> required, in the order the class declares them

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        fields = cls.model_fields
        order = cls.__dict__.get("KEYS") or tuple(fields)  # as an author reads them; fields are checked in class order
        cls._keys = {name: fields[name].is_required() for name in order}

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise problem(f"{WHAT} must be a mapping, not {kind(value)}")
        keys = cls._keys
        for k in value:
            if not isinstance(k, str):
                raise problem(f"{WHAT}: keys must be strings, not {kind(k)}", at=(k,), key=True)
        cls._before_keys(value)
        out = {}
        for k, v in value.items():
            if k not in keys:
                raise problem(
                    f"unknown key '{k}' in {WHAT}; allowed keys: {', '.join(keys)}",
                    suggest(k, keys), at=(k,), key=True,
                )
            if v is not None:
                out[k] = v
            elif keys[k]:
                raise problem(f"{WHAT}: '{k}' has no value", at=(k,), key=True)
        for k, required in keys.items():
            if required and k not in out:
                raise problem(f"{WHAT} is missing the required key '{k}'", key=True)
        cls._first(out)
        return out

    @classmethod
    def _first(cls, keys: dict) -> None:
        """What to check of the keys given before their values are read."""

    @classmethod
    def _before_keys(cls, value: dict) -> None:
        """What to say of a key before it is refused as unknown (a key that moved)."""


def optional(annotation, description: str = ""):
    return Annotated[annotation | None, Field(description=description or None)]


# --- identity and upstreams -------------------------------------------------------------------------


class IssuerDoc(Shape):
    issuer: HttpsUrl
    discovery: HttpsUrl | None = None

    def discovery_url(self) -> str:
        if self.discovery is not None:
            return self.discovery
        if self.issuer == _STS_V1:
            return _STS_V1_DISCOVERY  # sts.windows.net serves no metadata itself
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


def _issuer(v: Any, info: ValidationInfo) -> IssuerDoc:
    if isinstance(v, dict):
        return IssuerDoc.model_validate(v, context=_ctx(info))
    return IssuerDoc.model_construct(issuer=_url(v), discovery=None)


Issuer = Annotated[IssuerDoc, PlainValidator(_issuer), WithJsonSchema({"ref!": "issuer"})]


# Microsoft Graph's audience spellings (compared without case and trailing slash).
_GRAPH_AUDIENCES = frozenset({"https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000"})
_OLD_IDENTITY_KEYS = ("audiences", "issuers")
_SOURCE_NAMES = {TokenSource.PROXY: "the proxy credentials (HTTPS_PROXY=http://name:<token>@host:port)",
                 TokenSource.BEARER: "Authorization: Bearer"}
PER_SOURCE_HINT = """write them per token source, e.g.
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


class SourceDoc(Shape):
    """What one token source accepts: its tokens' audiences and issuers."""

    audiences: texts("The token's aud must be one of these, compared exactly.")
    issuers: Annotated[
        list[Issuer], *_list_checks(""), Field(min_length=1,
            description="Issuer templates; {tenantid} becomes the token's tid and must then equal iss.")
    ]

    def graph_audiences(self) -> list[tuple[int, str]]:
        return [(i, a.strip()) for i, a in enumerate(self.audiences)
                if a.strip().lower().rstrip("/") in _GRAPH_AUDIENCES]


class BearerSourceDoc(SourceDoc):
    """Tokens in Authorization: Bearer: usually the Graph token (v1 issuer sts.windows.net, Graph's audience
    spellings)."""


class ProxySourceDoc(SourceDoc):
    """Tokens in the proxy credentials (HTTPS_PROXY=http://name:<token>@host:port): usually a token for the
    gateway's own API (v2 issuer, aud = its client id or App ID URI), which never leaves the gateway."""

    graph_token: Annotated[bool | None, *leaf(_boolean, {
        "type": "boolean", "description": "true: this source carries the Graph token itself, presented upstream "
        "as Authorization: Bearer (its audiences must list Graph's)."})] = None

    @model_validator(mode="after")
    def _graph_token(self) -> ProxySourceDoc:
        graph = self.graph_audiences()
        if graph and not self.graph_token:
            i, audience = graph[0]
            raise problem(f"{WHAT}.audiences: '{audience}' is Microsoft Graph's audience: a Graph "
                          "token in the proxy credentials is presented to Graph on the caller's behalf",
                          "if this deployment's clients put the Graph token itself in HTTPS_PROXY, say so with "
                          "'graph_token: true' under identity.proxy; otherwise list the gateway's own API here "
                          "(its client id or App ID URI) and keep Graph's audiences under identity.bearer",
                          at=("audiences", i))
        if self.graph_token and not graph:
            raise problem("identity.proxy.graph_token is true, but identity.proxy.audiences lists none of "
                          "Microsoft Graph's audiences",
                          "a proxy source that carries the Graph token lists https://graph.microsoft.com (and its "
                          "other spellings); remove graph_token otherwise", at=("graph_token",))
        return self


class IdentityDoc(Shape):
    """Which tokens the gateway accepts at all: the tenants, and per token source (bearer, proxy) the audiences
    and issuers. At least one source; a source left out accepts no token. The old form (audiences and issuers
    directly here) no longer loads."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["bearer"]}, {"required": ["proxy"]}]})

    KEYS: ClassVar[tuple] = ("tenants", "bearer", "proxy", "leeway_seconds", "client_secret_grants")

    tenants: guids("Tenant ids (the token's tid) whose tokens are accepted.")
    proxy: optional(ProxySourceDoc) = None  # read before bearer, in the order of TokenSource
    bearer: optional(BearerSourceDoc) = None
    leeway_seconds: Annotated[
        int | None, *integer_between(0, MAX_LEEWAY, "Tolerated clock skew on exp/nbf, 0..300 (default 60).")
    ] = None
    client_secret_grants: Annotated[
        str | None,
        *choice_of(ClientSecretGrants, "Token requests that authenticate with a static client secret: allow, "
                   "flag (default: forwarded and flagged) or refuse."),
    ] = None

    @classmethod
    def _before_keys(cls, value: dict) -> None:
        for key in value:
            if key in _OLD_IDENTITY_KEYS:
                raise problem(f"identity.{key}: audiences and issuers are now given per token source "
                              "(identity.bearer, identity.proxy), so that a token minted for one source "
                              "is refused in the other", PER_SOURCE_HINT, at=(key,), key=True)

    @model_validator(mode="after")
    def _remember_tenants(self, info: ValidationInfo) -> IdentityDoc:
        if self.bearer is None and self.proxy is None:
            raise problem("identity accepts no token: it names no token source", PER_SOURCE_HINT, key=True)
        ctx = _ctx(info)
        ctx["tenants"] = frozenset(self.tenants)
        ctx["token_sources"] = frozenset(s for s in TokenSource if getattr(self, str(s)) is not None)
        return self


class UpstreamDoc(Shape):
    host: Annotated[str, *leaf(_host, {"ref!": "text", "description": "A host name only: no scheme, port or path."})]
    token: Annotated[
        str | None,
        *choice_of(TokenRequirement, "Which token sources a request must present: any (default), proxy, bearer, "
                   "both, none."),
    ] = None

    @model_validator(mode="after")
    def _listed_once(self, info: ValidationInfo) -> UpstreamDoc:
        ctx = _ctx(info)
        hosts = ctx.setdefault("upstream_hosts", set())
        if self.host in hosts:
            raise problem(f"{WHAT}: host '{self.host}' is listed twice", at=("host",))
        hosts.add(self.host)
        if self.token is not None:
            needed = {TokenRequirement.PROXY: {TokenSource.PROXY}, TokenRequirement.BEARER: {TokenSource.BEARER},
                      TokenRequirement.BOTH: {TokenSource.PROXY, TokenSource.BEARER}}.get(TokenRequirement(self.token), set())
            missing = sorted(needed - ctx.get("token_sources", frozenset(TokenSource)))
            if missing:
                raise problem(f"{WHAT}.token: '{self.token}' needs a token in "
                              f"{' and '.join(_SOURCE_NAMES[s] for s in missing)}, but "
                              f"identity.{missing[0]} is not in the policy, so none is accepted there",
                              f"add identity.{missing[0]} (its audiences and issuers), or choose another token",
                              at=("token",))
        return self


# --- masking ----------------------------------------------------------------------------------------


class _Entry(Exception):
    def __init__(self, message: str, hint: str = "", offset: int | None = None) -> None:
        self.message, self.hint, self.offset = message, hint, offset


def _field_entry(name: str) -> str:
    name = name.strip()
    if not name:
        raise _Entry("a field name must not be empty")
    if "[" in name or "]" in name or name.startswith("$"):
        # A path spelt as a name would silently match nothing, leaving the value unmasked.
        path = name if name.startswith("$") else "$.." + name.lstrip(".").replace("[]", "[*]")
        raise _Entry(f"'{name}' is a path, but fields are member names matched wherever they occur",
                     f"list it under paths as '{path}', or give the last name alone")
    return name


def _path_entry(text: str) -> str:
    text = text.strip()
    try:
        compile_path(text)
    except JSONPathError as e:
        raise _Entry(f"invalid JSON path '{text}': {e.message} (at character {e.offset + 1})",
                     e.hint or "supported: $, .name, ['name'], .* or [*], [0], ..name", e.offset) from None
    return text


def _detector_entry(text: str) -> str:
    names = [d.value for d in Detector]
    if text not in names:
        raise _Entry(f"unknown detector '{text}'", suggest(text, names) or f"use one of: {', '.join(names)}")
    return text


class MaskTargets(dict):
    """entry -> style, with where each entry was written (for the pseudonym key's error)."""

    where: dict[str, tuple[tuple, bool]]


def mask_targets(check, item_schema: dict, description: str):
    styles = [s.value for s in Style]

    def validate(v: Any) -> MaskTargets:
        """``[a, b]`` (each redacted) or ``{a: style, b: style}``."""
        items: list[tuple[str, tuple, bool, Style]] = []
        if isinstance(v, dict):
            for k, style in v.items():
                if not isinstance(k, str):
                    raise problem(f"{WHAT}: keys must be strings, not {kind(k)}", at=(k,), key=True)
                if style is None:
                    raise problem(f"{WHAT}: '{k}' has no style", f"write '{k}: redact' (or {', '.join(styles)})",
                                  at=(k,), key=True)
                if not isinstance(style, str) or style not in styles:
                    try:
                        _choice(style, styles)
                    except PydanticCustomError as e:
                        ctx = e.context["detail"]
                        raise problem(ctx["message"].replace(WHAT, f"{WHAT}: '{k}'", 1), ctx["hint"], at=(k,)) from None
                items.append((k, (k,), True, Style(style)))
            if not items:
                raise problem(f"{WHAT} must not be empty")
        else:
            hint = "a list (each entry redacted) or a mapping of entry to style (redact, partial, pseudonym)"
            _listed(v, hint)
            for i, k in enumerate(v):
                try:
                    _string(k, hint)
                except PydanticCustomError as e:
                    ctx = e.context["detail"]
                    raise problem(ctx["message"].replace(WHAT, f"{WHAT}[{i}]", 1), ctx["hint"], at=(i,)) from None
                items.append((k, (i,), False, Style.REDACT))
        out = MaskTargets()
        out.where = {}
        folded: dict[str, str] = {}
        for k, at, key, style in items:
            try:
                entry = check(k)
            except _Entry as e:
                inside = (k.strip(), e.offset) if e.offset is not None else None
                raise problem(f"{WHAT}: {e.message}", e.hint, at=at, key=key, inside=inside) from None
            same = folded.get(entry.casefold())
            if same is not None and out[same] is not style:
                raise problem(f"{WHAT}: '{entry}' is listed twice with different styles",
                              "names match case-insensitively; keep one entry", at=at, key=key)
            folded.setdefault(entry.casefold(), entry)
            out[entry] = style
            out.where.setdefault(entry, (at, key))
        return out

    schema = {"anyOf": [
        {"type": "array", "minItems": 1, "items": item_schema, "description": f"{description} A list: each is redacted."},
        {"type": "object", "minProperties": 1, "propertyNames": item_schema,
         "additionalProperties": {"ref!": "maskStyle"},
         "description": f"{description} A mapping: each names its style."},
    ]}
    return Annotated[MaskTargets | None, PlainValidator(validate), WithJsonSchema(schema)]


_MEMBER = {"type": "string", "pattern": r"^[^\[\]]*\S[^\[\]]*$"}
_DETECTORS = {"enum": [d.value for d in Detector]}


class MaskProfileDoc(Shape):
    """What a response must not show, and how it is hidden. At least one of fields, paths and detectors."""

    model_config = ConfigDict(json_schema_extra={
        "anyOf": [{"required": ["fields"]}, {"required": ["paths"]}, {"required": ["detectors"]}]})

    fields: mask_targets(_field_entry, _MEMBER,
                         "JSON member names masked wherever they occur (case-insensitively).") = None
    paths: mask_targets(_path_entry, {"type": "string", "pattern": r"^\s*\$"},
                        "JSON paths: $, .name, ['name'], .* or [*], [0], ..name "
                        "(e.g. $.value[*].identities[*].issuerAssignedId).") = None
    detectors: mask_targets(_detector_entry, _DETECTORS,
                            "Shapes found inside any string value and text body.") = None
    binary: Annotated[
        str | None,
        *choice_of(BinaryBodies, "Bodies the detectors cannot read (images, PDFs, octet streams): passed or "
                   "refused (502). Default: refuse when the profile has detectors, pass otherwise."),
    ] = None

    @model_validator(mode="after")
    def _masks_something(self) -> MaskProfileDoc:
        if self.fields is None and self.paths is None and self.detectors is None:
            raise problem(f"{WHAT} masks nothing: give fields, paths or detectors",
                          "e.g. fields: [mail, mobilePhone], or detectors: [email, graph_secret]", key=True)
        return self


def _profiles(v: Any, info: ValidationInfo) -> dict[str, MaskProfileDoc]:
    if not isinstance(v, dict):
        raise problem(f"{WHAT} must be a mapping, not {kind(v)}")
    for name in v:
        if not isinstance(name, str):
            raise problem(f"{WHAT}: keys must be strings, not {kind(name)}", at=(name,), key=True)
    out = {}
    for name, doc in v.items():
        if not _NAME.fullmatch(name):
            raise problem(f"masking profile '{name}': invalid name", "use letters, digits and . _ : -",
                          at=(name,), key=True)
        profile = out[name] = _validate_in(MaskProfileDoc, doc, info, (name,))
        object.__setattr__(profile, "pseudonym_key", _pseudonym_key(name, profile, info))
    return out


def _pseudonym_key(name: str, profile: MaskProfileDoc, info: ValidationInfo) -> PseudonymKey | None:
    """The key of a profile that makes pseudonyms, from the variable masking.pseudonym_key_env names;
    the key itself never appears in a message, only whether it is there and how long it is."""
    use = None
    for part in ("fields", "paths", "detectors"):
        targets = getattr(profile, part)
        entry = next((e for e, style in (targets or {}).items() if style is Style.PSEUDONYM), None)
        if entry is not None:
            at, is_key = targets.where[entry]
            use = (entry, (name, part, *at), is_key)
            break
    if use is None:
        return None
    entry, at, is_key = use
    what = f"masking profile '{name}'"
    key_env = info.data.get("pseudonym_key_env")
    if key_env is None:
        raise problem(f"{what}: '{entry}' asks for pseudonyms, but masking.pseudonym_key_env is not set",
                      "add 'pseudonym_key_env: NHI_MASK_KEY' under masking and set that environment variable "
                      "to a long random value before the gateway starts", at=at, key=is_key)
    raw = _ctx(info).get("environ", {}).get(key_env)
    where = ("masking", "pseudonym_key_env")
    if not raw:
        raise problem(f"masking.pseudonym_key_env: the environment variable {key_env} is not set "
                      f"(or empty), and {what} makes pseudonyms with it",
                      f"set {key_env} to a long random value, e.g. {key_env}=$(openssl rand -base64 32), and keep it "
                      "the same across restarts so that pseudonyms stay the same", where=where)
    value = raw.encode("utf-8", "surrogateescape")
    if len(value) < MIN_KEY_BYTES:
        raise problem(f"masking.pseudonym_key_env: the key in {key_env} is {len(value)} bytes long; "
                      f"a pseudonym key needs at least {MIN_KEY_BYTES}", f"e.g. {key_env}=$(openssl rand -base64 32)",
                      where=where)
    return PseudonymKey(value, f"${key_env}")


def _validate_in(model: type[Shape], value: Any, info: ValidationInfo, at: tuple):
    """``model`` validated as the value at ``at`` below the current place (errors keep their place)."""
    try:
        return model.model_validate(value, context=_ctx(info))
    except ValidationError as e:
        err = first_error(e.errors(include_url=False, include_input=False))
        ctx = detail_of(err) if err["type"] == "policy" else None
        if ctx is None:
            ctx = {"message": f"{WHAT}: {err['msg']}", "hint": "", "at": (), "key": False, "inside": None, "up": 0}
        # The place below this one is named too (sub), not only pointed at (at).
        sub = at + tuple(err["loc"]) + tuple(ctx.get("sub") or ())
        raise PydanticCustomError("policy", "a policy problem", {"detail": Detail({**ctx, "sub": sub})}) from None


class MaskingDoc(Shape):
    # Read after the profiles it names (see _known_default).
    default_profile: Annotated[Any, *leaf(lambda v: v, {"ref!": "text"}),
                               Field(description="The profile of allow rules that name no mask.")] = None
    pseudonym_key_env: Annotated[
        str | None,
        *leaf(lambda v: _env_name(v), {
            "type": "string", "pattern": f"^{ENV_NAME}$",
            "description": "The environment variable that holds the pseudonym key (at least 16 bytes); required "
            "when a profile uses pseudonym. Never the key itself."}),
    ] = None
    profiles: Annotated[
        dict[str, MaskProfileDoc] | None,
        PlainValidator(_profiles),
        WithJsonSchema({"type": "object", "propertyNames": {"pattern": f"^{NAME}$"},
                        "additionalProperties": {"ref!": "maskProfile"}}),
    ] = None

    @model_validator(mode="after")
    def _known_default(self, info: ValidationInfo) -> MaskingDoc:
        profiles = self.profiles or {}
        _ctx(info)["profiles"] = profiles
        if self.default_profile is not None:
            try:
                _string(self.default_profile)
            except PydanticCustomError as e:
                raise problem(e.context["detail"]["message"], sub=("default_profile",)) from None
            _profile_ref(self.default_profile, profiles, at=("default_profile",))
        return self


def _env_name(v: Any) -> str:
    key_env = _string(v, "e.g. NHI_MASK_KEY")
    if not _ENV_NAME.fullmatch(key_env):
        raise problem(f"{WHAT}: '{key_env}' is not an environment variable name",
                      "name the variable that holds the key (letters, digits and _), e.g. NHI_MASK_KEY; "
                      "never put the key itself in the policy")
    return key_env


def _profile_ref(name: str, profiles: dict, at: tuple = ()) -> str:
    if name not in profiles:
        known = ", ".join(profiles) or "none are defined"
        hint = suggest(name, profiles) or f"define it under masking.profiles (known: {known})"
        raise problem(f"{WHAT}: unknown mask profile '{name}'", hint, sub=at)
    return name


def _webhook(v: Any) -> str:
    hint = "e.g. https://hooks.slack.com/services/... (the message names the request and how to approve it)"
    webhook = _string(v, hint).strip()
    try:
        parts = urlsplit(webhook)
        ok = parts.scheme == "https" and bool(parts.hostname) and not parts.username and not parts.password
    except ValueError:
        ok = False
    if not ok:
        raise problem(f"{WHAT}: '{webhook}' is not an https URL", hint)
    return webhook


def _app_guid(v: Any) -> str:
    value = _string(v).strip()
    if not _GUID.fullmatch(value):
        raise problem(f"{WHAT}: '{value}' is not a GUID", "the Application (client) ID of the gateway's app registration")
    return value.lower()


def _app_id_uri(v: Any) -> str:
    value = _string(v).strip()
    if any(c.isspace() for c in value) or ":" not in value:
        raise problem(f"{WHAT}: '{value}' is not a URI",
                      "the Application ID URI of the gateway's app registration, e.g. api://nhi-gateway")
    return value


def _scope(v: Any) -> str:
    value = _string(v).strip()
    if not _SCOPE.fullmatch(value):
        raise problem(f"{WHAT}: '{value}' is not a scope name",
                      "the scope's value as exposed by the app registration, e.g. Approvals.Decide")
    return value


def _auth_context(v: Any) -> str:
    value = _string(v).strip()
    if not _AUTH_CONTEXT.fullmatch(value):
        raise problem(f"{WHAT}: '{value}' is not an authentication context id",
                      "Entra's ids are c1 to c99 (Conditional Access > Authentication contexts)")
    return value


SCOPE = r"[A-Za-z0-9._-]{1,120}"
AUTH_CONTEXT = r"c([1-9]|[1-9][0-9])"
_SCOPE = re.compile(SCOPE)
_AUTH_CONTEXT = re.compile(AUTH_CONTEXT)


class ApprovalsDoc(Shape):
    """How approvers are told that a request waits for them, and which token proves an approver to the
    approval API."""

    webhook: Annotated[str | None, *leaf(_webhook, {"ref!": "httpsUrl"}), Field(
        description="An https URL that receives a message for every request held for approval.")] = None
    client_id: Annotated[str | None, *leaf(_app_guid, {
        "ref!": "guid", "description": "The gateway's app registration (Application (client) ID): the aud of v2 "
        "approver tokens. Without it the approval API refuses every token."})] = None
    app_id_uri: Annotated[str | None, *leaf(_app_id_uri, {
        "type": "string", "pattern": r"^\s*\S+:\S*\s*$",
        "description": "The app registration's Application ID URI (e.g. api://nhi-gateway): the aud of v1 approver "
        "tokens, with or without a trailing slash. Needs client_id."})] = None
    scope: Annotated[str | None, *leaf(_scope, {
        "type": "string", "pattern": rf"^\s*{SCOPE}\s*$",
        "description": "The delegated scope an approver's token must carry in scp (default Approvals.Decide)."})] = None
    require_auth_context: Annotated[str | None, *leaf(_auth_context, {
        "type": "string", "pattern": rf"^\s*{AUTH_CONTEXT}\s*$",
        "description": "A Conditional Access authentication context id (c1..c99) that must be in the token's "
        "acrs."})] = None
    require_mfa: Annotated[bool | None, *leaf(_boolean, {
        "type": "boolean", "description": "The token's amr must contain mfa (v1 tokens; v2 tokens carry no amr and "
        "are refused)."})] = None
    login_client_id: Annotated[str | None, *leaf(_app_guid, {
        "ref!": "guid", "description": "The public client that `nhi-gateway approvals login` signs in with "
        "(default: client_id)."})] = None

    @model_validator(mode="after")
    def _coherent(self) -> ApprovalsDoc:
        if self.app_id_uri and self.client_id is None:
            raise problem("approvals.app_id_uri needs approvals.client_id",
                          "name the app registration by its client id too (v2 tokens carry it in aud)",
                          at=("app_id_uri",), key=True)
        return self


# --- rules ------------------------------------------------------------------------------------------


def _auth_method(v: Any) -> str:
    value = v.strip() if isinstance(v, str) else v
    if value in ("federated", "federated_credential", "managed_identity"):
        # appidacr/azpacr "2" covers all three: a rule cannot tell them apart, so say so.
        raise problem(
            f"{WHAT}: '{value}' is not told apart by Entra's tokens",
            "appidacr/azpacr \"2\" means certificate, federated credential or managed identity "
            "alike: write certificate (and managed_identities to name managed identities)",
        )
    return _choice(value, [str(a) for a in (AuthMethod.CERTIFICATE, AuthMethod.CLIENT_SECRET,
                                           AuthMethod.PUBLIC_CLIENT, AuthMethod.UNKNOWN)])


def _arm_id(v: Any) -> str:
    value = _string(v).strip()
    if not _ARM_ID.fullmatch(value):
        raise problem(
            f"{WHAT}: '{value}' is not an Azure resource id",
            "use the token's xms_mirid, e.g. /subscriptions/<subscription>/resourcegroups/<group>"
            "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>",
        )
    return value.lower()


AuthMethodName = Annotated[str, *leaf(_auth_method, {
    "type": "string", "pattern": r"^\s*(certificate|client_secret|public_client|unknown)\s*$"})]
TokenSourceName = Annotated[str, *choice_of([t.value for t in TokenSource])]
ArmId = Annotated[str, *leaf(_arm_id, {"type": "string", "pattern": r"^\s*/"})]
_WHO = ("app_ids", "object_ids", "groups", "roles", "tenants", "auth_methods", "app_only", "token_sources",
        "managed_identities")


class WhenDoc(Shape):
    """Who the rule is about. Keys are ANDed; values in one list are ORed. No when: any verified caller."""

    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["anonymous"], "properties": {"anonymous": {"const": True}}},
        "then": {"properties": {k: {"type": "null"} for k in _WHO}},
    })

    anonymous: optional(Boolean, "true: only requests without a verified token (cannot be combined with other keys).") = None
    app_ids: optional(guids("The client application id (appid/azp).")) = None
    object_ids: optional(guids("The service principal's object id (oid).")) = None
    groups: optional(guids("Group ids; matches when the caller is in any of them.")) = None
    roles: optional(texts("App roles in the token's roles claim, compared case-insensitively.")) = None
    tenants: optional(guids("Tenant ids; each must also be under identity.tenants.")) = None
    auth_methods: optional(list_of(AuthMethodName, description="How the identity authenticated (appidacr/azpacr): "
                                   "certificate, client_secret, public_client, unknown.")) = None
    app_only: optional(Boolean, "true: app-only tokens; false: delegated (user) tokens.") = None
    token_sources: optional(list_of(TokenSourceName, description="Where the token was presented: proxy credentials "
                                    "and/or Authorization: Bearer.")) = None
    managed_identities: optional(list_of(ArmId, description="ARM resource ids (the token's xms_mirid), compared "
                                         "case-insensitively.")) = None

    @classmethod
    def _first(cls, keys: dict) -> None:
        if keys.get("anonymous") is True and len(keys) > 1:
            other = next(k for k in keys if k != "anonymous")
            raise problem(f"{WHAT}: '{other}' cannot be combined with anonymous: true",
                          "an anonymous request has no identity to match; write two rules", at=(other,))

    @model_validator(mode="after")
    def _coherent(self, info: ValidationInfo) -> WhenDoc:
        accepted = _ctx(info).get("tenants", frozenset())
        for i, tenant in enumerate(self.tenants or ()):
            if tenant not in accepted:
                raise problem(f"{WHAT}.tenants[{i}]: tenant '{tenant}' is not in identity.tenants, so this never matches",
                              "add it to identity.tenants or remove it here", at=("tenants", i))
        return self


PropertyName = Annotated[str, *leaf(lambda v: _property(v), {"type": "string", "pattern": rf"^\s*{PROPERTY}\s*$"})]


class ODataDoc(Shape):
    """OData limits (Graph only). On allow/approve rules: a request that breaks them is not covered. On deny
    rules: only requests that break them are denied."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    forbid_select: optional(list_of(PropertyName, "e.g. [keyCredentials]"),
                            "Properties a request must not $select, at any depth of $expand; $select=* asks for "
                            "all of them.") = None
    forbid_expand: optional(list_of(PropertyName, "e.g. [keyCredentials]"),
                            "Navigation properties a request must not $expand, at any depth; $expand=* asks for "
                            "all of them.") = None
    max_top: Annotated[int | None, *integer_between(1, MAX_TOP, "The largest $top allowed, at any depth (a request "
                                                    "without $top gets Graph's default page size).")] = None
    allow_select: optional(list_of(PropertyName, "e.g. [keyCredentials]"),
                           "The only properties a request may $select, $expand, filter, sort or search on; such a "
                           "request must $select, and so must each $expand.") = None

    @field_validator("allow_select", mode="before")
    @classmethod
    def _some_allowed(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise problem(f"{WHAT} must not be empty",
                          "list the properties a request may ask for, e.g. [id, displayName]; "
                          "to refuse every request, use a deny rule")
        return value

    @model_validator(mode="after")
    def _limits_something(self) -> ODataDoc:
        if all(getattr(self, k) is None for k in self._keys):
            raise problem(f"{WHAT} limits nothing", "give forbid_select, forbid_expand, allow_select or max_top, "
                          "or remove it", key=True)
        return self


def _property(v: Any) -> str:
    name = _string(v, "e.g. [keyCredentials]").strip()
    if not _PROPERTY.fullmatch(name):
        raise problem(f"{WHAT}: '{name}' is not a property name",
                      "write one property name such as keyCredentials: '*' and paths are "
                      "covered already, since every segment of a requested path is checked")
    return name


def _method(v: Any) -> str:
    method = _string(v, 'e.g. [GET] or ["*"]').strip().upper()
    if method != ANY_METHOD and method not in METHODS:
        raise problem(f"{WHAT}: unknown method '{method}'", suggest(method, METHODS) or f'use {", ".join(METHODS)} or "*"')
    return method


_METHOD_PATTERN = r"^\s*(\*|" + "|".join("".join(f"[{c}{c.lower()}]" for c in m) for m in METHODS) + r")\s*$"
Method = Annotated[str, *leaf(_method, {"type": "string", "pattern": _METHOD_PATTERN})]
Version = Annotated[str, *choice_of(GRAPH_VERSIONS)]


def segment_problem(seg: str, *, last: bool, graph: bool) -> tuple[str, str]:
    if seg == "":
        if last:
            return "trailing '/'", "drop it: the canonical path has no trailing slash"
        return "empty segment ('//')", "write a single '/'"
    if seg == "**":
        return ("", "") if last else ("'**' must be the last segment", "use '*' or {name} for one segment")
    if seg == "*" or _PARAM.fullmatch(seg):
        return "", ""
    if seg in (".", ".."):
        return f"'{seg}' segment", "write the path without dot segments"
    if "{" in seg or "}" in seg or "*" in seg:
        return f"wildcard inside segment '{seg}'", "{name}, '*' and '**' must be a whole segment"
    if "%" in seg:
        return f"percent-encoding in '{seg}'", "write the decoded text: patterns match the path decoded once"
    if graph and ("(" in seg or ")" in seg):
        return (
            f"OData key syntax in '{seg}'",
            "write the canonical form: /users/{id} matches /users('x'); "
            "/applications/{id} matches /applications(appId='x')",
        )
    if _BAD_LITERAL.search(seg):
        return f"invalid character in '{seg}'", "segments are plain text: no spaces, backslashes, '?' or '#'"
    return "", ""


def path_pattern(text: str, graph: bool, versions: frozenset[str] | None, at: tuple) -> PathPattern:
    if not text.startswith("/"):
        raise problem(f"{WHAT}: path pattern '{text}' must start with '/'", sub=at)
    raw = text[1:].split("/") if text != "/" else []
    pattern_version = None
    if graph and raw and raw[0].casefold() in GRAPH_VERSIONS:
        pattern_version = raw.pop(0).casefold()
        if versions is not None:
            raise problem(f"{WHAT}: '{text}' names a version and the operation has versions too",
                          "give the version in one place", sub=at)
    segments: list[str] = []
    for i, seg in enumerate(raw):
        trouble, hint = segment_problem(seg, last=i == len(raw) - 1, graph=graph)
        if trouble:
            raise problem(f"{WHAT}: bad path pattern '{text}': {trouble}", hint, sub=at)
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


def _upstream_host(v: Any, info: ValidationInfo) -> str:
    host = _host(v)
    if host not in _ctx(info).get("upstream_hosts", ()):
        raise problem(f"{WHAT}: host '{host}' is not listed under upstreams",
                      "the gateway refuses every host not under upstreams; add it there", up=1)
    return host


class OperationDoc(Shape):
    KEYS: ClassVar[tuple] = ("host", "methods", "paths", "versions", "odata")

    host: Annotated[str, *leaf(_upstream_host, {"ref!": "text", "description": "An upstream host."})]
    methods: list_of(Method, 'e.g. [GET] or ["*"]', description='HTTP methods, or "*" for any.')
    # versions before paths: a path's own version must not repeat the operation's
    versions: optional(list_of(Version), "Graph hosts only: the versions matched (default both).") = None
    paths: Annotated[tuple, PlainValidator(lambda v, info: _paths(v, info)), WithJsonSchema(
        {"type": "array", "minItems": 1, "items": {"ref!": "pathPattern"}})]
    odata: optional(ODataDoc) = None

    @field_validator("versions", "odata", mode="before")
    @classmethod
    def _graph_only(cls, value: Any, info: ValidationInfo) -> Any:
        host = info.data.get("host")
        if value is None or host is None or host in GRAPH_HOSTS:
            return value
        if info.field_name == "versions":
            raise problem(f"{WHAT}: versions apply to Graph hosts only, not '{host}'", "remove versions", up=1)
        raise problem(f"{WHAT}: odata limits apply to Graph hosts only, not '{host}'", "remove odata", key=True, up=1)


def _paths(v: Any, info: ValidationInfo) -> tuple[PathPattern, ...]:
    """Each path as a pattern, in order: a path is read for the operation's host and versions."""
    hint = 'e.g. "/users/{id}"'
    _listed(v)
    host, versions = info.data.get("host"), info.data.get("versions")
    graph = host in GRAPH_HOSTS
    versions = frozenset(versions) if versions is not None else None
    out = []
    for i, item in enumerate(v):
        try:
            text = _string(item, hint)
        except PydanticCustomError as e:
            ctx = e.context["detail"]
            raise problem(ctx["message"], ctx["hint"], sub=(i,)) from None
        out.append(path_pattern(text, graph, versions, (i,)))
    return tuple(out)


def _days(v: Any) -> frozenset[int]:
    days: set[int] = set()
    for i, text in _one_or_more(v, "e.g. [mon-fri]"):
        first, dash, last = text.strip().lower().partition("-")
        names = [first, last] if dash else [first]
        for name in names:
            if name.strip() not in WEEKDAYS:
                raise problem(f"{WHAT}[{i}]: '{text.strip()}' is not a day or a range of days",
                              suggest(name.strip(), WEEKDAYS) or "use mon tue wed thu fri sat sun, or a range: mon-fri",
                              at=(i,))
        start, end = WEEKDAYS.index(names[0].strip()), WEEKDAYS.index(names[-1].strip())
        days |= {(start + d) % 7 for d in range((end - start) % 7 + 1)}
    return frozenset(days)


def _hours(v: Any) -> tuple[tuple[int, int], ...]:
    hours = []
    hint = 'write "HH:MM-HH:MM" in 24-hour time, e.g. "08:00-18:00"; "24:00" ends at midnight'
    for i, text in _one_or_more(v, 'e.g. "08:00-18:00"'):
        what, at = f"{WHAT}[{i}]", (i,)
        m = _HOURS.fullmatch(text.strip())
        if not m:
            raise problem(f"{what}: '{text.strip()}' is not a range of hours", hint, at=at)
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
            raise problem(f"{what}: '{text.strip()}' is not a time of day", hint, at=at)
        start, end = h1 * 3600 + m1 * 60, h2 * 3600 + m2 * 60
        if end == start:
            raise problem(f"{what}: '{text.strip()}' is empty", hint, at=at)
        if end < start:
            raise problem(f"{what}: '{text.strip()}' runs past midnight",
                          f'write two ranges: ["{_hhmm(start)}-24:00", "00:00-{_hhmm(end)}"] (days are '
                          "checked on the local date of each request)", at=at)
        hours.append((start, end))
    return tuple(sorted(hours))


def _one_or_more(v: Any, hint: str) -> list[tuple[int, str]]:
    if isinstance(v, str):
        return [(0, _string(v, hint))]
    _listed(v, hint)
    out = []
    for i, item in enumerate(v):
        try:
            out.append((i, _string(item, hint)))
        except PydanticCustomError as e:
            ctx = e.context["detail"]
            raise problem(ctx["message"].replace(WHAT, f"{WHAT}[{i}]", 1), ctx["hint"], at=(i,)) from None
    return out


def _instant_raw(v: Any) -> Any:
    if isinstance(v, str | date):
        return v
    raise problem(f"{WHAT} must be a time, not {kind(v)}", _INSTANT_HINT)


_INSTANT_HINT = "write an ISO 8601 time with an offset, e.g. 2025-07-01T08:00:00+02:00 or 2025-07-01T06:00:00Z"


def _one_or_more_schema(ref: str, description: str) -> dict:
    return {"anyOf": [{"ref!": ref}, {"type": "array", "minItems": 1, "items": {"ref!": ref}}], "description": description}


class ScheduleDoc(Shape):
    """When the rule is in force; outside it, the rule does not match."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "allOf": [
        {"if": {"required": [k], "properties": {k: {"not": {"type": "null"}}}},
         "then": {"required": ["timezone"], "properties": {"timezone": {"ref!": "text"}}}}
        for k in ("days", "hours")
    ]})

    days: Annotated[frozenset[int] | None, *leaf(_days, _one_or_more_schema(
        "dayRange", "Days (mon..sun) or ranges (mon-fri), local to timezone."))] = None
    hours: Annotated[tuple | None, *leaf(_hours, _one_or_more_schema(
        "hourRange", '"HH:MM-HH:MM" ranges, local to timezone; the end is exclusive, 24:00 is midnight; no '
        "range runs past midnight."))] = None
    timezone: Annotated[str | None, *leaf(text_of("an IANA name such as Europe/Berlin or UTC"), {
        "ref!": "text", "description": "An IANA time zone (Europe/Berlin, UTC); required with days or hours."})] = None
    valid_from: Annotated[Any, *leaf(_instant_raw, {"ref!": "instant"})] = None
    valid_until: Annotated[Any, *leaf(_instant_raw, {"ref!": "instant"})] = None

    @model_validator(mode="after")
    def _coherent(self) -> ScheduleDoc:
        if all(getattr(self, k) is None for k in self._keys):
            raise problem(f"{WHAT} is empty", "give days, hours (with timezone), valid_from or valid_until, or remove it",
                          key=True)
        zone = None
        if self.timezone is not None:
            name = self.timezone.strip()
            try:
                zone = ZoneInfo(name)
            except Exception:  # noqa: BLE001 - ZoneInfoNotFoundError, ValueError for odd keys, OSError
                from zoneinfo import available_timezones

                hint = suggest(name, available_timezones()) or "use an IANA name such as Europe/Berlin or UTC"
                raise problem(f"{WHAT}.timezone: unknown time zone '{name}'", hint, at=("timezone",)) from None
            object.__setattr__(self, "timezone", name)
        if (self.days or self.hours) and zone is None:
            raise problem(f"{WHAT}: days and hours need a timezone",
                          "add timezone: an IANA name such as Europe/Berlin (or UTC): a rule must not change "
                          "its meaning with the gateway host's clock settings",
                          at=("days" if self.days is not None else "hours",), key=True)
        for k in ("valid_from", "valid_until"):
            if getattr(self, k) is not None:
                object.__setattr__(self, k, _instant(getattr(self, k), zone, k))
        if self.valid_from is not None and self.valid_until is not None and self.valid_until <= self.valid_from:
            raise problem(f"{WHAT}: valid_until ({self.valid_until.isoformat()}) is not after valid_from "
                          f"({self.valid_from.isoformat()})", "the rule would never be in force", at=("valid_until",))
        return self


def _instant(v: Any, zone: ZoneInfo | None, key: str) -> datetime:
    what, at, hint = f"{WHAT}.{key}", (key,), _INSTANT_HINT
    if isinstance(v, datetime):
        value = datetime(v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, tzinfo=v.tzinfo)
    elif isinstance(v, date):
        raise problem(f"{what}: {v.isoformat()} is a date without a time", hint, at=at)
    else:
        try:
            value = datetime.fromisoformat(v.strip())
        except ValueError:
            raise problem(f"{what}: '{v.strip()}' is not a time", hint, at=at) from None
    if value.tzinfo is None or value.utcoffset() is None:
        if zone is None:
            raise problem(f"{what}: '{value.isoformat()}' has no offset and the schedule has no timezone",
                          hint + ", or give the schedule a timezone", at=at)
        value = value.replace(tzinfo=zone)
    return value.astimezone(UTC)


def duration_between(lo: int, hi: int, description: str):
    def check(v: Any) -> int:
        if isinstance(v, int) and not isinstance(v, bool):
            raise problem(f"{WHAT}: {v} has no unit", f"{DURATION_HINT} ({v}s if you meant seconds)")
        text = _string(v, DURATION_HINT).strip()
        m = _DURATION.fullmatch(text)
        if not m or not text:
            raise problem(f"{WHAT}: '{text}' is not a duration", DURATION_HINT)
        d, h, mi, s = (int(g) if g else 0 for g in m.groups())
        seconds = int(timedelta(days=d, hours=h, minutes=mi, seconds=s).total_seconds())
        if not lo <= seconds <= hi:
            raise problem(f"{WHAT}: {text} is outside {duration_text(lo)} to {duration_text(hi)}", DURATION_HINT)
        return seconds

    return leaf(check, {"ref!": "duration", "description": description})


class ApproversDoc(Shape):
    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    users: optional(guids("Object ids of people who may approve.")) = None
    groups: optional(guids("Group ids whose members may approve.")) = None

    @model_validator(mode="after")
    def _somebody(self) -> ApproversDoc:
        if self.users is None and self.groups is None:
            raise problem(f"{WHAT} names nobody", "give users: [<object id>, ...] and/or groups: [<group id>, ...]",
                          key=True)
        return self


class ApprovalDoc(Shape):
    """Who may approve, how long a request waits, how long an approval may last."""

    approvers: ApproversDoc
    timeout: Annotated[int | None, *duration_between(1, MAX_APPROVAL_TIMEOUT, "How long a request waits for an "
                                                     "answer (default 5m, at most 1h).")] = None
    max_grant: Annotated[int | None, *duration_between(MIN_GRANT, MAX_GRANT, "How long an approval may cover "
                                                       "repeats of the request (1m to 7d); without it, the one request only.")] = None


def _rule_id(v: Any) -> str:
    rule_id = _string(v)
    if not _NAME.fullmatch(rule_id):
        raise problem(f"{WHAT}: invalid rule id '{rule_id}'", "use letters, digits and . _ : - (no spaces)", up=1)
    return rule_id


class RuleDoc(Shape):
    KEYS: ClassVar[tuple] = ("id", "description", "action", "when", "operations", "odata", "schedule", "approval",
                             "mask", "mode")
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"action": {"const": "approve"}}},
         "then": {"required": ["approval"], "properties": {"approval": {"ref!": "approval"}}},
         "else": {"properties": {"approval": {"type": "null"}}}},
        {"if": {"properties": {"action": {"const": "deny"}}}, "then": {"properties": {"mask": {"type": "null"}}}},
        {"if": {"properties": {"action": {"const": "allow"}}}, "then": {"properties": {"mode": {"not": {"const": "report"}}}}},
    ]})

    id: Annotated[str, *leaf(_rule_id, {"type": "string", "pattern": f"^{NAME}$",
                                        "description": "Unique; letters, digits and . _ : -"})]
    action: Annotated[str, *choice_of([a.value for a in Action], "deny beats approve beats allow; no matching "
                                      "rule: deny.")]
    description: optional(Text) = None
    when: optional(WhenDoc) = None
    operations: list_of(OperationDoc, description="What the rule is about; any one matching is enough.")
    odata: optional(ODataDoc) = None
    schedule: optional(ScheduleDoc) = None
    approval: optional(ApprovalDoc) = None
    mask: Annotated[str | None, *leaf(text_of(), {"ref!": "text", "description": "A masking profile for "
                                                  "the response (allow and approve rules)."})] = None
    mode: Annotated[str | None, *choice_of(MODES, "deny and approve rules: enforce (default, or the policy's mode) "
                                           "or report (forwarded and reported, not refused or held).")] = None

    @field_validator("mode")
    @classmethod
    def _reports_a_refusal(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "report" and info.data.get("action") == Action.ALLOW:
            raise problem(f"{WHAT}: mode: report applies to deny and approve rules; an allow rule "
                          "refuses nothing", "remove it", up=1)
        return value

    @field_validator("mask", mode="before")
    @classmethod
    def _not_on_deny(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("action") == Action.DENY:
            raise problem(f"{WHAT}: 'mask' has no effect on a deny rule", "remove it", up=1)
        return value

    @field_validator("approval", mode="before")
    @classmethod
    def _only_on_approve(cls, value: Any, info: ValidationInfo) -> Any:
        action = info.data.get("action")
        if value is not None and action is not None and action != Action.APPROVE:
            raise problem(f"{WHAT}: 'approval' applies to action: approve only, not {action}",
                          "remove it, or make the rule action: approve", key=True, up=1)
        return value

    @model_validator(mode="after")
    def _coherent(self, info: ValidationInfo) -> RuleDoc:
        if self.odata is not None:
            for i, om in enumerate(self.operations):
                if om.host not in GRAPH_HOSTS:
                    raise problem(f"{WHAT}: odata limits apply to Graph requests, but operations[{i}] is for '{om.host}'",
                                  "move the odata limits into the Graph operations, or the other operation into "
                                  "a rule of its own", at=("odata",), key=True)
        if self.action == Action.APPROVE and self.approval is None:
            raise problem(f"{WHAT}: action approve needs 'approval', naming who may approve",
                          "add e.g. approval: {approvers: {groups: [<group id>]}, timeout: 5m}", at=("action",))
        if self.mask is not None:
            _profile_ref(self.mask, _ctx(info).get("profiles", {}), at=("mask",))
        return self


def _rules(v: Any, info: ValidationInfo) -> list[RuleDoc]:
    _listed(v, non_empty=False)
    out = []
    seen: dict[str, int] = {}
    lines = _ctx(info).get("line_of", lambda i: 0)
    for i, item in enumerate(v):
        rule = _validate_in(RuleDoc, item, info, (i,))
        if rule.id in seen:
            raise problem(f"duplicate rule id '{rule.id}'", f"the first rule with this id is at line {lines(seen[rule.id])}",
                          at=(i, "id"))
        seen[rule.id] = i
        out.append(rule)
    return out


def _version(v: Any) -> int:
    if isinstance(v, bool) or v != 1 or not isinstance(v, int):
        raise problem(f"unsupported policy version {v!r}", "this gateway reads 'version: 1'")
    return 1


class PolicyDoc(Shape):
    """The YAML policy of nhi-gateway (version 1). The gateway's loader checks more than this schema can
    (hosts under upstreams, unique rule ids, known mask profiles, time zones, ranges): run
    `nhi-gateway policy lint FILE`."""

    KEYS: ClassVar[tuple] = ("version", "identity", "upstreams", "masking", "approvals", "rules", "mode")

    version: Annotated[int, *leaf(_version, {"const": 1, "description": "The only version is 1."})]
    identity: IdentityDoc
    upstreams: Annotated[list[UpstreamDoc], *_list_checks("", non_empty=False),
                         Field(description="The only hosts reachable at all.")]
    masking: optional(MaskingDoc) = None
    approvals: optional(ApprovalsDoc) = None
    mode: Annotated[str | None, *choice_of(MODES, "report: every deny and approve rule without a mode of its own "
                                           "only reports, and a request no rule allows is forwarded and reported. "
                                           "Token and request checks still refuse.")] = None
    rules: Annotated[list[RuleDoc] | None, PlainValidator(_rules), WithJsonSchema(
        {"type": "array", "items": {"ref!": "rule"}, "description": "No rules: everything is refused."})] = None


# --- choosing the error to report -------------------------------------------------------------------


def first_error(errors: list[dict]) -> dict:
    """The error an author meets first: pydantic reports every field of a mapping, in the order the
    model declares them, and each mapping's own errors (unknown or missing keys) stop its fields."""
    return errors[0]


# --- the JSON Schema --------------------------------------------------------------------------------


class _Schema(GenerateJsonSchema):
    def field_title_should_be_set(self, schema) -> bool:  # noqa: ANN001 - pydantic's signature
        return False


NAMES = {  # $defs names, as authors see them in their editor's messages
    "IdentityDoc": "identity", "UpstreamDoc": "upstream", "MaskingDoc": "masking", "MaskProfileDoc": "maskProfile",
    "ApprovalsDoc": "approvals", "RuleDoc": "rule", "WhenDoc": "when", "OperationDoc": "operation",
    "ODataDoc": "odata", "ScheduleDoc": "schedule", "ApprovalDoc": "approval", "ApproversDoc": "approvers",
    "IssuerDoc": "issuerMapping", "BearerSourceDoc": "bearerSource", "ProxySourceDoc": "proxySource",
}


def policy_schema() -> dict:
    """``policies/policy.schema.json``: what YAML language servers check while an author types."""
    from pydantic.json_schema import models_json_schema

    # Models that a leaf's own validator reads (issuers, profiles, rules) are listed here, so
    # their schemas are generated too.
    _, generated = models_json_schema(
        [(m, "validation") for m in (PolicyDoc, IssuerDoc, MaskProfileDoc, RuleDoc)],
        schema_generator=_Schema, ref_template="#/$defs/{model}",
    )
    defs = {NAMES.get(k, k): v for k, v in generated["$defs"].items()}
    root = defs.pop("PolicyDoc")
    defs.update(json.loads(json.dumps(DEFS)))
    defs["issuer"] = {
        "anyOf": [{"$ref": "#/$defs/httpsUrl"}, {"$ref": "#/$defs/issuerMapping"}],
        "description": "An issuer template (https://login.microsoftonline.com/{tenantid}/v2.0), or a mapping with an "
        "explicit discovery document URL.",
    }
    for node in (root, *defs.values()):
        _tidy(node)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:nhi-gateway:policy:1",
        "title": "nhi-gateway policy",
        **root,
        "$defs": dict(sorted(defs.items())),
    }


def _tidy(node: Any) -> None:
    """Drop titles and defaults; an optional key may be null (a commented-out value)."""
    if isinstance(node, list):
        for item in node:
            _tidy(item)
        return
    if not isinstance(node, dict):
        return
    node.pop("title", None)
    node.pop("default", None)
    if "ref!" in node:  # a leaf's fragment names a definition (pydantic would look it up among its own)
        node["$ref"] = f"#/$defs/{node.pop('ref!')}"
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/") and ref[8:] in NAMES:
        node["$ref"] = f"#/$defs/{NAMES[ref[8:]]}"
    if "description" in node and isinstance(node["description"], str):
        node["description"] = " ".join(node["description"].split())
    props = node.get("properties")
    if isinstance(props, dict):
        required = set(node.get("required", ()))
        for name, prop in props.items():
            _tidy(prop)
            if node.get("type") == "object" and name not in required and not _accepts_null(prop):
                props[name] = {"anyOf": [prop, {"type": "null"}]}
    for k, v in node.items():
        if k != "properties":
            _tidy(v)


def _accepts_null(schema: dict) -> bool:
    return any(isinstance(s, dict) and s.get("type") == "null" for s in schema.get("anyOf", ()))


def schema_text() -> str:
    return json.dumps(policy_schema(), indent=2, ensure_ascii=False) + "\n"
