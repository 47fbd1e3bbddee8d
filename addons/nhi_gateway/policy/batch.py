"""JSON batching (``POST /{version}/$batch``): every inner request is judged, masked and recorded
as if it had been sent alone.

A gateway that judged only the outer ``POST /$batch`` could be walked around: one allowed batch
would carry any operation inside it. So the outer request needs no rule of its own. Its decision
is made from the inner ones:

- each inner request becomes the :class:`~nhi_gateway.policy.operation.Operation` it would be if sent
  alone (its ``url`` resolved against the batch's version: ``/v1.0/$batch`` + ``users/x`` is
  ``/v1.0/users/x``) and is decided by the policy for the caller of the outer request;
- the batch is allowed when every inner request is allowed, and refused whole otherwise (403,
  naming each refused inner id with its rule and reason); nothing of a refused batch is sent;
- a batch the gateway cannot read unambiguously is refused whole with 400 (413 when too large,
  415 for an encoding or media type it does not read): not JSON, duplicate members, anything but
  ``{"requests": [...]}`` with 1 to :data:`MAX_REQUESTS` requests, members other than ``id``,
  ``method``, ``url``, ``headers``, ``body`` and ``dependsOn``, ids that are missing, not strings
  or repeated (ids are case-insensitive, as Graph compares them), methods other than
  :data:`BATCH_METHODS`, absolute urls (``https://...``, ``//host/...``), urls that name a version
  (Graph resolves inner urls against the batch's version; ``/v1.0/users`` inside ``/v1.0/$batch``
  is refused rather than guessed at), urls that climb out of the version, nested batches, urls the
  operation normaliser refuses, headers that would change who the inner request runs as
  (``Authorization``, ``Proxy-Authorization``, ``Cookie``, ``Host``), bodies without a
  ``Content-Type``, JSON bodies that are not objects or arrays, other bodies that are not
  strings (Graph's base64 form), and ``dependsOn`` naming unknown ids, itself, or forming a cycle.

The outer decision carries the inner decisions in ``extra["batch"]``: one entry per inner request
(see :func:`entry`), in request order. The same list is kept in ``flow.metadata[BATCH_KEY]``, where
it survives a later stage replacing the decision (a masking or recording refusal), so that the
audit trail and the recording always show every inner request of a batch that reached Graph.

Responses (``{"responses": [{"id", "status", "headers", "body"}]}``, in any order) are masked by
:func:`mask_batch_response`: each inner ``body`` by the mask profile of *its own* inner decision,
looked up by id case-insensitively, exactly as it would be masked alone (fields, paths rooted at
the inner body, detectors, text and binary bodies). See that function for what is refused (502).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from nhi_gateway.policy.admission import method_override
from nhi_gateway.policy.decision import Action, Decision, Stage, refusal_body
from nhi_gateway.masking.masks import (
    MaskingError,
    MaskProfile,
    as_profile,
    combine,
    dump_json,
    is_json_content_type,
    mask_body,
    mask_document,
    mask_headers,
    mask_property_document,
    property_of,
)
from nhi_gateway.policy.operation import GRAPH_VERSIONS, Operation, OperationError, normalize_method
from nhi_gateway.identity.principal import Principal

MAX_REQUESTS = 20  # Graph's own limit
MAX_BATCH_BYTES = 4 * 1024 * 1024  # Graph refuses request bodies over 4 MB
MAX_ID_LENGTH = 256
BATCH_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
# An inner request runs as the caller of the outer one: nothing inside may name another identity.
FORBIDDEN_INNER_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "host"})
REQUEST_MEMBERS = ("id", "method", "url", "headers", "body", "dependson")

BATCH_KEY = "nhi.batch_inner"  # flow.metadata: list of entries (see entry()), kept through refusals
INNER_KEY = "nhi.batch"  # flow.metadata of a recorded inner flow: {flow_id, id, index, sent}
CHECK = "batch"  # Decision.check of every batch refusal
REFUSAL_CODE = "Authorization_RequestDenied"

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_NAMESPACE = uuid.UUID("7d3b0f0e-3c51-4f0e-9d1b-6a4cbb1c2a10")  # inner flow ids: uuid5(outer/index)


class BatchError(ValueError):
    """The batch as a whole cannot be read: it is refused whole, before any inner request is judged."""

    def __init__(self, message: str, status: int = 400, code: str = "BadRequest") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Decider(Protocol):
    def decide(self, principal: Principal | None, op: Operation) -> Decision: ...


# --- recognising the batch endpoint -------------------------------------------------------------


def is_batch_endpoint(op: Operation) -> bool:
    """``/v1.0/$batch`` or ``/beta/$batch`` on a Graph host, any method (any spelling:
    ``/V1.0/%24BATCH/`` is the same endpoint once normalised)."""
    return op.is_graph and op.version in GRAPH_VERSIONS and op.segments == ("$batch",)


def names_batch(op: Operation) -> bool:
    """A ``$batch`` segment anywhere in a Graph path: the batch endpoint or a spelling of it that the
    gateway does not recognise as one (``/v1.0/users/$batch``, ``/$batch`` without a version)."""
    return op.is_graph and "$batch" in op.segments


# --- reading a batch request --------------------------------------------------------------------


def decode_body(raw: bytes, content_encoding: str = "", limit: int = MAX_BATCH_BYTES) -> bytes:
    """The request body as Graph would read it, never inflated beyond ``limit`` bytes.

    mitmproxy's own decoder has no output limit, so a small gzip bomb would be inflated in full;
    this one stops at ``limit``. ``gzip`` and ``deflate`` are read (Graph SDKs gzip request
    bodies); other encodings are refused (415) rather than passed unjudged.
    """
    if len(raw) > limit:
        raise BatchError(f"the batch body is {len(raw)} bytes; at most {limit} are accepted",
                         413, "RequestEntityTooLarge")
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return raw
    if encoding in ("gzip", "x-gzip"):
        attempts = [16 + zlib.MAX_WBITS]
    elif encoding == "deflate":
        attempts = [zlib.MAX_WBITS, -zlib.MAX_WBITS]  # zlib-wrapped, or raw as some clients send it
    else:
        raise BatchError(f"Content-Encoding {content_encoding!r} is not accepted on $batch requests; "
                         "send the batch uncompressed, gzip or deflate", 415, "UnsupportedMediaType")
    last: Exception | None = None
    for wbits in attempts:
        try:
            d = zlib.decompressobj(wbits)
            out = d.decompress(raw, limit + 1)
        except zlib.error as e:
            last = e
            continue
        if len(out) > limit:
            raise BatchError(f"the batch body inflates to more than {limit} bytes", 413, "RequestEntityTooLarge")
        if not d.eof or d.unused_data:
            raise BatchError(f"the {encoding} batch body is truncated or has trailing data; it was not read")
        return out
    raise BatchError(f"the batch body cannot be decoded as {encoding} ({last}); it was not read")


def _refuse_constant(name: str) -> object:
    raise BatchError(f"the batch is not valid JSON: {name} is not a JSON value")


# Python's int() refuses to read more digits than this (sys.get_int_max_str_digits()).
MAX_INT_DIGITS = 4300


class NumberOutOfRange(ValueError):
    """A JSON number that Python cannot hold: a float beyond its range (1e400 reads as infinity,
    which cannot be written back as JSON), or an integer of more digits than int() reads."""


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise NumberOutOfRange(f"the number {text[:40]} is out of range (it would read as infinity)")
    return value


def _held_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise NumberOutOfRange(f"a number of {len(text.lstrip('-'))} digits is more than {MAX_INT_DIGITS} digits")
    return int(text)


def json_numbers_problem(data: bytes) -> str | None:
    """Why a JSON body holds a number the gateway could not hold (so it could neither judge nor
    record it as it is), or None; a body that is not JSON is none of this check's business."""
    if data.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        json.loads(data, parse_float=_finite_float, parse_int=_held_int)
    except NumberOutOfRange as e:
        return str(e)
    except (ValueError, RecursionError):
        return None
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    # JSON parsers disagree on which copy of a repeated member wins: Graph could read the copy the
    # gateway did not judge. Legitimate clients never repeat a member.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise BatchError(f"the batch repeats the member {key!r} in one object")
        out[key] = value
    return out


