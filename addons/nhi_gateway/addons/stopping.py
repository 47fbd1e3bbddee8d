"""Stopping: SIGTERM drains the gateway instead of cutting requests off mid-way.

Once the gateway is told to stop, every new request (a keep-alive connection can still send one)
is refused with 503 naming the stop, so a client retries elsewhere; requests already judged and on
their way to Graph finish; held approval requests are answered 503 by the approval stage. The
requests in flight are counted from their ``requestheaders`` to the moment the last stage (the
recorder) has dealt with their answer, so the gateway exits only once every flow it answered is
audited and handed to the recording process.
"""

from __future__ import annotations

from mitmproxy import http

from nhi_gateway.addons.failclosed import fail_closed, refuse
from nhi_gateway.policy.decision import Decision, Stage

DEFAULT_DRAIN_TIMEOUT = 30.0  # seconds; Kubernetes' default grace period is 30 s too


class Stopping:
    """First of the chain: refuses new requests while the gateway stops."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.in_flight: set[str] = set()
        self.settled = Settled(self.in_flight)  # added last of the chain

    def begin(self, reason: str) -> None:
        self.reason = reason

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.in_flight.add(flow.id)
        if flow.response or self.reason is None:
            return
        refuse(flow, Decision.deny(
            Stage.GUARD, 503, "ServiceUnavailable",
            f"{self.reason}: new requests are refused; retry against another instance", check="stopping"))


class Settled:
    """Last of the chain: a flow has left the gateway once every stage saw its answer or error."""

    def __init__(self, in_flight: set[str]) -> None:
        self.in_flight = in_flight

    def response(self, flow: http.HTTPFlow) -> None:
        self.in_flight.discard(flow.id)

    def error(self, flow: http.HTTPFlow) -> None:
        self.in_flight.discard(flow.id)
