"""What is being asked: one HTTP request reduced to the canonical Graph operation a policy judges.

Microsoft Graph accepts one operation under many spellings (``/v1.0/Users('a@b')``,
``/v1.0/users/a%40b``, ``//v1.0/users/x/../a@b/``). A policy that matched the raw text would give
those spellings different decisions, so every request is first reduced to one canonical form and
rules only ever see that form. Anything that cannot be reduced without guessing how the upstream
will read it (encoded slashes, backslashes, NUL, double encoding, paths climbing above the root)
is refused with :class:`OperationError` rather than guessed at.

The canonical path, in the order the steps run:

1. The target is split at the first ``?``; a raw ``#`` is refused (clients never send fragments).
2. The path is percent-decoded exactly once, as UTF-8. ``%2F`` (slash), ``%5C`` (backslash),
   ``%00``, malformed escapes and invalid UTF-8 are refused; so is a literal backslash or control
   character, and a decoded path that still contains a ``%XX`` escape (double encoding).
3. Empty segments are dropped (``//`` and a trailing ``/`` collapse), ``.`` is dropped and ``..``
   removes the previous segment; a ``..`` that would climb above the root is refused.
4. On Graph hosts (:data:`GRAPH_HOSTS`) a first segment ``v1.0`` or ``beta`` (any case) is split off
   into :attr:`Operation.version`; the rest is the path. Other hosts have ``version == ""``.
5. On Graph hosts, OData key and function-parameter segments are rewritten into plain segments::

       users('a@b.com')                  -> users/a@b.com
       users('o''neil@b.com')            -> users/o'neil@b.com     (OData '' escape)
       groups(6f1c...)                   -> groups/6f1c...
       applications(appId='5a8f...')     -> applications/appid=5a8f...
       applications(id='x'), (Id='x')    -> applications/x             (the key named by its name)
       users(userPrincipalName='a@b')    -> users/a@b
       getSchedule()                     -> getschedule
       range(address='A1',sheet='S')     -> range/address=a1,sheet=s   (named args sorted)

   so ``/applications/{id}/addPassword`` in a rule matches the object-id and the appId spelling
   alike. A segment holding ``(`` or ``)`` that does not parse as ``identifier(args)`` is refused.
   Type-cast segments (``microsoft.graph.group``) and ``$count``/``$ref``/``$value`` stay segments.
6. On Graph hosts, every path to one object becomes one path (:func:`canonical_segments`):
   ``microsoft.graph.addPassword`` is ``addpassword``, ``/directoryObjects/{id}/microsoft.graph.user``
   is ``/users/{id}``, a cast to the object's own type is dropped. Casts that narrow a collection
   (``memberOf/microsoft.graph.group``) keep their namespace.
7. The whole path is case-folded: Graph routing and key lookups are case-insensitive, so
   ``/Users/ABC`` and ``/users/abc`` must get the same decision. Non-Graph hosts (the Entra token
   endpoint) are case-folded too; every upstream this gateway fronts routes case-insensitively.

The canonical path always starts with ``/`` and has no trailing slash (the root is ``/``).

Query options are decoded once (``+`` is a space, as ASP.NET reads it); names are case-folded and,
on Graph hosts, a bare OData system option (``select``, ``top``, ...) gets its ``$``: beta documents
the ``$`` as optional, and treating v1.0 the same way can only make a ``$select`` rule stricter.
Values keep their case.

What a request asks of OData (:attr:`Operation.odata`, read by the policy's ``odata`` limits) is
read from ``$select``, ``$expand`` and ``$top`` at every depth: ``$expand=owners($select=keyCredentials;
$expand=owners($top=999))`` selects ``keyCredentials`` and asks for 999 items inside the expansion, and
a rule must see that as surely as a top-level ``$select``. Items are split at the commas and
semicolons that are outside parentheses and quotes; a property path (``microsoft.graph.user/mail``)
keeps its segments, case-folded. ``*`` (all properties, all navigation properties) is kept as ``*``.
Anything that cannot be read that way (unbalanced parentheses or quotes, a ``%XX`` escape that
survived decoding, an empty item, ``$compute`` and ``$apply``) is not guessed at:
:attr:`ODataQuery.problem` says why, and a rule with limits refuses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import unquote_plus, urlsplit

GRAPH_HOSTS = frozenset(
    {
        "graph.microsoft.com",
        "canary.graph.microsoft.com",
        "graph.microsoft.us",
        "dod-graph.microsoft.us",
        "microsoftgraph.chinacloudapi.cn",
        "graph.microsoft.de",
    }
)
GRAPH_VERSIONS = ("v1.0", "beta")

ODATA_OPTIONS = frozenset(
    {
        "select",
        "expand",
        "filter",
        "top",
        "skip",
        "count",
        "search",
        "orderby",
        "format",
        "skiptoken",
        "deltatoken",
        "levels",
        "apply",
        "compute",
        "index",
        "schemaversion",
    }
)

DEFAULT_PORTS = {"https": 443, "http": 80}

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEX2 = re.compile(r"[0-9A-Fa-f]{2}")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ASCII_HOST = re.compile(r"[a-z0-9_\-]+(\.[a-z0-9_\-]+)*")
_IPV6 = re.compile(r"\[[0-9a-f:.]+\]")
_KEY_SEGMENT = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_.]*)\((?P<args>.*)\)", re.DOTALL)
_ARG_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*")
_UNQUOTED = re.compile(r"\s*([^,'()\s]+)\s*")


class OperationError(ValueError):
    """The request cannot be reduced to one unambiguous operation; it must be refused."""


@dataclass(frozen=True)
class Operation:
    """A request as the policy sees it. ``path`` is canonical (see the module docstring) and
    excludes the Graph version; ``raw_target`` is the request target exactly as received."""

    method: str
    host: str
    port: int
    path: str
    version: str = ""
    query: tuple[tuple[str, str], ...] = ()
    raw_target: str = ""

    @classmethod
    def from_request(cls, method: str, scheme: str, host: str, port: int | None, target: str) -> Operation:
        """Build the canonical operation; raises :class:`OperationError` for requests to refuse."""
        method_n = normalize_method(method)
        host_n = normalize_host(host)
        if port is None:
            port = DEFAULT_PORTS.get(scheme.lower())
            if port is None:
                raise OperationError(f"unknown scheme {scheme!r} and no port")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise OperationError(f"invalid port {port!r}")
        raw_path, raw_query = _split_target(target, host_n)
        graph = host_n in GRAPH_HOSTS
        segments = _resolve_dots(_decode_path(raw_path).split("/"))
        version = ""
        if graph and segments and segments[0].casefold() in GRAPH_VERSIONS:
            version = segments.pop(0).casefold()
        if graph:
            segments = [part for segment in segments for part in _canonical_segment(segment)]
            segments = canonical_segments([segment.casefold() for segment in segments])
        path = "/" + "/".join(segments).casefold()
        return cls(
            method=method_n,
            host=host_n,
            port=port,
            path=path,
            version=version,
            query=parse_query(raw_query, graph=graph),
            raw_target=target,
        )

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path != "/" else ()

    @property
    def full_path(self) -> str:
        """The canonical path with its version: ``/v1.0/users``."""
        if not self.version:
            return self.path
        return f"/{self.version}" + ("" if self.path == "/" else self.path)

    @property
    def is_graph(self) -> bool:
        return self.host in GRAPH_HOSTS

    def param(self, name: str) -> list[str]:
        """All values of a query option, by its canonical name (``$select``)."""
        return [v for k, v in self.query if k == name]

    @cached_property
    def odata(self) -> ODataQuery:
        """What the request asks of OData: ``$select``/``$expand``/``$top`` at every depth."""
        return read_odata(self.query)

    def __str__(self) -> str:
        port = "" if self.port == 443 else f":{self.port}"
        return f"{self.method} {self.host}{port} {self.full_path}"


def normalize_method(method: str) -> str:
    if not isinstance(method, str) or not _TOKEN.fullmatch(method):
        raise OperationError(f"invalid method {method!r}")
    return method.upper()


def normalize_host(host: str) -> str:
    """Lower-case, trailing dot stripped, internationalised names in their ASCII (punycode) form."""
    if not isinstance(host, str) or not host:
        raise OperationError("empty host")
    h = host.strip()
    if h.startswith("["):
        if not _IPV6.fullmatch(h.lower()):
            raise OperationError(f"invalid host {host!r}")
        return h.lower()
    if h.endswith("."):
        h = h[:-1]
    if not h.isascii():
        h = _idna(h, host)
    h = h.lower()
    if not _ASCII_HOST.fullmatch(h) or len(h) > 253:
        raise OperationError(f"invalid host {host!r}")
    return h


def _idna(h: str, original: str) -> str:
    try:
        try:
            import idna  # httpx's dependency: IDNA 2008 with UTS #46 mapping (fullwidth dots, case)
        except ImportError:  # pragma: no cover - idna ships with httpx
            return h.encode("idna").decode("ascii")
        return idna.encode(h, uts46=True).decode("ascii")
    except UnicodeError as e:  # idna.IDNAError is a UnicodeError
        raise OperationError(f"invalid host {original!r}: {e}") from e


def _split_target(target: str, host: str) -> tuple[str, str]:
    if not isinstance(target, str) or not target:
        raise OperationError("empty request target")
    if target.lower().startswith(("http://", "https://")):
        # absolute-form, as plain-HTTP proxy requests carry it; the host must be the one judged
        try:
            parts = urlsplit(target)
            target_host = normalize_host(parts.hostname or "")
        except ValueError as e:
            raise OperationError(f"invalid absolute request target: {e}") from e
        if target_host != host:
            raise OperationError(f"request target names host {target_host!r}, not {host!r}")
        if "#" in target:
            raise OperationError("fragment in request target")
        return parts.path or "/", parts.query
    if not target.startswith("/"):
        raise OperationError(f"request target must start with '/': {target[:40]!r}")
    path, _, query = target.partition("?")
    if "#" in target:
        raise OperationError("fragment in request target")
    return path, query


def _decode_path(raw: str) -> str:
    """Percent-decode once, refusing escapes whose meaning depends on the decoder upstream."""
    parts = raw.split("%")
    try:
        buf = bytearray(parts[0].encode("utf-8"))
        for part in parts[1:]:
            if not _HEX2.match(part):
                raise OperationError("malformed percent-encoding in path")
            byte = int(part[:2], 16)
            if byte == 0x2F:
                raise OperationError("encoded slash (%2F) in path")
            if byte == 0x5C:
                raise OperationError("encoded backslash (%5C) in path")
            if byte == 0:
                raise OperationError("NUL in path")
            buf.append(byte)
            buf += part[2:].encode("utf-8")
        path = buf.decode("utf-8")
    except UnicodeError as e:
        raise OperationError("path is not valid UTF-8 once decoded") from e
    if "\\" in path:
        raise OperationError("backslash in path")
    if _CONTROL.search(path):
        raise OperationError("control character in path")
    if _ESCAPE.search(path):
        # %252F decodes to %2F: a second decoder upstream would see a slash we never judged
        raise OperationError("double percent-encoding in path")
    return path


def _resolve_dots(raw_segments: list[str]) -> list[str]:
    out: list[str] = []
    for segment in raw_segments:
        if segment in ("", "."):
            continue
        if segment == "..":
            if not out:
                raise OperationError("path climbs above the root ('..')")
            out.pop()
            continue
        out.append(segment)
    return out


def _canonical_segment(segment: str) -> list[str]:
    """``users('x')`` -> ``["users", "x"]``; see the module docstring for the canonical forms."""
    if "(" not in segment and ")" not in segment:
        return [segment]
    m = _KEY_SEGMENT.fullmatch(segment)
    if not m:
        raise OperationError(f"cannot read OData key segment {segment!r}")
    args = _parse_args(m["args"], segment)
    name = m["name"]
    if not args:
        return [name]
    named = [a for a in args if a[0] is not None]
    if not named:
        if len(args) > 1:
            raise OperationError(f"several unnamed keys in {segment!r}")
        return [name, args[0][1]]
    if len(named) != len(args):
        raise OperationError(f"mixed named and unnamed keys in {segment!r}")
    names = [a[0].casefold() for a in named]  # type: ignore[union-attr]
    if len(set(names)) != len(names):
        raise OperationError(f"repeated key name in {segment!r}")
    if len(named) == 1 and _is_primary_key(name, names[0]):
        # (id='x'), (Id='x') and users(userPrincipalName='x') are the key itself: /users/x
        return [name, named[0][1]]
    return [name, ",".join(f"{k}={v}" for k, v in sorted(zip(names, (a[1] for a in named), strict=True)))]


def _is_primary_key(entity_set: str, key_name: str) -> bool:
    # Graph reads /users/{id} and /users/{userPrincipalName} alike, so the named UPN key is the
    # plain segment too; which object a UPN names is resolved later (policy/objects.py).
    return key_name == "id" or (entity_set.casefold() == "users" and key_name == "userprincipalname")


# --- one object, one path ------------------------------------------------------------------------

NAMESPACE = "microsoft.graph."
# Entity sets of directory objects addressed by key (``/users/{id}``), and the type of their members.
ENTITY_TYPES = {
    "users": "user",
    "groups": "group",
    "applications": "application",
    "serviceprincipals": "serviceprincipal",
    "devices": "device",
    "contacts": "orgcontact",
    "directoryroles": "directoryrole",
    "directoryroletemplates": "directoryroletemplate",
    "administrativeunits": "administrativeunit",
}
TYPE_SETS = {NAMESPACE + t: entity_set for entity_set, t in ENTITY_TYPES.items()}
DIRECTORY_OBJECTS = "directoryobjects"
BASE_TYPE = NAMESPACE + "directoryobject"
# Type casts keep their namespace, so a cast (``memberOf/microsoft.graph.group``) is never read
# as an action or navigation property of the same name; every other qualified name is an action
# or a function, which Graph also serves unqualified (``microsoft.graph.addPassword``).
CAST_TYPES = frozenset(TYPE_SETS) | {BASE_TYPE}


def canonical_segments(segments: list[str]) -> list[str]:
    """Case-folded segments of a Graph path (or a policy pattern) rewritten so that every path to
    one object is one path:

    - namespace-qualified actions and functions lose the namespace:
      ``applications/x/microsoft.graph.addpassword`` is ``applications/x/addpassword``;
    - ``directoryobjects`` cast to a type is that type's entity set:
      ``directoryobjects/x/microsoft.graph.user/...`` and ``directoryobjects/microsoft.graph.user/x``
      are ``users/x/...``;
    - a cast of an object to its own type or to ``directoryObject`` changes nothing and is dropped:
      ``applications/x/microsoft.graph.application/addpassword`` is ``applications/x/addpassword``.

    ``directoryobjects/x`` without a cast and alternate keys (``applications/appid=x``) name an
    object whose entity set or id only Graph knows: :mod:`nhi_gateway.policy.objects` resolves them.
    """
    out = [s[len(NAMESPACE):] if s.startswith(NAMESPACE) and s not in CAST_TYPES and len(s) > len(NAMESPACE)
           else s for s in segments]
    while True:
        before = list(out)
        if out and out[0] == DIRECTORY_OBJECTS:
            if len(out) >= 2 and out[1] in TYPE_SETS:  # directoryObjects/microsoft.graph.user[/x...]
                out = [TYPE_SETS[out[1]], *out[2:]]
            elif len(out) >= 3 and out[2] in TYPE_SETS:  # directoryObjects/x/microsoft.graph.user[...]
                out = [TYPE_SETS[out[2]], out[1], *out[3:]]
        if out and out[0] in ENTITY_TYPES or out and out[0] == DIRECTORY_OBJECTS:
            own = {BASE_TYPE, NAMESPACE + ENTITY_TYPES.get(out[0], "directoryobject")}
            if len(out) >= 2 and out[1] in own:  # users/microsoft.graph.user[/x]
                out = [out[0], *out[2:]]
            elif len(out) >= 3 and out[2] in own:  # users/x/microsoft.graph.user[/...]
                out = [out[0], out[1], *out[3:]]
        if out == before:
            return out


def _parse_args(text: str, segment: str) -> list[tuple[str | None, str]]:
    if not text.strip():
        return []
    args: list[tuple[str | None, str]] = []
    i = 0
    while True:
        name = None
        m = _ARG_NAME.match(text, i)
        if m:
            name, i = m[1], m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "'":
            value, i = _quoted(text, i + 1, segment)
        else:
            m = _UNQUOTED.match(text, i)
            if not m:
                raise OperationError(f"cannot read OData key segment {segment!r}")
            value, i = m[1], m.end()
        if value in ("", ".", ".."):
            # an empty or dot key would become a segment that a later normaliser drops or resolves
            raise OperationError(f"empty or dot key in {segment!r}")
        args.append((name, value))
        while i < len(text) and text[i] == " ":
            i += 1
        if i == len(text):
            return args
        if text[i] != ",":
            raise OperationError(f"cannot read OData key segment {segment!r}")
        i += 1


def _quoted(text: str, i: int, segment: str) -> tuple[str, int]:
    out = []
    while i < len(text):
        c = text[i]
        if c == "'":
            if text.startswith("''", i):
                out.append("'")
                i += 2
                continue
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise OperationError(f"unterminated quote in {segment!r}")


def parse_query(raw: str, *, graph: bool = True) -> tuple[tuple[str, str], ...]:
    """``$select=a,b&top=5`` -> ``(("$select", "a,b"), ("$top", "5"))``, order kept."""
    if not raw:
        return ()
    out = []
    for piece in raw.split("&"):
        if not piece:
            continue
        key, _, value = piece.partition("=")
        try:
            key = unquote_plus(key, errors="strict")
            value = unquote_plus(value, errors="strict")
        except UnicodeError as e:
            raise OperationError("query is not valid UTF-8 once decoded") from e
        if "\x00" in key or "\x00" in value:
            raise OperationError("NUL in query")
        key = key.strip().casefold()
        if graph and not key.startswith("$") and key in ODATA_OPTIONS:
            key = "$" + key
        out.append((key, value))
    return tuple(out)


# --- OData query options ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ODataQuery:
    """What a request asks of OData, at every depth of ``$expand``.

    ``selects`` and ``expands`` hold property paths as tuples of case-folded segments
    (``("microsoft.graph.user", "mail")``); ``("*",)`` means "all". ``tops`` holds each ``$top``
    value as written. ``filters``, ``orderbys`` and ``searches`` hold each ``$filter`` (and each
    parameter alias ``@p``, an expression a filter can name), ``$orderby`` and ``$search`` as
    written: each can test a property's value without returning it. ``selected`` says whether
    the request has a top-level ``$select``; ``bare_expands`` are the expansions without a
    ``$select`` of their own (they return the expanded object's default properties).
    ``problem`` is set when the options could not be read unambiguously.
    """

    selects: tuple[tuple[str, ...], ...] = ()
    expands: tuple[tuple[str, ...], ...] = ()
    tops: tuple[str, ...] = ()
    problem: str = ""
    filters: tuple[str, ...] = ()
    orderbys: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    selected: bool = False
    bare_expands: tuple[tuple[str, ...], ...] = ()

    @cached_property
    def tested(self) -> tuple[tuple[str, str], ...]:
        """``(option, property)`` for each property a filter, sort or search names (case-folded),
        and ``("$search", "*")`` for a search term that names none (it searches the default
        properties). Empty when :attr:`problem` is set: nothing can be said then."""
        out: list[tuple[str, str]] = []
        try:
            for option, expressions in (("$filter", self.filters), ("$orderby", self.orderbys)):
                for expression in expressions:
                    out += [(option, name) for name in sorted(query_properties(expression))]
            for search in self.searches:
                out += [("$search", name) for name in sorted(search_properties(search))]
        except ValueError:
            return ()
        return tuple(dict.fromkeys(out))


_NESTED_OPTIONS = ("$select", "$expand", "$top", "$filter", "$orderby", "$search")


def read_odata(query: tuple[tuple[str, str], ...]) -> ODataQuery:
    """Read what a canonical query (see :func:`parse_query`) asks of OData."""
    reader = _ODataReader()
    problem = ""
    try:
        for name, value in query:
            reader.option(name, value, depth=0)
    except _ODataUnreadable as e:
        problem = str(e)
    return ODataQuery(tuple(reader.selects), tuple(reader.expands), tuple(reader.tops), problem,
                      tuple(reader.filters), tuple(reader.orderbys), tuple(reader.searches), reader.selected,
                      tuple(reader.bare_expands))


class _ODataUnreadable(ValueError):
    pass


_MAX_ODATA_DEPTH = 16


class _ODataReader:
    def __init__(self) -> None:
        self.selects: list[tuple[str, ...]] = []
        self.expands: list[tuple[str, ...]] = []
        self.tops: list[str] = []
        self.filters: list[str] = []
        self.orderbys: list[str] = []
        self.searches: list[str] = []
        self.selected = False
        self.bare_expands: list[tuple[str, ...]] = []

    def option(self, name: str, value: str, depth: int) -> None:
        if name in ("$compute", "$apply"):
            # Both can name properties and shape the answer: nothing a limit could judge.
            raise _ODataUnreadable(f"{name} cannot be judged")
        alias = name.startswith("@")  # a parameter alias: an expression that $filter can name
        if name not in _NESTED_OPTIONS and not alias:
            return
        if depth > _MAX_ODATA_DEPTH:
            raise _ODataUnreadable("$expand is nested too deeply")
        if name == "$top":
            self.tops.append(value.strip())
            return
        if _ESCAPE.search(value):
            # %2C would become a comma for a second decoder: what we split is not what Graph reads
            raise _ODataUnreadable(f"{name} still holds a percent-escape after decoding")
        if name in ("$filter", "$orderby") or alias:
            try:
                query_properties(value)
            except ValueError as e:
                raise _ODataUnreadable(f"{name}: {e}") from None
            (self.orderbys if name == "$orderby" else self.filters).append(value)
            return
        if name == "$search":
            try:
                search_properties(value)
            except ValueError as e:
                raise _ODataUnreadable(f"{name}: {e}") from None
            self.searches.append(value)
            return
        if not value.strip():
            return  # "$select=" asks for nothing beyond the default
        if name == "$select" and depth == 0:
            self.selected = True
        for item in _split_top_level(value, ",", name):
            path_text, options = _item_options(item, name)
            path = tuple(seg.strip().casefold() for seg in path_text.split("/"))
            if not all(path):
                raise _ODataUnreadable(f"{name} has an empty item or path segment in {item.strip()!r}")
            (self.selects if name == "$select" else self.expands).append(path)
            nested_select = False
            for option in options:
                key, eq, val = option.partition("=")
                key = key.strip().casefold()
                if not eq:
                    raise _ODataUnreadable(f"cannot read the option {option.strip()!r} inside {name}")
                if not key.startswith("$") and key in ODATA_OPTIONS:
                    key = "$" + key
                nested_select = nested_select or (key == "$select" and bool(val.strip()))
                self.option(key, val, depth + 1)
            if name == "$expand" and not nested_select:
                self.bare_expands.append(path)


# --- the properties a filter, sort or search names -------------------------------------------------

# A name or a path of names; not after a character that would make it part of a literal (the "T00"
# of 2024-01-01T00:00:00Z, the "e3" of 1e3).
_NAME_PATH = re.compile(
    r"(?<![A-Za-z0-9_.@$])[A-Za-z_@$][A-Za-z0-9_.@$]*(?:\s*/\s*[A-Za-z_@$][A-Za-z0-9_.@$]*)*")
_LAMBDA_VARIABLE = re.compile(r"(?<![A-Za-z0-9_.@$])([A-Za-z_][A-Za-z0-9_]*)\s*:")
_KEYWORDS = frozenset({
    "eq", "ne", "gt", "ge", "lt", "le", "and", "or", "not", "has", "in", "add", "sub", "mul", "div", "divby", "mod",
    "true", "false", "null", "asc", "desc", "inf", "nan", "$it", "$this", "$root",
})


def _strip_literals(expression: str) -> str:
    """The expression with every single-quoted literal ('' is an escaped quote) blanked out."""
    out, i, n = [], 0, len(expression)
    while i < n:
        c = expression[i]
        if c != "'":
            out.append(c)
            i += 1
            continue
        i += 1
        while True:
            if i >= n:
                raise ValueError("unterminated quote")
            if expression[i] == "'":
                if expression.startswith("''", i):
                    i += 2
                    continue
                i += 1
                break
            i += 1
        out.append("''")
    return "".join(out)


def query_properties(expression: str) -> set[str]:
    """The properties (case-folded) that a ``$filter``, ``$orderby`` or alias expression names:
    every segment of every name path, except keywords and operators, functions (a name before
    ``(``), lambda variables (``x`` in ``any(x:...)``), casts (``microsoft.graph.user``) and
    literals. Raises ``ValueError`` for an unterminated quote. Names it cannot place count as
    properties: a limit that allows only some properties refuses them."""
    text = _strip_literals(expression)
    variables = {m.group(1).casefold() for m in _LAMBDA_VARIABLE.finditer(text)}
    names: set[str] = set()
    for m in _NAME_PATH.finditer(text):
        rest = text[m.end():].lstrip()
        if rest.startswith(":"):
            continue  # a lambda variable being declared
        segments = [seg.strip().casefold() for seg in m.group().split("/")]
        if rest.startswith("("):
            segments = segments[:-1]  # a function, or any/all after the collection it ranges over
        if segments and segments[0] in variables:
            segments = segments[1:]
        for seg in segments:
            if seg in _KEYWORDS or "." in seg:
                continue
            names.add(seg)
    return names


_SEARCH_TERM = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s()"]+)')
_SEARCH_PROPERTY = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_./]*)\s*:")


def search_properties(search: str) -> set[str]:
    """The properties (case-folded) a ``$search`` names (``"displayName:adele" AND "mail:a"``),
    and ``*`` for a term that names none: it searches the resource's default properties. Raises
    ``ValueError`` for an unterminated quote."""
    if search.replace('\\"', "").count('"') % 2:
        raise ValueError("unterminated quote")
    names: set[str] = set()
    for m in _SEARCH_TERM.finditer(search):
        term = m.group(1) if m.group(1) is not None else m.group(2)
        if m.group(2) is not None and term.upper() in ("AND", "OR", "NOT"):
            continue
        p = _SEARCH_PROPERTY.match(term)
        if p is None:
            names.add("*")
        else:
            names.update(seg.casefold() for seg in p.group(1).split("/") if seg and "." not in seg)
    return names


def _split_top_level(text: str, sep: str, what: str) -> list[str]:
    """Split at ``sep`` outside parentheses and single quotes (``''`` is an escaped quote)."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, c in enumerate(text):
        if c == "'":
            quoted = not quoted
        elif quoted:
            continue
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise _ODataUnreadable(f"unbalanced ')' in {what}")
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if quoted:
        raise _ODataUnreadable(f"unterminated quote in {what}")
    if depth:
        raise _ODataUnreadable(f"unbalanced '(' in {what}")
    parts.append(text[start:])
    return parts


def _item_options(item: str, what: str) -> tuple[str, list[str]]:
    """``owners($select=id;$top=5)`` -> ``("owners", ["$select=id", "$top=5"])``."""
    open_at = item.find("(")
    if open_at < 0:
        if ")" in item or "'" in item:
            raise _ODataUnreadable(f"cannot read {item.strip()!r} in {what}")
        return item, []
    if not item.rstrip().endswith(")"):
        raise _ODataUnreadable(f"text after the options of {item.strip()!r} in {what}")
    inner = item.rstrip()[open_at + 1 : -1]
    # The options are split like the items: a ';' inside $filter's quotes or parentheses stays.
    options = [o for o in _split_top_level(inner, ";", what) if o.strip()]
    return item[:open_at], options