def parse_json(data: bytes) -> object:
    """Strict UTF-8 JSON: no NaN/Infinity, no repeated members."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BatchError(f"the batch is not UTF-8 ({e.reason} at byte {e.start})") from e
    text = text.removeprefix("\ufeff")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant,
                          parse_float=_finite_float, parse_int=_held_int)
    except BatchError:
        raise
    except NumberOutOfRange as e:
        # Graph would act on it, but the gateway could neither judge nor record it as it is.
        raise BatchError(f"the batch holds a number the gateway cannot hold: {e}") from e
    except RecursionError as e:
        raise BatchError("the batch is nested too deeply to read") from e
    except ValueError as e:
        raise BatchError(f"the batch is not valid JSON: {e}") from e


def _members(obj: dict, allowed: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Members by case-folded name (ASP.NET binds them case-insensitively), and what is wrong."""
    allowed = set(allowed)
    out: dict[str, Any] = {}
    problems = []
    for key, value in obj.items():
        folded = key.casefold()
        if folded not in allowed:
            problems.append(f"unknown member {key!r}")
        elif folded in out:
            problems.append(f"member {key!r} is given twice (names are case-insensitive)")
        else:
            out[folded] = value
    return out, problems


@dataclass(frozen=True)
class InnerRequest:
    """One request of a batch. ``problems`` non-empty: it cannot be judged, the batch is refused."""

    index: int
    id: str  # as sent; "" when missing or not a string
    method: str  # upper-case; as sent when it is not a valid method
    url: str  # as sent; "" when missing or not a string
    target: str  # the request target it would have alone ("/v1.0/users/x?$select=id"), best effort
    headers: tuple[tuple[str, str], ...] = ()
    body: object = None
    has_body: bool = False
    depends_on: tuple[str, ...] = ()
    operation: Operation | None = None
    problems: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.id.casefold()

    @property
    def label(self) -> str:
        return f"id {self.id!r}" if self.id else f"request #{self.index + 1}"


