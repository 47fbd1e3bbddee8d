"""Admission: what a request must look like before anything judges who sends it or what it does.

These checks run before identity and before any rule, on every request (and the ``$batch`` reader
applies the method-override check to each inner request). Each refusal names its check:

- ``size``: the request target, the number of header fields, one field and all fields together
  are bounded (:data:`LIMITS`); over a limit the request is refused 414 (target) or 431 (headers).
  mitmproxy itself bounds neither, and a rule engine, a token verifier and a recording should
  never be handed a megabyte-long header to chew on. The limits are far above anything Graph
  accepts or any SDK sends (Graph's front end refuses URLs longer than a few KiB; an Entra token
  is a few KiB even for a user in 200 groups; SDKs send 10 to 20 header fields).
- ``transfer_encoding``: a request body may be framed ``chunked`` (or by ``Content-Length``) and
  nothing else. Another transfer coding (``gzip, chunked``) would reach the upstream still coded:
  the gateway would judge, redact and record bytes it never decoded, while the upstream reads
  what they decode to (a ``client_secret`` inside a gzip-coded token request).
- ``method_override``: ``X-HTTP-Method-Override``, ``X-HTTP-Method``, ``X-Method-Override`` or a
  ``_method`` parameter (query, form body, top level of a JSON body) ask a server to run another
  method than the request line's. Graph does not document honouring them, but a server (or a
  proxy on the way) that does would run a ``DELETE`` the policy judged as a ``GET``. The gateway
  judges only the request line's method, so a request that asks for another is refused (400)
  rather than judged as something it may not be.

Nothing here imports mitmproxy: the addon (:mod:`nhi_gateway.addons.admission`) reads the flow
and hands over plain values, and the command-line tools can ask the same questions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import unquote_to_bytes

from nhi_gateway.policy.decision import Decision, Stage


@dataclass(frozen=True)
class Limits:
    """Sizes in bytes, as the request carried them (a header field is its name plus its value)."""

    target: int = 16 * 1024  # request target (path and query; the authority of a CONNECT)
    header_count: int = 100
    header_field: int = 16 * 1024
    headers_total: int = 64 * 1024


LIMITS = Limits()

# Lower-case names: HTTP header names are case-insensitive, and HTTP/2 sends them lower-case.
METHOD_OVERRIDE_HEADERS = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
METHOD_OVERRIDE_PARAMETER = b"_method"

CHECK_SIZE = "size"
CHECK_TRANSFER_ENCODING = "transfer_encoding"
CHECK_METHOD_OVERRIDE = "method_override"


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    check: str
    message: str

    def decision(self, operation: str = "") -> Decision:
        return Decision.deny(Stage.REQUEST, self.status, self.code, self.message, check=self.check,
                             operation=operation)


def _as_bytes(value: str | bytes) -> bytes:
    # mitmproxy hands over str decoded with surrogateescape: count and compare the bytes sent.
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def size_refusal(target: str | bytes, fields: Iterable[tuple[str | bytes, str | bytes]],
                 limits: Limits = LIMITS) -> Refusal | None:
    """414 for a target longer than the limit, 431 for too many, too large or too much header."""
    length = len(target) if type(target) is bytes else len(_as_bytes(target))
    if length > limits.target:
        return Refusal(414, "RequestUriTooLong", CHECK_SIZE,
                       f"the request target is {length} bytes long; the gateway accepts at most "
                       f"{limits.target} (no Graph request needs more). The request was not forwarded.")
    count = total = 0
    for name, value in fields:
        count += 1
        size = (len(name) + len(value) if type(name) is bytes and type(value) is bytes
                else len(_as_bytes(name)) + len(_as_bytes(value)))
        total += size
        if size > limits.header_field:
            shown = _as_bytes(name)[:64].decode("ascii", "replace")
            return Refusal(431, "RequestHeaderFieldsTooLarge", CHECK_SIZE,
                           f"the header field {shown!r} is {size} bytes; the gateway accepts at most "
                           f"{limits.header_field} per field. The request was not forwarded.")
    if count > limits.header_count:
        return Refusal(431, "RequestHeaderFieldsTooLarge", CHECK_SIZE,
                       f"the request has {count} header fields; the gateway accepts at most "
                       f"{limits.header_count}. The request was not forwarded.")
    if total > limits.headers_total:
        return Refusal(431, "RequestHeaderFieldsTooLarge", CHECK_SIZE,
                       f"the request's header fields are {total} bytes together; the gateway accepts "
                       f"at most {limits.headers_total}. The request was not forwarded.")
    return None


def transfer_encoding_refusal(values: Iterable[str]) -> Refusal | None:
    """Any ``Transfer-Encoding`` but exactly one ``chunked`` (the framing mitmproxy reads)."""
    values = list(values)
    if not values:
        return None
    codings = [c.strip().lower() for v in values for c in v.split(",")]
    if codings == ["chunked"]:
        return None
    shown = ", ".join(values)[:100]
    return Refusal(400, "BadRequest", CHECK_TRANSFER_ENCODING,
                   f"Transfer-Encoding {shown!r} is refused: a request body may be framed 'chunked' and "
                   "nothing else (compress it with Content-Encoding instead). The request was not forwarded.")


def _parameter_names(query: bytes) -> Iterable[bytes]:
    for pair in query.split(b"&"):
        name = pair.split(b"=", 1)[0]
        # '+' is a space in form encoding; decoding makes '%5Fmethod' the '_method' it means.
        yield unquote_to_bytes(name.replace(b"+", b" ")).strip().lower()


def _may_name_method(data: bytes) -> bool:
    # Only a query or form that has "method" in it, or a percent-escape that could spell it, is parsed.
    return b"%" in data or b"method" in data.lower()


def _json_top_level_names(body: bytes) -> Iterable[str]:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return ()  # a body that is no JSON has no JSON members; other checks judge it
    return doc.keys() if isinstance(doc, dict) else ()


def method_override(headers: Iterable[tuple[str, str]], query: str | bytes = b"", body: bytes = b"",
                    content_type: str = "") -> str | None:
    """What asks for another method than the request line's, or None.

    ``headers``: (name, value) pairs; ``query``: the raw query string (after ``?``); ``body``: the
    body as the upstream would read it, with its ``content_type``."""
    for name, _ in headers:
        if name.strip().lower() in METHOD_OVERRIDE_HEADERS:
            return f"the header {name.strip()[:40]!r}"
    query = _as_bytes(query)
    if _may_name_method(query) and any(n == METHOD_OVERRIDE_PARAMETER for n in _parameter_names(query)):
        return "the query parameter '_method'"
    if not body:
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        if _may_name_method(body) and any(n == METHOD_OVERRIDE_PARAMETER for n in _parameter_names(body)):
            return "the form parameter '_method'"
    elif media == "application/json" or media.endswith("+json"):
        # Parsed only when it may name it: "method" in it, or a \u escape that could spell it.
        if (b"\\u" in body or b"method" in body.lower()) and any(
                isinstance(k, str) and k.strip().lower() == "_method" for k in _json_top_level_names(body)):
            return "the JSON member '_method'"
    return None


def method_override_refusal(method: str, found: str) -> Refusal:
    return Refusal(400, "BadRequest", CHECK_METHOD_OVERRIDE,
                   f"{found} asks for another method than {method[:20]}; the gateway judges the method "
                   "of the request line only, so requests that override it are refused. Send the "
                   "method itself.")


# --- answers mitmproxy itself gives -------------------------------------------------------------

# flow.metadata: what mitmproxy answered a flow it ended itself: {"from": "client" | "upstream",
# "code": its ErrorCode's name, "status": the status the client got, 0 for none (a reset)}
PROTOCOL_ERROR_KEY = "nhi.protocol_error"
# The flow made for a request head mitmproxy could not parse at all (no method, no target).
UNREADABLE_METHOD = "UNREADABLE"
UNREADABLE_HOST = "unreadable.invalid"  # RFC 2606: never a real host, never an upstream


def answered_status(error: str, protocol_error: dict | None, judged: bool) -> int:
    """The status the client saw for a flow that ended in an error (0: none, the stream or
    connection was reset). ``judged``: whether the gateway's request hooks decided it."""
    if error == HEAD_TOO_LARGE:
        return 431
    if protocol_error is not None:
        return int(protocol_error.get("status") or 0)
    if error.startswith("Request body exceeds"):
        return 413  # mitmproxy's body_size_limit, before the body was read
    if not judged:
        return 400  # refused by mitmproxy's own checks (framing, smuggling) before any hook judged it
    return 502


