"""Admission: refuse requests of a shape the gateway will not judge, before identity and rules.

The checks themselves (sizes, transfer codings, method overrides) are plain functions in
:mod:`nhi_gateway.policy.admission`; this addon reads the flow, asks them, and refuses (the
refusal is audited and recorded like any other, and nothing is forwarded).
"""

from __future__ import annotations

import logging

from mitmproxy import http

from nhi_gateway.addons.failclosed import fail_closed, refuse
from nhi_gateway.policy.admission import (
    METHOD_OVERRIDE_HEADERS,
    Refusal,
    method_override,
    method_override_refusal,
    size_refusal,
    transfer_encoding_refusal,
)
from nhi_gateway.policy.batch import BatchError, decode_body

logger = logging.getLogger(__name__)

READABLE_MEDIA = ("application/x-www-form-urlencoded", "application/json")
BODY_LIMIT = 32 * 2**20  # as mitmproxy's body_size_limit: inflating never goes further
OVERRIDE_HEADER_NAMES = frozenset(n.encode() for n in METHOD_OVERRIDE_HEADERS)


def _target(request: http.Request) -> bytes:
    # As sent: the authority of an absolute-form target (or of a CONNECT) plus path and query.
    return request.data.authority + request.data.path


def _operation(request: http.Request) -> str:
    return f"{request.method[:20]} {request.host[:100]} {request.path[:200]}"


def _body_as_read(raw: bytes, media: str, encoding: str) -> bytes | Refusal:
    """The body as the upstream reads it, for bodies that can carry parameters; inflated within
    :data:`BODY_LIMIT` (never mitmproxy's unbounded decoder: nobody is verified yet)."""
    if not raw or not (media in READABLE_MEDIA or media.endswith("+json")):
        return raw
    try:
        return decode_body(raw, encoding, limit=BODY_LIMIT)
    except BatchError as e:
        return Refusal(e.status, e.code, "method_override",
                       f"the {media} body cannot be read to check it for a method override "
                       f"({str(e).replace('batch ', '')}); the request was not forwarded")


def admission_refusal(request: http.Request) -> Refusal | None:
    fields = request.headers.fields
    refusal = size_refusal(_target(request), fields)
    if refusal is not None or request.method == "CONNECT":
        return refusal
    # One pass over the header fields (this runs for every request).
    transfer, content_encoding, content_type, overrides = [], [], "", []
    for name, value in fields:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            transfer.append(value.decode("latin-1"))
        elif lowered == b"content-encoding":
            content_encoding.append(value.decode("latin-1"))
        elif lowered == b"content-type":
            content_type = content_type or value.decode("latin-1")
        elif lowered.strip() in OVERRIDE_HEADER_NAMES:
            overrides.append((name.decode("latin-1"), ""))
    refusal = transfer_encoding_refusal(transfer)
    if refusal is not None:
        return refusal
    media = content_type.split(";", 1)[0].strip().lower()
    body = _body_as_read(request.raw_content or b"", media, ",".join(content_encoding))
    if isinstance(body, Refusal):
        return body
    found = method_override(overrides, request.data.path.partition(b"?")[2], body, content_type)
    return None if found is None else method_override_refusal(request.method, found)


class Admission:
    def _judge(self, flow: http.HTTPFlow) -> None:
        refusal = admission_refusal(flow.request)
        if refusal is not None:
            logger.info("flow %s: refused before identity (%s): %s", flow.id, refusal.check, refusal.message)
            refuse(flow, refusal.decision(_operation(flow.request)))

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        self._judge(flow)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        self._judge(flow)