@dataclass(frozen=True)
class Batch:
    version: str  # the outer request's version: "v1.0" or "beta"
    host: str
    port: int
    requests: tuple[InnerRequest, ...]

    def find(self, request_id: str) -> InnerRequest | None:
        key = request_id.casefold()
        return next((r for r in self.requests if r.id and r.key == key), None)


def parse_batch(data: bytes, outer: Operation, content_type: str = "application/json") -> Batch:
    """Read a decoded batch body. Raises :class:`BatchError` when the batch as a whole cannot be
    read; problems of single inner requests are kept on them (``InnerRequest.problems``)."""
    if not is_batch_endpoint(outer):
        raise BatchError(f"{outer} is not the batch endpoint")
    _check_content_type(content_type)
    if len(data) > MAX_BATCH_BYTES:
        raise BatchError(f"the batch body is {len(data)} bytes; at most {MAX_BATCH_BYTES} are accepted",
                         413, "RequestEntityTooLarge")
    doc = parse_json(data)
    if not isinstance(doc, dict):
        raise BatchError('the batch must be a JSON object: {"requests": [...]}')
    members, problems = _members(doc, ("requests",))
    if problems:
        raise BatchError(f"the batch object may hold only 'requests': {'; '.join(problems)}")
    items = members.get("requests")
    if not isinstance(items, list):
        raise BatchError("the batch has no 'requests' list")
    if not items:
        raise BatchError("the batch has no requests")
    if len(items) > MAX_REQUESTS:
        raise BatchError(f"the batch has {len(items)} requests; Graph accepts at most {MAX_REQUESTS}")
    requests = [_read_request(i, item, outer) for i, item in enumerate(items)]
    requests = _check_ids_and_dependencies(requests)
    return Batch(outer.version, outer.host, outer.port, tuple(requests))


def _check_content_type(content_type: str) -> None:
    if not is_json_content_type(content_type):
        raise BatchError(f"a batch must be sent as application/json, not {content_type or 'no Content-Type'!r}",
                         415, "UnsupportedMediaType")
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise BatchError(f"a batch must be UTF-8, not {value.strip()!r}", 415, "UnsupportedMediaType")


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _read_request(index: int, item: object, outer: Operation) -> InnerRequest:
    if not isinstance(item, dict):
        return InnerRequest(index, "", "", "", "", problems=("is not a JSON object",))
    members, problems = _members(item, REQUEST_MEMBERS)

    raw_id = members.get("id")
    if raw_id is None:
        problems.append("has no 'id'")
    elif not isinstance(raw_id, str):
        problems.append("'id' is not a string")
    elif not raw_id or len(raw_id) > MAX_ID_LENGTH or not raw_id.isprintable():
        problems.append(f"'id' must be 1 to {MAX_ID_LENGTH} printable characters")

    raw_method = members.get("method")
    method = ""
    if raw_method is None:
        problems.append("has no 'method'")
    elif not isinstance(raw_method, str):
        problems.append("'method' is not a string")
    else:
        try:
            method = normalize_method(raw_method)
        except OperationError:
            method = raw_method[:40]
            problems.append(f"invalid method {raw_method[:40]!r}")
        else:
            if method not in BATCH_METHODS:
                problems.append(f"method {method} is not accepted in a batch (only {', '.join(sorted(BATCH_METHODS))})")

    raw_url = members.get("url")
    url = _text(raw_url)
    operation = None
    target = _best_effort_target(outer.version, url)
    if raw_url is None:
        problems.append("has no 'url'")
    elif not isinstance(raw_url, str):
        problems.append("'url' is not a string")
    elif method in BATCH_METHODS:
        try:
            operation, target = resolve_url(url, outer, method)
        except BatchError as e:
            problems.append(str(e))

    headers, header_problems = _read_headers(members.get("headers"))
    problems += header_problems
    has_body = members.get("body") is not None
    if has_body:
        problems += _body_problems(members["body"], headers)
    if (override := _method_override(url, headers, members.get("body"))) is not None:
        # Judged as its 'method' alone, so one asking for another is refused (policy/admission.py).
        problems.append(f"{override} asks for another method than {method or 'its own'}; "
                        "inner requests may not override their method")
    depends_on = members.get("dependson")
    deps: tuple[str, ...] = ()
    if depends_on is not None:
        if not isinstance(depends_on, list) or not all(isinstance(d, str) for d in depends_on):
            problems.append("'dependsOn' must be a list of request ids")
        else:
            deps = tuple(depends_on)
    return InnerRequest(
        index=index, id=_text(raw_id), method=method, url=url, target=target, headers=headers,
        body=members.get("body"), has_body=has_body, depends_on=deps, operation=operation,
        problems=tuple(problems),
    )


