"""Upstream timeout: an upstream that stops answering gets the client a 502, not a long hang.

mitmproxy has no upstream response timeout. A request sent to a server that accepts the
connection and never answers waits until the client connection has been idle for ``tcp_timeout``
(600 s); then the client connection is closed without any answer. Here each request that goes
upstream is given ``seconds`` to be answered (connection, TLS, headers and body); past that, the
upstream connection is cancelled, exactly as mitmproxy cancels a connection it cannot write to.
mitmproxy then answers the client 502 and runs the ``error`` hook, so the flow is audited and
recorded with the flag ``upstream_timeout``.

mitmproxy offers no public way to end one request's wait, so this reaches into the proxyserver's
connection handlers (``connections``, ``transports``: mitmproxy 12). An HTTP/2 upstream
connection carries other requests too: they end with it, 502 as well.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx, http

from nhi_gateway.addons.failclosed import decision_of, fail_closed, set_decision

logger = logging.getLogger(__name__)

DEFAULT_UPSTREAM_TIMEOUT = 120.0  # seconds; Graph answers a well-formed request far sooner
FLAG = "upstream_timeout"


class UpstreamTimeout:
    def __init__(self, seconds: float = DEFAULT_UPSTREAM_TIMEOUT) -> None:
        self.seconds = seconds
        self._timers: dict[str, asyncio.TimerHandle] = {}

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        # After every deciding stage: only a flow that is about to go upstream is timed.
        if flow.response is not None or flow.error is not None:
            return
        loop = asyncio.get_running_loop()
        self._timers[flow.id] = loop.call_later(self.seconds, self._expire, flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._stop(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._stop(flow)

    def done(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _stop(self, flow: http.HTTPFlow) -> None:
        timer = self._timers.pop(flow.id, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, flow: http.HTTPFlow) -> None:
        if self._timers.pop(flow.id, None) is None:
            return
        try:
            logger.error("flow %s: %s did not answer within %gs; the request is abandoned (502)",
                         flow.id, flow.request.host, self.seconds)
            decision = decision_of(flow)
            if decision is not None:
                flags = [*decision.extra.get("flags", ()), FLAG]
                set_decision(flow, decision.but(extra={**decision.extra, "flags": flags}))
            cancel_upstream(flow, f"no answer within {self.seconds:g}s")
        except Exception as e:  # noqa: BLE001 - a timer callback has nobody to raise to
            logger.error("flow %s: ending the upstream wait failed: %r", flow.id, e, exc_info=e)


def cancel_upstream(flow: http.HTTPFlow, why: str) -> None:
    """Cancel the task that serves ``flow``'s upstream connection; mitmproxy then answers the
    client 502 and runs the ``error`` hook. The flow names its connection once it is open; until
    then (connecting, TLS handshake) it is one of the client's upstream connections still being
    set up. When none can be found, the client connection is closed instead: nobody waits on."""
    handler = ctx.master.addons.get("proxyserver").connections.get(flow.client_conn.id)
    if handler is None:
        return  # the client connection is gone already: nobody is waiting
    transports = handler.transports

    def running(io) -> bool:
        return io is not None and io.handler is not None and not io.handler.done()

    if running(io := transports.get(flow.server_conn)):
        targets = [io.handler]
    else:
        targets = [io.handler for conn, io in transports.items()
                   if conn is not handler.client and running(io)
                   and getattr(conn, "timestamp_tls_setup", None) is None]
    if not targets and running(io := transports.get(handler.client)):
        targets = [io.handler]
    for task in targets:
        task.cancel(why)
