"""The answers mitmproxy writes itself, made the gateway's.

mitmproxy answers some requests without any addon being asked: a request head or body it cannot
read (400), a body over ``body_size_limit`` (413), an upstream it cannot reach or that fails
(502). Out of the box that answer is an HTML page holding mitmproxy's message, which can name the
address the upstream resolved to ("Cannot connect to 10.0.0.7:443") and echo the client's bytes;
and the flow reaches the ``error`` hook with only that message, so the audit trail could not say
which status the client saw. Here (mitmproxy 12, as :func:`nhi_gateway.proxy.gateway.
answer_lost_connection_attempts` does for another gap):

- every such answer is Graph-shaped JSON (:func:`nhi_gateway.policy.admission.protocol_error_body`),
  over HTTP/1 and HTTP/2, naming no address;
- the status the client is answered with is written into the flow (``PROTOCOL_ERROR_KEY``) before
  its ``error`` hook runs, so the audit line and the recording carry it;
- a request head mitmproxy cannot parse at all (HTTP/1, or HTTP/2 pseudo-headers it refuses; no
  flow would ever exist) becomes a flow that holds the first bytes of its request line and reaches
  the ``error`` hook: audited and recorded like every other refusal;
- a client that resets a request's stream while a hook of its flow still runs (a request held
  for approval) is reported to the gateway (:func:`tell_when_clients_leave_a_held_request`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import h2.events
from mitmproxy import http, version
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import _http1, _http2, _http_h2
from mitmproxy.proxy.layers.http._events import (
    ErrorCode,
    RequestHeaders,
    RequestProtocolError,
    ResponseProtocolError,
)

from nhi_gateway.policy.admission import (
    HEAD_TOO_LARGE,
    MAX_HEAD,
    PROTOCOL_ERROR_KEY,
    UNREADABLE_HOST,
    UNREADABLE_METHOD,
    protocol_error_body,
)

logger = logging.getLogger(__name__)

_PATCHED = "nhi_graph_shaped"
_SERVER = version.MITMPROXY.encode()


def _make_error_response(status_code: int, message: str = "") -> bytes:
    resp = http.Response.make(status_code, protocol_error_body(status_code), http.Headers(
        Connection="close", Content_Type="application/json", Cache_Control="no-store"))
    return http1.assemble_response(resp)


def _format_error(status_code: int, message: str) -> bytes:
    return protocol_error_body(status_code)


def _graph_shaped_h2_headers(original):
    def send_headers(self, stream_id, headers, *args, **kwargs):
        # The only headers mitmproxy writes itself with its Server name are its error answers.
        if isinstance(headers, list) and (b"server", _SERVER) in headers:
            headers = [(k, b"application/json") if k == b"content-type" else (k, v)
                       for k, v in headers if k != b"server"]
        return original(self, stream_id, headers, *args, **kwargs)

    return send_headers


def _noting_the_status(original):
    def handle_protocol_error(self, event):
        status = 431 if event.message == HEAD_TOO_LARGE else event.code.http_status_code() or 0
        if isinstance(event, ResponseProtocolError) and event.code is ErrorCode.KILL:
            status = 0
        flow = getattr(self, "flow", None)
        if flow is not None:
            flow.metadata[PROTOCOL_ERROR_KEY] = {
                "from": "client" if isinstance(event, RequestProtocolError) else "upstream",
                "code": event.code.name.lower(), "status": status}
        return (yield from original(self, event))

    return handle_protocol_error


def _unreadable_request(context, first_line: bytes) -> http.Request:
    """A flow's request for a head mitmproxy refused without one: the request line as far as it
    goes (never parsed further), the tunnel's host, or a reserved name that no policy can name."""
    address = context.server.address
    return http.Request(
        host=address[0] if address else UNREADABLE_HOST, port=address[1] if address else 0,
        method=UNREADABLE_METHOD, scheme=b"https" if context.client.tls else b"http", authority=b"",
        path=b"/" + first_line[:200].strip(), http_version=b"HTTP/1.1", headers=http.Headers(),
        content=b"", trailers=None, timestamp_start=time.time(), timestamp_end=None)