def resolve_url(url: str, outer: Operation, method: str) -> tuple[Operation, str]:
    """The operation an inner ``url`` performs, resolved against the batch's version, and its
    request target. Raises :class:`BatchError` saying why it cannot be judged."""
    if not url:
        raise BatchError("'url' is empty")
    if url != url.strip() or not url.isprintable():
        raise BatchError("'url' has surrounding whitespace or control characters")
    if url.startswith("//") or _SCHEME.match(url):
        raise BatchError(f"absolute url {url[:80]!r}: inner urls are relative to the batch, "
                         f"like 'users/x' or '/users/x'")
    target = f"/{outer.version}" + (url if url.startswith("/") else "/" + url)
    try:
        op = Operation.from_request(method, "https", outer.host, outer.port, target)
    except OperationError as e:
        raise BatchError(f"url {url[:80]!r} cannot be judged safely: {e}") from e
    if op.segments and op.segments[0] in GRAPH_VERSIONS:
        raise BatchError(f"url {url[:80]!r} names a version; inner urls are relative to the batch's "
                         f"/{outer.version} (write 'users/x', not '/v1.0/users/x')")
    if op.version != outer.version:
        raise BatchError(f"url {url[:80]!r} climbs out of the batch's /{outer.version}")
    if "$batch" in op.segments:
        raise BatchError("nested batch: an inner request may not be a $batch")
    return op, target


def _best_effort_target(version: str, url: str) -> str:
    # For the record of a request that cannot be judged: printable, and always a path.
    safe = "".join(c if c.isprintable() and c not in " \\" else "%{:02X}".format(ord(c) & 0xFF) for c in url[:2000])
    return f"/{version}/" + safe.lstrip("/")


def _read_headers(raw: object) -> tuple[tuple[tuple[str, str], ...], list[str]]:
    if raw is None:
        return (), []
    if not isinstance(raw, dict):
        return (), ["'headers' is not a JSON object"]
    headers = []
    problems = []
    seen: set[str] = set()
    for name, value in raw.items():
        if not _HEADER_NAME.fullmatch(name):
            problems.append(f"invalid header name {name[:40]!r}")
            continue
        if not isinstance(value, str) or not value.isprintable():
            problems.append(f"header {name!r} must have a printable string value")
            continue
        folded = name.lower()
        if folded in FORBIDDEN_INNER_HEADERS:
            problems.append(f"header {name!r} is not accepted inside a batch: every inner request "
                            "runs as the caller of the outer request")
            continue
        if folded in seen:
            problems.append(f"header {name!r} is given twice")
            continue
        seen.add(folded)
        headers.append((name, value))
    return tuple(headers), problems


def header(headers: Iterable[tuple[str, str]] | Mapping[str, object], name: str) -> str:
    items = headers.items() if isinstance(headers, Mapping) else headers
    name = name.lower()
    return next((v for k, v in items if isinstance(k, str) and k.lower() == name and isinstance(v, str)), "")


def _method_override(url: str, headers: tuple[tuple[str, str], ...], body: object) -> str | None:
    content_type = header(headers, "content-type")
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
    elif isinstance(body, str):
        try:  # Graph's form for bodies that are not JSON
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            data = body.encode("utf-8", "replace")
    else:
        data = b""
    return method_override(headers, url.partition("?")[2], data, content_type)


def _body_problems(body: object, headers: tuple[tuple[str, str], ...]) -> list[str]:
    content_type = header(headers, "content-type")
    if not content_type:
        return ["has a 'body' but no Content-Type header (Graph requires one)"]
    if is_json_content_type(content_type):
        if not isinstance(body, (dict, list)):
            return [f"a {content_type} body must be a JSON object or array"]
        return []
    if not isinstance(body, str):
        return [f"a {content_type} body must be a string (base64), as Graph expects"]
    return []