def proxy_refusal(status: int, error: str) -> Decision:
    """The decision of a request that mitmproxy refused itself, before the gateway judged it."""
    code, check, message = PROTOCOL_ERRORS.get(status, (
        "ClientClosedRequest", "client", "the client ended the request before it was answered"))
    return Decision.deny(Stage.PROXY, status, code, f"{message} ({error[:200]})", check=check)


# A request head (request line and header fields) longer than this is never buffered further:
# mitmproxy bounds neither (its own note: "protect against header size DoS"), so a client could
# send header bytes without end. Above the limits of `size_refusal`, which judges a whole head.
MAX_HEAD = LIMITS.target + LIMITS.headers_total + 8 * 1024
HEAD_TOO_LARGE = f"the request head is longer than {MAX_HEAD} bytes; it was not read further"

PROTOCOL_ERRORS = {
    # status: (code, check, message). mitmproxy's own text is never shown: it can name an internal
    # address ("Cannot connect to 10.0.0.7:443") or echo the client's bytes.
    400: ("BadRequest", "framing",
          "the request could not be read as HTTP (malformed request line, headers or body framing); "
          "it was not forwarded"),
    413: ("RequestEntityTooLarge", "body_size",
          "the request body is larger than the gateway accepts; it was not forwarded"),
    431: ("RequestHeaderFieldsTooLarge", "size",
          f"the request head is longer than the gateway reads ({MAX_HEAD} bytes); it was not forwarded"),
    502: ("BadGateway", "upstream",
          "the upstream could not be reached or did not answer properly; the gateway's audit trail "
          "holds the details"),
}


def protocol_error_body(status: int) -> bytes:
    """A Graph-shaped JSON error for an answer that mitmproxy writes (no flow, no request id)."""
    code, check, message = PROTOCOL_ERRORS.get(status, (
        "ProxyError", "protocol", f"the gateway could not complete the request ({status})"))
    body = {"error": {"code": code, "message": message, "innerError": {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "nhi-gateway": {"stage": str(Stage.PROXY), "rule": None, "check": check, "operation": None},
    }}}
    return json.dumps(body).encode()
