"""What gets written to disk never holds a credential.

Recordings (``FlowWriter``) and the audit trail outlive the tokens they saw, and whoever reads them
is not whoever was allowed to use those tokens. Everything bound for disk passes through here:
:func:`redact_url` for URLs, :func:`redacted_state` for whole flows (the recorder serialises it
directly; :func:`redact_flow_for_disk` makes a flow object of it).

The live flow is never touched: redacting its headers or body would change what goes upstream
(mitmproxy sends the flow object as it stands after the hooks).

Every flow passes through here, so the common case is kept cheap: the credential patterns have a
fixed part (``eyJ``, ``Q~``, a member name) that a substring test finds long before a regex or a
JSON walk would, and only text that has one is scanned in full.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from nhi_gateway.masking.masks import MAX_DEPTH, MaskingError, is_json_content_type

if TYPE_CHECKING:
    from mitmproxy import http

logger = logging.getLogger(__name__)

M = TypeVar("M", bound="http.Message")
H = TypeVar("H", bound="http.Headers")

REDACTED = "[redacted]"

# Compact JWS (three parts) and JWE (five parts), base64url without padding. An unsigned token
# (alg "none") has an empty third part and is still a bearer credential.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*){2,4}")
# Entra client secrets (the value of addPassword's secretText) carry a "Q~" marker after three
# characters and a digit: the shape secret scanners look for.
_ENTRA_SECRET = re.compile(r"[A-Za-z0-9_~.-]{3}[0-9]Q~[A-Za-z0-9_~.-]{31,34}")
_JWT_BYTES = re.compile(_JWT.pattern.encode())
_ENTRA_SECRET_BYTES = re.compile(_ENTRA_SECRET.pattern.encode())

# Query, fragment and form parameters whose values are credentials (OAuth token endpoint, SAS
# URLs, Graph's pre-authenticated @microsoft.graph.downloadUrl with tempauth, API keys).
_SECRET_PARAMS = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "token",
        "client_secret",
        "client_assertion",
        "assertion",
        "subject_token",
        "actor_token",
        "code",
        "device_code",
        "code_verifier",
        "password",
        "sig",
        "signature",
        "tempauth",
        "api_key",
        "apikey",
        "api-key",
        "subscription-key",
    }
)
# JSON members whose values are credentials, anywhere in a document (casefolded).
_SECRET_JSON_FIELDS = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "client_secret",
        "client_assertion",
        "secrettext",  # addPassword's answer: the only time Entra shows the secret
        "password",  # passwordProfile.password
        "newpassword",  # changePassword
        "currentpassword",
        "passwordbase64",  # LAPS
    }
)
# The same for a substring test: a name that holds another one (newpassword holds password) is
# found whenever it is, so the names that hold no other one are enough.
_SECRET_JSON_FIELD_PARTS = tuple(
    sorted(
        name
        for name in _SECRET_JSON_FIELDS
        if not any(other != name and other in name for other in _SECRET_JSON_FIELDS)
    )
)
# For text whose structure is unknown (wrong or missing Content-Type, truncated JSON).
_LOOSE_PARAM = re.compile(
    r"(?i)(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, sorted(_SECRET_PARAMS))) + r")=[^&\s\"'<>]*"
)
_LOOSE_JSON_MEMBER = re.compile(
    r"(?i)\"(" + "|".join(map(re.escape, sorted(_SECRET_JSON_FIELDS))) + r")\"\s*:\s*"
    r"(?:\"(?:[^\"\\]|\\.)*\"?|[^,}\]\s]+)"
)

# Authorization schemes worth keeping in front of "[redacted]". An unknown first word may be
# the credential itself (a bare token), so it goes too.
_AUTH_SCHEMES = frozenset(
    {
        "bearer",
        "basic",
        "digest",
        "negotiate",
        "ntlm",
        "pop",
        "mac",
        "hoba",
        "mutual",
        "token",
        "aws4-hmac-sha256",
        "sharedkey",
        "sharedkeylite",
        "sharedaccesssignature",
    }
)
_SECRET_HEADER_NAME = re.compile(
    r"(?i)(token|secret|passw|api-?key|-key$|^key$|credential|signature)"
)
# The same, for a lowercased ASCII name: IGNORECASE makes the regex several times slower.
_SECRET_LOWER_ASCII_HEADER_NAME = re.compile(_SECRET_HEADER_NAME.pattern.removeprefix("(?i)"))
_USERINFO = re.compile(r"//[^/]*@")
_URL_HEADERS = frozenset({"location", "content-location", "referer"})
# Raw header name -> what _header_redactor answers for it. Names repeat from flow to flow, and the
# answer depends on the name alone; capped, since clients choose the names.
_HEADER_REDACTORS: dict[bytes, Callable[[str], str] | None] = {}
_MAX_CACHED_HEADER_NAMES = 512
_UNKNOWN = object()
_SET_COOKIE_ATTRS = frozenset(
    {"expires", "max-age", "domain", "path", "secure", "httponly", "samesite", "partitioned"}
)
# Keys that mitmproxy's own addons put in flow.metadata with a credential inside:
# proxyauth stores (username, password), and here the password is the caller's JWT.
_CREDENTIAL_METADATA = frozenset({"proxyauth"})


def scrub_text(text: str) -> str:
    """Replace anything shaped like a JWT or an Entra client secret."""
    # The secret pattern has no literal prefix, so the regex alone tries every position of the text.
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if "Q~" in text:
        text = _ENTRA_SECRET.sub(REDACTED, text)
    return text


def _scrub_bytes(data: bytes) -> bytes:
    if b"eyJ" in data:
        data = _JWT_BYTES.sub(REDACTED.encode(), data)
    if b"Q~" in data:
        data = _ENTRA_SECRET_BYTES.sub(REDACTED.encode(), data)
    return data


def _scrub_loose(text: str) -> str:
    text = _LOOSE_JSON_MEMBER.sub(lambda m: f'"{m.group(1)}":"{REDACTED}"', text)
    text = _LOOSE_PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
    return scrub_text(text)


def _holds_secret(raw: str) -> bool:
    decoded = unquote_plus(raw)
    return scrub_text(decoded) != decoded


def _redact_params(params: str) -> str:
    """``a=1&client_secret=x`` -> ``a=1&client_secret=[redacted]``, keeping every other byte,
    so a redacted URL still reads like the one that was sent."""
    if not params:
        return params
    out = []
    for piece in params.split("&"):
        name, eq, value = piece.partition("=")
        if eq and unquote_plus(name).strip().casefold() in _SECRET_PARAMS:
            out.append(f"{name}={REDACTED}")
        elif _holds_secret(name):
            out.append(REDACTED)
        elif eq and _holds_secret(value):
            out.append(f"{name}={REDACTED}")
        else:
            out.append(piece)
    return "&".join(out)


def _redact_target(target: str) -> str:
    """A request target (path and query, no scheme or host)."""
    path, q, query = target.partition("?")
    return scrub_text(path) + q + _redact_params(query)


def redact_url(url: str) -> str:
    """The URL with credentials in userinfo, query, fragment and path segments replaced."""
    try:
        parts = urlsplit(url)
    except ValueError:
        # urlsplit refuses some malformed hosts ("http://[::1"): keep only what is safe to keep.
        head, q, _ = url.partition("?")
        head = _USERINFO.sub(f"//{REDACTED}@", head)
        return scrub_text(head) + (f"?{REDACTED}" if q else "")
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    return urlunsplit(
        (
            parts.scheme,
            netloc,
            scrub_text(parts.path),
            _redact_params(parts.query),
            # OAuth's implicit flow answers with #access_token=...
            _redact_params(parts.fragment),
        )
    )


def _redact_tree(obj: object, serialisable: bool = False) -> tuple[object, int]:
    """A copy of a JSON (or tnetstring) value with secret members and secret-shaped strings
    replaced; returns the copy and the number of replacements. Iterative and depth-limited.

    With ``serialisable``, raises ``TypeError`` or ``UnicodeEncodeError`` where mitmproxy's
    tnetstring could not write the value (the types it takes, text that encodes as UTF-8).
    """

    def leaf(value: object) -> tuple[object, int]:
        if isinstance(value, str):
            if serialisable and not value.isascii():
                value.encode("utf-8")  # lone surrogates do not
            new = scrub_text(value)
            return new, int(new != value)
        if isinstance(value, bytes):
            new_b = _scrub_bytes(value)
            return new_b, int(new_b != value)
        if serialisable and not (value is None or isinstance(value, (int, float))):
            raise TypeError(f"{type(value).__name__} is not tnetstring-serialisable")
        return value, 0

    if not isinstance(obj, (dict, list, tuple)):
        return leaf(obj)
    changes = 0
    root: dict | list = {} if isinstance(obj, dict) else [None] * len(obj)
    stack: list[tuple[object, dict | list, int]] = [(obj, root, 1)]
    while stack:
        src, dst, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise MaskingError(f"document nested deeper than {MAX_DEPTH} levels")
        is_dict = isinstance(src, dict)
        items = src.items() if is_dict else enumerate(src)  # type: ignore[union-attr]
        for key, value in items:
            if is_dict:
                new_key, n = leaf(key)
                changes += n
                if isinstance(key, str) and key.casefold() in _SECRET_JSON_FIELDS:
                    dst[new_key] = REDACTED  # type: ignore[index]
                    changes += 1
                    continue
                key = new_key
            if isinstance(value, (dict, list, tuple)):
                child: dict | list = {} if isinstance(value, dict) else [None] * len(value)
                dst[key] = child  # type: ignore[index]
                stack.append((value, child, depth + 1))
            else:
                dst[key], n = leaf(value)  # type: ignore[index]
                changes += n
    return root, changes


def _names_a_secret_member(text: str) -> bool:
    # Casefolding works character by character, so a member name that casefolds to a secret one
    # leaves that name in the casefolded text.
    folded = text.casefold()
    for name in _SECRET_JSON_FIELD_PARTS:
        if name in folded:
            return True
    return False


class _PlainCopyUnsure(Exception):
    """:func:`_plain_copy` met something only :func:`_redact_tree` can judge."""


_PLAIN_SCALARS = frozenset({int, float, bool, type(None)})


def _plain_copy(obj: object) -> dict | list | None:
    """``_redact_tree(obj, serialisable=True)[0]`` for the common metadata value that has nothing
    to redact and nothing mitmproxy cannot write, found without its per-value work; ``None`` when
    that is not certain (then the caller asks ``_redact_tree``).

    Certain when every container is exactly a dict (with ``str`` keys), list or tuple, no deeper
    than ``_redact_tree`` allows, and every other value exactly a ``str``, ``int``, ``float``,
    ``bool`` or ``None`` (subclasses and bytes go the slow way); and when the text of all keys and
    strings encodes as UTF-8, holds no ``eyJ`` or ``Q~`` (which every JWT or secret match has),
    and names no secret member (a key that casefolds to one leaves its name in the casefolded
    text). ``_redact_tree`` would then change no key or string and raise nothing, so its copy is
    this one: the same keys and values in the same order, dicts as dicts, lists and tuples as lists.
    """
    if type(obj) is not dict and type(obj) is not list and type(obj) is not tuple:
        return None
    strings: list[str] = []
    add = strings.append

    def walk(src: dict | list | tuple, depth: int) -> dict | list:
        if depth > MAX_DEPTH:
            raise _PlainCopyUnsure
        if type(src) is dict:
            out: dict = {}
            for key, value in src.items():
                if type(key) is not str:
                    raise _PlainCopyUnsure
                add(key)
                kind = type(value)
                if kind is str:
                    add(value)
                    out[key] = value
                elif kind in _PLAIN_SCALARS:
                    out[key] = value
                elif kind is dict or kind is list or kind is tuple:
                    out[key] = walk(value, depth + 1)
                else:
                    raise _PlainCopyUnsure
            return out
        items: list = []
        for value in src:
            kind = type(value)
            if kind is str:
                add(value)
                items.append(value)
            elif kind in _PLAIN_SCALARS:
                items.append(value)
            elif kind is dict or kind is list or kind is tuple:
                items.append(walk(value, depth + 1))
            else:
                raise _PlainCopyUnsure
        return items

    try:
        copied = walk(obj, 1)
    except Exception:  # _PlainCopyUnsure, RecursionError, a dict changed while read: ask _redact_tree
        return None
    # Every key and string is a piece of this text, so the text holds whatever one of them holds
    # (and "\n", in no pattern or name, keeps two neighbours from making a false one between them).
    text = "\n".join(strings)
    if "eyJ" in text or "Q~" in text:
        return None
    if not text.isascii():
        try:
            text.encode("utf-8")  # lone surrogates do not
        except UnicodeEncodeError:
            return None
    if _names_a_secret_member(text):
        return None
    return copied


def _refuse_constant(name: str) -> object:
    raise MaskingError(f"{name} is not JSON")


# One decoder for every body: json.loads with an argument builds a new one per call.
_JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _redact_json_text(text: str) -> str:
    """Raises MaskingError when the text is not JSON."""
    try:
        # Unlike json.loads, decode() has no test of its own for a leading BOM, but it refuses one
        # as it refuses any text that does not start with a JSON value: a ValueError either way.
        doc = _JSON_DECODER.decode(text)
    except MaskingError:
        raise
    except (ValueError, RecursionError) as e:
        raise MaskingError("not valid JSON") from e
    if "\\" not in text and scrub_text(text) == text and not _names_a_secret_member(text):
        # Without escapes every member name and string of the document is a piece of the text as
        # it stands: none names a secret member and none holds a token, so the walk would find nothing.
        return text
    return _redacted_json_text(doc, text)


def _redacted_json_text(doc: object, text: str) -> str:
    """``text``, which parsed as ``doc``, with what the walk redacts in ``doc`` redacted."""
    redacted, changes = _redact_tree(doc)
    if not changes:
        # Parsing dropped nothing that matters, but a duplicate key the parser discarded may
        # still hold a token in the original text.
        return scrub_text(text)
    out = json.dumps(redacted, ensure_ascii=False, separators=(",", ":"))
    try:
        out.encode("utf-8")
    except UnicodeEncodeError:
        out = json.dumps(redacted, ensure_ascii=True, separators=(",", ":"))
    return out


def _withhold(message: http.Message, why: str) -> None:
    message.headers.pop("content-encoding", None)
    message.content = f"[nhi-gateway: body withheld from the recording: {why}]".encode()


def _redact_body(message: http.Message) -> str | None:
    """Redact a message body in place (on the disk copy). Returns why it was withheld, if so."""
    if not message.raw_content:
        return None
    try:
        text = message.get_text(strict=True)
    except Exception:
        # Never the exception text: mitmproxy's decode errors quote the start of the body.
        _withhold(message, "it could not be decoded with its Content-Encoding and charset")
        return "undecodable"
    if text is None:
        return None
    content_type = message.headers.get("content-type", "")
    if "application/x-www-form-urlencoded" in content_type.lower():
        new = _scrub_loose(_redact_params(text))
    elif is_json_content_type(content_type) or text.lstrip()[:1] in ("{", "["):
        try:
            new = _redact_json_text(text)
        except MaskingError:
            if is_json_content_type(content_type):
                # A secret can hide behind JSON escapes ("\u0070assword") that only a parser
                # undoes: a JSON body that does not parse is not written at all.
                _withhold(message, "declared as JSON but it does not parse")
                return "invalid-json"
            new = _scrub_loose(text)
    else:
        new = _scrub_loose(text)
    if new != text:
        try:
            message.set_text(new)
        except Exception:
            _withhold(message, "it could not be re-encoded after redaction")
            return "unencodable"
    return None


def _redact_authorization(value: str) -> str:
    scheme, sep, _ = value.strip().partition(" ")
    if sep and scheme.casefold() in _AUTH_SCHEMES:
        return f"{scheme} {REDACTED}"
    return REDACTED


def _redact_cookie(value: str) -> str:
    pairs = []
    for piece in value.split(";"):
        name, eq, _ = piece.strip().partition("=")
        # A piece without "=" may be a bare token, not a name.
        pairs.append(f"{name}={REDACTED}" if eq and name else REDACTED)
    return "; ".join(pairs)


def _redact_set_cookie(value: str) -> str:
    first, *attrs = value.split(";")
    name, eq, _ = first.strip().partition("=")
    out = [f"{name}={REDACTED}" if eq and name else REDACTED]
    for attr in attrs:
        attr_name = attr.strip().partition("=")[0].strip().casefold()
        out.append(attr.strip() if attr_name in _SET_COOKIE_ATTRS else REDACTED)
    return "; ".join(out)


def _redact_whole(value: str) -> str:
    return REDACTED


def _header_redactor(name: str) -> Callable[[str], str] | None:
    """What a header of this name has done to its value, if anything, before :func:`scrub_text`
    (which every header value goes through)."""
    lname = name.lower()
    if lname in ("authorization", "proxy-authorization"):
        return _redact_authorization
    if lname == "cookie":
        return _redact_cookie
    if lname in ("set-cookie", "set-cookie2"):
        return _redact_set_cookie
    if lname in _URL_HEADERS:
        return redact_url
    if (_SECRET_LOWER_ASCII_HEADER_NAME if lname.isascii() else _SECRET_HEADER_NAME).search(lname):
        return _redact_whole
    return None


def _redacted_headers(headers: H) -> H:
    """A new ``Headers`` with the fields of ``headers`` redacted; ``headers`` is not changed."""
    fields = []
    for raw_name, raw_value in headers.fields:
        cacheable = type(raw_name) is bytes
        redactor = _HEADER_REDACTORS.get(raw_name, _UNKNOWN) if cacheable else _UNKNOWN
        if redactor is _UNKNOWN:
            redactor = _header_redactor(raw_name.decode("utf-8", "surrogateescape"))
            if cacheable and len(_HEADER_REDACTORS) < _MAX_CACHED_HEADER_NAMES:
                _HEADER_REDACTORS[raw_name] = redactor
        value = raw_value.decode("utf-8", "surrogateescape")
        if redactor is None:
            if "eyJ" not in value and "Q~" not in value:
                fields.append((raw_name, raw_value))  # scrub_text would keep it as it is
                continue
            new = scrub_text(value)
        else:
            new = scrub_text(redactor(value))
        fields.append((raw_name, raw_value if new == value else new.encode("utf-8", "surrogateescape")))
    # What headers.copy() does (from_state(get_state())), with the redacted fields.
    return type(headers).from_state(tuple(fields))


def _metadata_for_disk(flow: http.HTTPFlow) -> dict:
    kept = {}
    for key, value in flow.metadata.items():
        if key in _CREDENTIAL_METADATA:
            continue
        try:
            # The key is checked, and kept as it is; an ASCII str passes that check.
            if not (type(key) is str and key.isascii()):
                _redact_tree(key, serialisable=True)
            if type(value) is str and value.isascii():
                value = scrub_text(value)  # all that _redact_tree does with it
            elif (copied := _plain_copy(value)) is not None:
                value = copied
            else:
                value, _ = _redact_tree(value, serialisable=True)
        except Exception:
            # Live objects (the Principal, locks, events, clients) stay in memory.
            logger.debug("flow %s: metadata %r left out of the recording", flow.id, key)
            continue
        kept[key] = value
    return kept


def _disk_copy(message: M) -> M:
    """A request or response that redaction may change while the live one goes upstream as it is.

    Its headers and trailers are redacted already; its body is not.

    Shallow: the copy shares the live message's bytes (immutable) until redaction replaces them.
    ``Message.from_state`` would do the same work with a type check of every field on top, and
    ``flow.copy()`` round-trips the whole flow, connections and certificates included.
    """
    disk = copy.copy(message)
    disk.data = copy.copy(message.data)
    disk.data.headers = _redacted_headers(message.data.headers)
    if message.data.trailers is not None:
        disk.data.trailers = _redacted_headers(message.data.trailers)
    return disk


def redacted_state(flow: http.HTTPFlow, request_part: tuple[dict, str | None] | None = None) -> dict:
    """What is written to disk for ``flow``: its ``get_state()`` with credentials redacted, less
    ``client_conn`` and ``server_conn``. ``flow`` is not modified.

    ``request_part``: the redacted request state and the reason its body was withheld (or None),
    as an earlier call for the same request returned them (``state["request"]`` and
    ``state["metadata"]["nhi_gateway.withheld"]["request"]``): the recording process redacts the
    request half of a flow once, for its write-ahead record, and reuses it for the whole record.

    Connections carry no credential and are the same for every flow on them, so the recorder
    serialises each once (:class:`nhi_gateway.recording.files.RecordEncoder`) rather than per flow.
    The undo backup, which still holds the original request, is never part of it. Bodies that
    cannot be decoded, or claim JSON and do not parse, are replaced by a placeholder (noted in
    ``metadata["nhi_gateway.withheld"]``) instead of being written raw.
    """
    # Imported here so that redact_url, and the audit trail that uses it, load without mitmproxy.
    from mitmproxy.version import FLOW_FORMAT_VERSION

    withheld = {}
    if request_part is None:
        request = _disk_copy(flow.request)
        if request.method != "CONNECT":
            request.path = _redact_target(request.path)
        if "@" in request.authority:
            request.authority = f"{REDACTED}@{request.authority.rpartition('@')[2]}"
        why = _redact_body(request)
        request_state = request.get_state()
    else:
        request_state, why = request_part
    if why:
        withheld["request"] = why
    response = None
    if flow.response:
        response = _disk_copy(flow.response)
        if why := _redact_body(response):
            withheld["response"] = why
    websocket = None
    if flow.websocket:
        disk_websocket = type(flow.websocket).from_state(flow.websocket.get_state())
        for message in disk_websocket.messages:
            message.content = _scrub_bytes(message.content)
        websocket = disk_websocket.get_state()
    error = None
    if flow.error:
        error = flow.error.get_state()
        error["msg"] = scrub_text(error["msg"])
    metadata = _metadata_for_disk(flow)
    if withheld:
        metadata["nhi_gateway.withheld"] = withheld
    # The fields of HTTPFlow.get_state(); a test holds this to mitmproxy's own for a clean flow.
    return {
        "version": FLOW_FORMAT_VERSION,
        "type": flow.type,
        "id": flow.id,  # audit lines and recorded flows join on it
        "error": error,
        "intercepted": flow.intercepted,
        "is_replay": flow.is_replay,
        "marked": flow.marked,
        "metadata": metadata,
        "comment": scrub_text(flow.comment),
        "timestamp_created": flow.timestamp_created,
        "backup": None,
        "request": request_state,
        "response": response.get_state() if response else None,
        "websocket": websocket,
    }


def redact_flow_for_disk(flow: http.HTTPFlow) -> http.HTTPFlow:
    """A copy of ``flow`` that is safe to write with ``FlowWriter``; ``flow`` is not modified.

    The flow form of :func:`redacted_state` (same id, connections included), for callers that
    want an object to inspect or hand to mitmproxy.
    """
    from mitmproxy import http

    state = redacted_state(flow)
    state["client_conn"] = flow.client_conn.get_state()
    state["server_conn"] = flow.server_conn.get_state()
    return http.HTTPFlow.from_state(state)