def _check_ids_and_dependencies(requests: list[InnerRequest]) -> list[InnerRequest]:
    extra: dict[int, list[str]] = {r.index: [] for r in requests}
    by_key: dict[str, list[InnerRequest]] = {}
    for r in requests:
        if r.id:
            by_key.setdefault(r.key, []).append(r)
    for key, same in by_key.items():
        if len(same) > 1:
            for r in same:
                extra[r.index].append(f"id {r.id!r} is used by {len(same)} requests (ids are case-insensitive)")
    edges: dict[str, set[str]] = {}
    for r in requests:
        for dep in r.depends_on:
            if dep.casefold() == r.key and r.id:
                extra[r.index].append(f"dependsOn names the request itself ({dep!r})")
            elif dep.casefold() not in by_key:
                extra[r.index].append(f"dependsOn names {dep!r}, which is not a request of this batch")
            elif r.id:
                edges.setdefault(r.key, set()).add(dep.casefold())
    for cycle in _cycles(edges):
        names = " -> ".join(by_key[k][0].id for k in cycle)
        for key in set(cycle):
            for r in by_key[key]:
                extra[r.index].append(f"dependsOn forms a cycle ({names})")
    return [
        r if not extra[r.index] else _with_problems(r, extra[r.index])
        for r in requests
    ]


