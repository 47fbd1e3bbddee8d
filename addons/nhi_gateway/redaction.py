"""What gets written to disk never holds a credential.

Recordings (``FlowWriter``) and the audit trail outlive the tokens they saw, and whoever reads them
is not whoever was allowed to use those tokens. Everything bound for disk passes through here:
:func:`redact_url` for URLs, :func:`redact_flow_for_disk` for whole flows.

The live flow is never touched: redacting its headers or body would change what goes upstream
(mitmproxy sends the flow object as it stands after the hooks).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from nhi_gateway.masking import MAX_DEPTH, MaskingError, is_json_content_type

if TYPE_CHECKING:
    from mitmproxy import http

logger = logging.getLogger(__name__)

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
_URL_HEADERS = frozenset({"location", "content-location", "referer"})
_SET_COOKIE_ATTRS = frozenset(
    {"expires", "max-age", "domain", "path", "secure", "httponly", "samesite", "partitioned"}
)
# Keys that mitmproxy's own addons put in flow.metadata with a credential inside:
# proxyauth stores (username, password), and here the password is the caller's JWT.
_CREDENTIAL_METADATA = frozenset({"proxyauth"})


def scrub_text(text: str) -> str:
    """Replace anything shaped like a JWT or an Entra client secret."""
    return _ENTRA_SECRET.sub(REDACTED, _JWT.sub(REDACTED, text))


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
        head = re.sub(r"//[^/]*@", f"//{REDACTED}@", head)
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


def _redact_tree(obj: object) -> tuple[object, int]:
    """A copy of a JSON (or tnetstring) value with secret members and secret-shaped strings
    replaced; returns the copy and the number of replacements. Iterative and depth-limited."""

    def leaf(value: object) -> tuple[object, int]:
        if isinstance(value, str):
            new = scrub_text(value)
            return new, int(new != value)
        if isinstance(value, bytes):
            new_b = _ENTRA_SECRET_BYTES.sub(
                REDACTED.encode(), _JWT_BYTES.sub(REDACTED.encode(), value)
            )
            return new_b, int(new_b != value)
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
        items = src.items() if isinstance(src, dict) else enumerate(src)  # type: ignore[union-attr]
        for key, value in items:
            if isinstance(src, dict):
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


def _redact_json_text(text: str) -> str:
    """Raises MaskingError when the text is not JSON."""

    def refuse(name: str) -> object:
        raise MaskingError(f"{name} is not JSON")

    try:
        doc = json.loads(text, parse_constant=refuse)
    except MaskingError:
        raise
    except (ValueError, RecursionError) as e:
        raise MaskingError("not valid JSON") from e
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


def _redact_header_value(name: str, value: str) -> str:
    lname = name.lower()
    if lname in ("authorization", "proxy-authorization"):
        value = _redact_authorization(value)
    elif lname == "cookie":
        value = _redact_cookie(value)
    elif lname in ("set-cookie", "set-cookie2"):
        value = _redact_set_cookie(value)
    elif lname in _URL_HEADERS:
        value = redact_url(value)
    elif _SECRET_HEADER_NAME.search(lname):
        value = REDACTED
    return scrub_text(value)


def _redact_headers(headers: http.Headers) -> None:
    fields = []
    for raw_name, raw_value in headers.fields:
        name = raw_name.decode("utf-8", "surrogateescape")
        value = raw_value.decode("utf-8", "surrogateescape")
        new = _redact_header_value(name, value)
        fields.append((raw_name, new.encode("utf-8", "surrogateescape")))
    headers.fields = tuple(fields)


def _metadata_for_disk(flow: http.HTTPFlow) -> dict:
    # Imported here so that redact_url, and the audit trail that uses it, load without mitmproxy.
    from mitmproxy.io import tnetstring

    kept = {}
    for key, value in flow.metadata.items():
        if key in _CREDENTIAL_METADATA:
            continue
        try:
            tnetstring.dumps({key: value})
            value, _ = _redact_tree(value)
        except Exception:
            # Also keeps flow.copy() from deep-copying live objects (locks, events, clients).
            logger.debug("flow %s: metadata %r left out of the recording", flow.id, key)
            continue
        kept[key] = value
    return kept


def redact_flow_for_disk(flow: http.HTTPFlow) -> http.HTTPFlow:
    """A copy of ``flow`` that is safe to write with ``FlowWriter``; ``flow`` is not modified.

    The copy keeps the live flow's id, so audit lines and recorded flows can be joined.
    Bodies that cannot be decoded, or claim JSON and do not parse, are replaced by a placeholder
    (noted in ``metadata["nhi_gateway.withheld"]``) instead of being written raw.
    """
    # A shallow stand-in carries the filtered metadata into copy(): flow.copy() deep-copies
    # metadata and the undo backup (which still holds the original, unredacted request) as is.
    stand_in = copy.copy(flow)
    stand_in.metadata = _metadata_for_disk(flow)
    stand_in._backup = None
    disk = stand_in.copy()
    disk.id = flow.id

    withheld = {}
    request = disk.request
    _redact_headers(request.headers)
    if request.trailers:
        _redact_headers(request.trailers)
    if request.method != "CONNECT":
        request.path = _redact_target(request.path)
    if "@" in request.authority:
        request.authority = f"{REDACTED}@{request.authority.rpartition('@')[2]}"
    if why := _redact_body(request):
        withheld["request"] = why
    if disk.response:
        _redact_headers(disk.response.headers)
        if disk.response.trailers:
            _redact_headers(disk.response.trailers)
        if why := _redact_body(disk.response):
            withheld["response"] = why
    if disk.websocket:
        for message in disk.websocket.messages:
            message.content = _ENTRA_SECRET_BYTES.sub(
                REDACTED.encode(), _JWT_BYTES.sub(REDACTED.encode(), message.content)
            )
    if disk.error:
        disk.error.msg = scrub_text(disk.error.msg)
    disk.comment = scrub_text(disk.comment)
    if withheld:
        disk.metadata["nhi_gateway.withheld"] = withheld
    return disk
