"""The last addon of the chain: nothing passes without an explicit allow.

Earlier stages can be skipped (an exception, a reload, a hook mitmproxy does not call for some
protocol path); the guard checks the outcome, not the route taken to it.
"""

from __future__ import annotations

import logging

from mitmproxy import http, tcp, websocket  # noqa: F401  (hook signatures)

from nhi_gateway.policy.admission import PROTOCOL_ERROR_KEY, answered_status, proxy_refusal
from nhi_gateway.policy.decision import Decision, Stage
from nhi_gateway.addons.failclosed import decision_of, fail_closed, refuse, set_decision
from nhi_gateway.addons.identity import CONNECT_KEY

logger = logging.getLogger(__name__)


class Health:
    """Conditions under which the gateway must refuse everything (e.g. the recording is broken)."""

    def __init__(self) -> None:
        self.problems: dict[str, str] = {}

    def fail(self, component: str, reason: str) -> None:
        if component not in self.problems:
            logger.critical("%s is failing: %s. All new requests are refused until it recovers.",
                            component, reason)
        self.problems[component] = reason

    def recover(self, component: str) -> None:
        if self.problems.pop(component, None) is not None:
            logger.warning("%s recovered; requests are judged again", component)


def _guard_refusal(reason: str, status: int = 403, check: str = "guard") -> Decision:
    return Decision.deny(Stage.GUARD, status, "Authorization_RequestDenied", reason, check=check)


def upgrade_of(request: http.Request) -> str | None:
    """The protocol a request asks to switch to (``Upgrade: websocket``), if any."""
    value = request.headers.get("Upgrade")
    if value is None:
        return None
    return value.strip() or "(empty)"


class Guard:
    def __init__(self, health: Health) -> None:
        self.health = health

    def _unhealthy(self) -> Decision | None:
        if not self.health.problems:
            return None
        parts = "; ".join(f"{k}: {v}" for k, v in self.health.problems.items())
        return Decision.deny(Stage.GUARD, 503, "ServiceUnavailable",
                             f"the gateway cannot keep its records ({parts}); requests are refused",
                             check="health")

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        if (d := self._unhealthy()) is not None:
            refuse(flow, d)
        elif flow.metadata.get(CONNECT_KEY) != "admitted":
            refuse(flow, _guard_refusal("the tunnel was not admitted by the identity stage"))

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.stream:
            # A streamed request body is sent before the request hook can judge the request.
            flow.kill()

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        decision = decision_of(flow)
        if (d := self._unhealthy()) is not None:
            refuse(flow, d)
        elif decision is None or not decision.allowed:
            refuse(flow, _guard_refusal("no explicit allow decision was made for this request"))
        elif (protocol := upgrade_of(flow.request)) is not None:
            # After a 101 the connection carries WebSocket (or other) messages that no rule judges,
            # masks or records: refused here, before the upstream sees the handshake.
            logger.warning("flow %s: upgrade to %s refused", flow.id, protocol[:40])
            refuse(flow, _guard_refusal(
                f"the gateway does not switch protocols (Upgrade: {protocol[:40]}): WebSocket and other "
                "upgraded connections cannot be judged per operation, so no rule can allow them",
                check="upgrade"))

    @fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.stream:
            # A streamed body goes straight to the client and the response hook (masking) sees
            # nothing: refuse rather than pass it unmasked.
            logger.error("flow %s: response streaming is not allowed; killing the flow", flow.id)
            flow.kill()

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        decision = decision_of(flow)
        if decision is None or (not decision.allowed and not flow.metadata.get("nhi.refused")):
            refuse(flow, _guard_refusal("a response arrived for a request that was never allowed"))
        elif flow.response is not None and flow.response.status_code == 101:
            # Only an upgrade request may be answered 101, and those are refused in `request`.
            refuse(flow, _guard_refusal("the upstream switched protocols (101), which the gateway "
                                        "does not relay", status=502, check="upgrade"))

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        if decision_of(flow) is not None or flow.error is None:
            return
        # mitmproxy ended the flow before any request hook judged it (a head or body it could not
        # read, a body over the limit, the client going away): say so, with the status the client
        # saw, instead of leaving the record without a decision.
        status = answered_status(flow.error.msg, flow.metadata.get(PROTOCOL_ERROR_KEY), judged=False)
        set_decision(flow, proxy_refusal(status, flow.error.msg))

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        # Non-HTTP payloads inside CONNECT skip the request hook entirely: never relay them.
        logger.warning("raw TCP inside a tunnel from %s refused", flow.client_conn.peername)
        flow.kill()

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        logger.warning("flow %s: WebSocket refused", flow.id)
        flow.kill()