def _refusal_events(stream_id: int, request: http.Request, why: str = "the request head could not be parsed"):
    yield http_layer.ReceiveHttp(RequestHeaders(stream_id, request, False))
    yield http_layer.ReceiveHttp(RequestProtocolError(stream_id, why, ErrorCode.GENERIC_CLIENT_ERROR))


def _reading_unparseable_heads(original):
    def read_headers(self, event):
        head = bytes(self.buf)
        yield from original(self, event)
        if not isinstance(event, events.DataReceived):
            return
        if self.request is None and self.state == self.done:
            # mitmproxy answered 400 and closed without a flow: make one, so that the refusal is
            # audited and recorded.
            yield from _refusal_events(self.stream_id, _unreadable_request(self.context, head.split(b"\n", 1)[0]))
        elif self.state == self.read_headers and len(self.buf) > MAX_HEAD:
            # Still no end of the head: answer 431 and stop reading, instead of buffering on.
            line = bytes(self.buf)[:512].split(b"\n", 1)[0]
            yield commands.SendData(self.conn, _make_error_response(431))
            yield commands.CloseConnection(self.conn)
            self.state = self.done
            yield from _refusal_events(self.stream_id, _unreadable_request(self.context, line), HEAD_TOO_LARGE)

    return read_headers


def _reading_unparseable_h2_heads(original):
    def handle_h2_event(self, event):
        unreadable = None
        if isinstance(event, h2.events.RequestReceived):
            try:
                _http2.parse_h2_request_headers(event.headers)
            except ValueError:
                pseudo = dict((bytes(k), bytes(v)) for k, v in event.headers if bytes(k).startswith(b":"))
                unreadable = b" ".join(pseudo.get(k, b"") for k in (b":method", b":authority", b":path"))
        result = yield from original(self, event)
        if unreadable is not None:
            # mitmproxy ended the connection (GOAWAY) without a flow: make one, as for HTTP/1.
            yield from _refusal_events(event.stream_id, _unreadable_request(self.context, unreadable))
        return result

    return handle_h2_event


def answer_protocol_errors_as_graph() -> None:
    if getattr(_http1.make_error_response, _PATCHED, False):
        return
    _make_error_response.nhi_graph_shaped = True
    _http1.make_error_response = _make_error_response
    _http2.format_error = _format_error
    h2 = _http_h2.BufferedH2Connection
    h2.send_headers = _graph_shaped_h2_headers(h2.send_headers)
    stream = http_layer.HttpStream
    stream.handle_protocol_error = _noting_the_status(stream.handle_protocol_error)
    server = _http1.Http1Server
    server.read_headers = _reading_unparseable_heads(server.read_headers)
    h2_server = _http2.Http2Server
    h2_server.handle_h2_event = _reading_unparseable_h2_heads(h2_server.handle_h2_event)


def tell_when_clients_leave_a_held_request(on_gone: Callable[[http.HTTPFlow, str], None]) -> None:
    """Call ``on_gone(flow, why)`` when the client cancels a request (an HTTP/2 RST_STREAM, or any
    protocol error on the client's side) while one of the flow's hooks is still running.

    mitmproxy queues the events of a stream while a hook of its flow runs (an approval may hold
    one for minutes) and looks at them only once the hook returns; for a whole connection it says
    so (``client_disconnected``), for one HTTP/2 stream it says nothing. A held request whose
    client has gone must not stay pending: approving it would issue a grant for nobody's request.
    """
    stream = http_layer.HttpStream
    original = getattr(stream.handle_event, "nhi_original", stream.handle_event)

    def handle_event(self, event):
        if self._paused is not None and isinstance(event, RequestProtocolError):
            flow = getattr(self, "flow", None)
            if flow is not None:
                why = ("the client reset the request's stream while it was held" if event.code is ErrorCode.CANCEL
                       else "the client disconnected while the request was held")
                try:
                    on_gone(flow, why)
                except Exception as e:  # noqa: BLE001 - the held hook then ends by its timeout
                    logger.error("flow %s: cancelling its held work failed: %r", flow.id, e, exc_info=e)
        return (yield from original(self, event))

    handle_event.nhi_original = original
    stream.handle_event = handle_event