def _with_problems(r: InnerRequest, more: list[str]) -> InnerRequest:
    return replace(r, problems=r.problems + tuple(dict.fromkeys(more)))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle of the dependency graph once (as a closed path), iteratively."""
    WHITE, GREY, BLACK = 0, 1, 2
    color: dict[str, int] = {}
    found: list[list[str]] = []
    for start in sorted(edges):
        if color.get(start, WHITE) != WHITE:
            continue
        path = [start]
        stack = [iter(sorted(edges.get(start, ())))]
        color[start] = GREY
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                color[path.pop()] = BLACK
                stack.pop()
                continue
            state = color.get(nxt, WHITE)
            if state == GREY:
                found.append(path[path.index(nxt):] + [nxt])
            elif state == WHITE:
                color[nxt] = GREY
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return found


# --- deciding -----------------------------------------------------------------------------------


def entry(r: InnerRequest, d: Decision) -> dict:
    """What the outer decision (``extra["batch"]``) and ``flow.metadata[BATCH_KEY]`` keep of one
    inner request. tnetstring-safe. The masking step adds ``sent``, ``response_status`` and
    ``masked_fields`` once Graph has answered."""
    out = {
        "index": r.index,
        "id": r.id,
        "method": r.method,
        "url": r.url,
        "target": r.target,
        "operation": d.operation,
        "decision": str(d.action),
        "rule": d.rule_id,
        "stage": str(d.stage),
        "reason": d.reason,
        "check": d.check,
        "status": d.status,
        "code": d.code,
        "mask_profile": d.mask_profile,
        "sent": False,
    }
    if d.reported:  # report mode: forwarded, but a rule would have refused or held it
        out["report"] = dict(d.reported)
    return out


def _unreadable(r: InnerRequest) -> Decision:
    return Decision.deny(
        Stage.POLICY, 400, "BadRequest",
        f"batch {r.label}: {'; '.join(r.problems)}",
        check=CHECK,
        operation=str(r.operation) if r.operation else f"{r.method or '?'} {r.target}",
    )


def decide_batch(policy: Decider, principal: Principal | None, outer: Operation, batch: Batch) -> Decision:
    """Each inner request decided as if sent alone; the outer decision follows from them."""
    who = principal.to_dict() if principal is not None else None
    judged: list[tuple[InnerRequest, Decision]] = []
    unreadable: list[InnerRequest] = []
    refused: list[tuple[InnerRequest, Decision]] = []
    for r in batch.requests:
        if r.problems or r.operation is None:
            d = _unreadable(r).but(principal=who)
            unreadable.append(r)
        else:
            d = policy.decide(principal, r.operation)
            if not d.allowed:
                refused.append((r, d))
        judged.append((r, d))
    entries = [entry(r, d) for r, d in judged]
    nothing_sent = "the batch was refused whole and nothing of it was sent"
    if unreadable:
        parts = "; ".join(f"{r.label}: {'; '.join(r.problems)}" for r in unreadable)
        return Decision.deny(Stage.POLICY, 400, "BadRequest", f"{nothing_sent}: {parts}", check=CHECK,
                             operation=str(outer), principal=who, extra={"batch": entries})
    if refused:
        parts = "; ".join(f"{r.label} ({d.operation}): {_refusal_reason(d)}" for r, d in refused)
        first = refused[0][1]
        return Decision.deny(
            Stage.POLICY, first.status or 403, first.code or REFUSAL_CODE, f"{nothing_sent}: {parts}",
            check=CHECK, rule_id=first.rule_id, operation=str(outer), principal=who,
            extra={"batch": entries},
        )
    reported = [(r, d) for r, d in judged if d.reported]
    extra: dict = {"batch": entries}
    reason = f"every inner request of the batch ({len(judged)}) is allowed on its own"
    if reported:
        # Report mode: the batch is marked as its inner requests are, and says which would not go.
        r, d = reported[0]
        would = "deny" if any(x.reported.get("would") == "deny" for _, x in reported) else "hold"
        parts = "; ".join(f"{x.label}: would {y.reported.get('would')} ({y.reported.get('reason')})"
                          for x, y in reported)
        extra["report"] = {"would": would, "rule": d.reported.get("rule", ""), "reason": parts}
        reason += f"; {parts} (report mode)"
    return Decision(
        action=Action.ALLOW, stage=Stage.POLICY, reason=reason,
        operation=str(outer), principal=who, extra=extra,
    )


def _refusal_reason(d: Decision) -> str:
    if d.action is not Action.DENY and d.action is not Action.ALLOW:
        # e.g. a rule asking for approval: an approval holds one request, not part of a batch.
        return f"{d.reason} ({d.action}: not available inside a batch; send this request on its own)"
    return d.reason


def judge_batch(policy: Decider, principal: Principal | None, outer: Operation, raw: bytes,
                content_type: str, content_encoding: str = "") -> Decision:
    """Decode, read and decide a batch request; a batch that cannot be read is refused whole.

    What the gateway does for ``POST /{version}/$batch``, and what a replay of a recorded batch
    must do to reach the same decision."""
    try:
        batch = parse_batch(decode_body(raw, content_encoding), outer, content_type)
    except BatchError as e:
        return Decision.deny(
            Stage.POLICY, e.status, e.code, f"the batch was refused whole and nothing of it was sent: {e}",
            check=CHECK, operation=str(outer), principal=principal.to_dict() if principal else None,
            extra={"batch": []},
        )
    return decide_batch(policy, principal, outer, batch)


def batch_refusal_body(decision: Decision, request_id: str) -> bytes:
    """The Graph-style refusal, naming each inner request that was refused and why."""
    body = json.loads(refusal_body(decision, request_id))
    refused = [
        {"id": e.get("id"), "method": e.get("method"), "url": e.get("url"), "decision": e.get("decision"),
         "rule": e.get("rule"), "reason": e.get("reason")}
        for e in decision.extra.get("batch") or ()
        if e.get("decision") != str(Action.ALLOW)
    ]
    body["error"]["innerError"]["nhi-gateway"]["batch"] = refused
    return json.dumps(body).encode()


def inner_decision(outer: Decision | None, e: Mapping) -> Decision:
    """The decision of one inner request, as if it had been sent alone (for its record)."""
    try:
        action = Action(e.get("decision"))
    except ValueError:
        action = Action.DENY
    try:
        stage = Stage(e.get("stage"))
    except ValueError:
        stage = Stage.POLICY
    extra: dict = {}
    if e.get("masked_fields"):
        extra["masked_fields"] = e["masked_fields"]
    if isinstance(e.get("report"), dict):
        extra["report"] = dict(e["report"])
    return Decision(
        action=action, stage=stage, reason=str(e.get("reason") or ""), status=int(e.get("status") or 0),
        code=str(e.get("code") or ""), rule_id=e.get("rule") or None, check=str(e.get("check") or ""),
        operation=str(e.get("operation") or ""), principal=outer.principal if outer else None,
        mask_profile=e.get("mask_profile") or None, extra=extra,
    )


def inner_flow_id(outer_flow_id: str, e: Mapping) -> str:
    """A stable id for the record of one inner request, joinable with its audit line."""
    return str(uuid.uuid5(_NAMESPACE, f"{outer_flow_id}/{e.get('index')}"))


# --- masking the batch response -----------------------------------------------------------------


class BatchResponseError(MaskingError):
    """The batch response cannot be masked safely: it must be withheld (502)."""


def _folded_members(obj: dict, name: str) -> list[str]:
    return [k for k in obj if isinstance(k, str) and k.casefold() == name]


def mask_batch_response(
    data: bytes,
    entries: list[dict],
    profile_of: Callable[[str], MaskProfile | frozenset[str]],
    *,
    collect: dict[str, str] | None = None,
) -> tuple[bytes, list[dict], int]:
    """Mask a ``$batch`` response: each ``responses[].body`` by its own inner request's profile.

    ``profile_of(profile_name)`` gives a :class:`~nhi_gateway.masking.masks.MaskProfile` (or, in the
    older form, the member names to redact) and raises when it no longer exists. The response is
    parsed once, masked in place and serialised once. Returns the body (always re-serialised from
    the parsed document, so no repeated member the parser dropped reaches the client), the
    entries with ``response_status`` and ``masked_fields``, and the number of values masked.

    Withheld (:class:`BatchResponseError`, the caller answers 502): a body that is not JSON, a
    response whose id is not one of the batch's requests or is answered twice, a response that is
    not an object or repeats ``id``/``body`` in another case, and, under a mask profile, a string
    body (Graph's base64 form) that cannot be base64-decoded, that is declared JSON and does not
    parse, that is declared text and does not decode, or that is binary under a profile that
    refuses binary bodies. A decoded string body that parses as a JSON document is masked as JSON
    whatever its declared type. Members next to ``responses`` (and an answer without
    ``responses``, such as Graph's error for the whole batch) are masked with every profile of
    the batch together. Each inner ``headers`` object is masked like an answer's headers
    (:func:`~nhi_gateway.masking.masks.mask_headers`): detectors, and the values masked in its body.
    ``collect`` receives every value masked, for the outer answer's headers.
    """
    if collect is None:
        collect = {}
    try:
        doc = json.loads(data, parse_constant=_refuse_json_constant)
    except MaskingError:
        raise
    except RecursionError as e:
        raise BatchResponseError("the batch response is nested too deeply") from e
    except ValueError as e:
        raise BatchResponseError(f"the batch response is not valid JSON: {e}") from e
    by_key = {str(e.get("id") or "").casefold(): dict(e) for e in entries if e.get("id")}
    names = sorted({e.get("mask_profile") for e in entries if e.get("mask_profile")})
    every = combine([as_profile(profile_of(n)) for n in names], "batch") if names else None
    if not isinstance(doc, dict):
        count = mask_document(doc, every, collect=collect)[1] if every is not None else 0
        return _dump(doc), list(by_key.values()), count
    keys = _folded_members(doc, "responses")
    if len(keys) > 1:
        raise BatchResponseError("the batch response has 'responses' more than once")
    count = 0
    if every is not None:
        for key in list(doc):
            if keys and key == keys[0]:
                continue
            # One member at a time, as a document of its own, so that the inner responses are
            # masked by their own profiles only.
            count += _mask_member(doc, key, every, collect)
    if keys:
        items = doc[keys[0]]
        if not isinstance(items, list):
            raise BatchResponseError("the batch response's 'responses' is not a list")
        answered: set[str] = set()
        for item in items:
            count += _mask_item(item, by_key, answered, profile_of, collect)
    return _dump(doc), [by_key.get(str(e.get("id") or "").casefold(), dict(e)) for e in entries], count


def _mask_member(doc: dict, key: str, profile: MaskProfile, collect: dict[str, str] | None = None) -> int:
    """One member of ``doc`` masked as if it were the only one (by name, paths, detectors)."""
    wrapper = {key: doc[key]}
    _, n = mask_document(wrapper, profile, collect=collect)
    doc[key] = wrapper[key]
    return n


def _refuse_json_constant(name: str) -> object:
    raise BatchResponseError(f"the batch response is not valid JSON: {name} is not a JSON value")


def _dump(doc: object) -> bytes:
    try:
        return dump_json(doc)
    except MaskingError as e:
        raise BatchResponseError(f"the batch response is not valid JSON: {e}") from e


def _mask_item(item: object, by_key: dict[str, dict], answered: set[str],
               profile_of: Callable[[str], MaskProfile | frozenset[str]], collect: dict[str, str]) -> int:
    if not isinstance(item, dict):
        raise BatchResponseError("an item of 'responses' is not a JSON object")
    id_keys = _folded_members(item, "id")
    body_keys = _folded_members(item, "body")
    if len(id_keys) != 1 or len(body_keys) > 1:
        raise BatchResponseError("an item of 'responses' has no 'id', or 'id' or 'body' more than once")
    response_id = item[id_keys[0]]
    if not isinstance(response_id, str):
        raise BatchResponseError("an item of 'responses' has an 'id' that is not a string")
    key = response_id.casefold()
    e = by_key.get(key)
    if e is None:
        raise BatchResponseError(f"the batch response answers id {response_id[:80]!r}, which was not requested")
    if key in answered:
        raise BatchResponseError(f"the batch response answers id {response_id[:80]!r} more than once")
    answered.add(key)
    profile = as_profile(profile_of(e["mask_profile"])) if e.get("mask_profile") else None
    count = 0
    if profile is not None:
        mine: dict[str, str] = {}
        for name in list(item):
            folded = name.casefold()
            if folded in ("id", "status", "headers"):
                continue
            if folded == "body":
                path = str(e.get("operation") or "").split(" ", 2)[-1] or None
                item[name], n = _mask_body(item[name], item, profile, response_id, mine, path)
            else:
                n = _mask_member(item, name, profile, mine)
            count += n
        for name in _folded_members(item, "headers"):
            count += _mask_inner_headers(item, name, profile, mine, response_id)
        collect.update(mine)
    status = next((item[k] for k in _folded_members(item, "status")), 0)
    e["response_status"] = status if isinstance(status, int) and not isinstance(status, bool) else 0
    e["masked_fields"] = count
    return count


def _mask_inner_headers(item: dict, name: str, profile: MaskProfile, masked: dict[str, str], response_id: str) -> int:
    headers = item[name]
    if not isinstance(headers, dict):
        raise BatchResponseError(f"the headers of response {response_id[:80]!r} are not a JSON object")
    if any(not isinstance(v, str) for v in headers.values()):
        raise BatchResponseError(f"the headers of response {response_id[:80]!r} hold a value that is not a string")
    try:
        out, n = mask_headers(list(headers.items()), profile, masked)
    except MaskingError as e:
        raise BatchResponseError(f"the headers of response {response_id[:80]!r} could not be masked ({e})") from e
    if n:
        item[name] = dict(out)
    return n


def _mask_body(body: object, item: dict, profile: MaskProfile, response_id: str,
               collect: dict[str, str] | None = None, path: str | None = None) -> tuple[object, int]:
    if isinstance(body, (dict, list)):
        asked = property_of(path) if path else None
        style = profile.property_style(asked[0]) if asked else None
        if style is not None:  # a property path: masked by the property's name
            return mask_property_document(body, profile, style, collect)
        return mask_document(body, profile, collect=collect)
    if not isinstance(body, str):
        return body, 0  # a number, boolean or null holds no field
    headers = next((item[k] for k in _folded_members(item, "headers")), None)
    content_type = header(headers, "content-type") if isinstance(headers, dict) else ""
    decoded, urlsafe = _b64decode(body)
    where = f"the body of response {response_id[:80]!r}"
    if decoded is None:
        raise BatchResponseError(f"{where} is a string that is not base64, so it cannot be checked for masked fields")
    try:
        # By what the body is, not by its label (JSON in text/plain is masked as JSON).
        masked, count = mask_body(decoded, content_type, profile, collect=collect, path=path)
    except MaskingError as e:
        raise BatchResponseError(f"{where} could not be masked ({e})") from e
    if masked is decoded:
        return body, 0  # unchanged: as Graph sent it, padding and alphabet included
    encoded = base64.urlsafe_b64encode(masked) if urlsafe else base64.b64encode(masked)
    return encoded.decode("ascii"), count


def _b64decode(text: str) -> tuple[bytes | None, bool]:
    """Standard or URL-safe base64 (Graph documents "base64 URL-encoded"), padded or not."""
    compact = text.strip()
    urlsafe = "-" in compact or "_" in compact
    padded = compact + "=" * (-len(compact) % 4)
    try:
        if urlsafe:
            return base64.b64decode(padded, altchars=b"-_", validate=True), True
        return base64.b64decode(padded, validate=True), False
    except (binascii.Error, ValueError):
        return None, urlsafe


# --- reading an exchange back, for the record ---------------------------------------------------


@dataclass(frozen=True)
class InnerPart:
    headers: tuple[tuple[str, str], ...]
    content: bytes


@dataclass(frozen=True)
class InnerResponse(InnerPart):
    status: int


def _content_of(body: object, headers: Iterable[tuple[str, str]]) -> bytes:
    if body is None:
        return b""
    if isinstance(body, str) and not is_json_content_type(header(headers, "content-type")):
        decoded, _ = _b64decode(body)
        return decoded if decoded is not None else body.encode("utf-8", "surrogatepass")
    try:
        return _dump(body)
    except MaskingError:
        # For the record only (it never raises): a number beyond a float's range is written as
        # JSON's readers would print it rather than the record of what reached Graph being lost.
        return json.dumps(body, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _str_headers(raw: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        return ()
    return tuple((k, v) for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)
                 and _HEADER_NAME.fullmatch(k) and v.isprintable())


def inner_requests_of(data: bytes | None) -> dict[str, InnerPart]:
    """Headers and body of each inner request by case-folded id, from a batch body that was
    already judged (for the record: never raises, returns what it can read)."""
    try:
        doc = json.loads(data or b"")
        items = next((v for k, v in doc.items() if k.casefold() == "requests"), [])
    except (ValueError, AttributeError, RecursionError):
        return {}
    out: dict[str, InnerPart] = {}
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        members = {k.casefold(): v for k, v in item.items()}
        rid = members.get("id")
        if isinstance(rid, str):
            headers = _str_headers(members.get("headers"))
            out.setdefault(rid.casefold(), InnerPart(headers, _content_of(members.get("body"), headers)))
    return out


def inner_responses_of(data: bytes | None) -> dict[str, InnerResponse]:
    """Status, headers and body of each inner response by case-folded id, from the (masked) batch
    response the client got; for the record: never raises."""
    try:
        doc = json.loads(data or b"")
        items = next((v for k, v in doc.items() if k.casefold() == "responses"), [])
    except (ValueError, AttributeError, RecursionError):
        return {}
    out: dict[str, InnerResponse] = {}
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        members = {k.casefold(): v for k, v in item.items()}
        rid, status = members.get("id"), members.get("status")
        if not isinstance(rid, str) or not isinstance(status, int) or not 100 <= status <= 999:
            continue
        headers = _str_headers(members.get("headers"))
        out.setdefault(rid.casefold(), InnerResponse(headers, _content_of(members.get("body"), headers), status))
    return out
