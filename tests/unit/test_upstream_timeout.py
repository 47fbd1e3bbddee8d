"""An upstream that hangs, or a connection attempt mitmproxy loses, ends in an answer.

The proxy itself is stood in for by the few attributes the code reads (the proxyserver's
connections, a handler's transports): the end-to-end behaviour, a 502 the client gets and the
flow audited and recorded, is shown with the real gateway in tests/e2e/test_faults.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from mitmproxy import connection
from mitmproxy.proxy import commands, events
from mitmproxy.proxy import server as proxy_server
from mitmproxy.proxy.server import ConnectionIO
from mitmproxy.test import tflow

from nhi_gateway.addons import upstream_timeout
from nhi_gateway.policy.decision import decision_of, set_decision
from nhi_gateway.addons.upstream_timeout import FLAG, UpstreamTimeout, cancel_upstream
from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.proxy.gateway import answer_lost_connection_attempts


async def forever():
    await asyncio.Event().wait()


def running_task() -> asyncio.Task:
    return asyncio.ensure_future(forever())


def proxy_with(monkeypatch, flow, transports: dict) -> SimpleNamespace:
    handler = SimpleNamespace(client=flow.client_conn, transports=transports)
    proxyserver = SimpleNamespace(connections={flow.client_conn.id: handler})
    monkeypatch.setattr(upstream_timeout, "ctx", SimpleNamespace(
        master=SimpleNamespace(addons=SimpleNamespace(get=lambda name: proxyserver))))
    return handler


def server(tls_setup: float | None = None) -> connection.Server:
    s = connection.Server(address=("graph.microsoft.com", 443))
    s.timestamp_tls_setup = tls_setup
    return s


async def settle(*tasks):
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_flow_s_own_upstream_connection_is_cancelled(monkeypatch):
    f = tflow.tflow()
    mine, other, client = running_task(), running_task(), running_task()
    proxy_with(monkeypatch, f, {f.client_conn: ConnectionIO(handler=client),
                                f.server_conn: ConnectionIO(handler=mine),
                                server(): ConnectionIO(handler=other)})
    cancel_upstream(f, "no answer")
    await settle(mine)
    assert mine.cancelled() and not other.cancelled() and not client.cancelled()
    for t in (other, client):
        t.cancel()


async def test_a_connection_still_being_set_up_is_cancelled(monkeypatch):
    # Until the connection is open (connecting, TLS handshake) the flow names another object.
    f = tflow.tflow()
    opening, established, client = running_task(), running_task(), running_task()
    proxy_with(monkeypatch, f, {f.client_conn: ConnectionIO(handler=client),
                                server(): ConnectionIO(handler=opening),
                                server(tls_setup=1.0): ConnectionIO(handler=established)})
    cancel_upstream(f, "no answer")
    await settle(opening)
    assert opening.cancelled() and not established.cancelled() and not client.cancelled()
    for t in (established, client):
        t.cancel()


async def test_without_an_upstream_connection_the_client_connection_is_closed(monkeypatch):
    f = tflow.tflow()
    client, crashed = running_task(), running_task()
    crashed.cancel()
    await settle(crashed)
    proxy_with(monkeypatch, f, {f.client_conn: ConnectionIO(handler=client),
                                f.server_conn: ConnectionIO(handler=crashed)})
    cancel_upstream(f, "no answer")
    await settle(client)
    assert client.cancelled()


async def test_a_request_that_goes_upstream_is_timed_and_flagged(monkeypatch):
    cancelled = []
    monkeypatch.setattr(upstream_timeout, "cancel_upstream", lambda flow, why: cancelled.append((flow.id, why)))
    addon = UpstreamTimeout(0.01)
    f = tflow.tflow()
    set_decision(f, Decision(action=Action.ALLOW, stage=Stage.POLICY, reason="allowed", rule_id="r"))
    addon.request(f)
    await asyncio.sleep(0.1)
    assert cancelled == [(f.id, "no answer within 0.01s")]
    assert FLAG in decision_of(f).extra["flags"]


@pytest.mark.parametrize("end", ["response", "error"])
async def test_an_answered_request_is_not_timed_out(monkeypatch, end):
    cancelled = []
    monkeypatch.setattr(upstream_timeout, "cancel_upstream", lambda flow, why: cancelled.append(flow.id))
    addon = UpstreamTimeout(0.05)
    f = tflow.tflow()
    addon.request(f)
    getattr(addon, end)(f)
    await asyncio.sleep(0.1)
    assert cancelled == []


async def test_a_refused_request_is_not_timed(monkeypatch):
    addon = UpstreamTimeout(0.01)
    f = tflow.tflow(resp=True)  # answered by the gateway: it never goes upstream
    addon.request(f)
    assert not addon._timers


async def test_a_connection_reset_before_getpeername_is_answered(monkeypatch):
    """mitmproxy 12.3's open_connection asserts ``peername`` after connecting; a reset in between
    kills the task without answering the layer. The gateway answers it as a failed connection."""
    conn = connection.Server(address=("graph.microsoft.com", 443))

    async def loses_the_attempt(self, command):
        command.connection.state = connection.ConnectionState.OPEN
        self.transports[command.connection] = ConnectionIO(handler=None, reader=None,
                                                           writer=SimpleNamespace(close=lambda: None))
        assert command.connection.peername  # mitmproxy's own check, failing

    monkeypatch.setattr(proxy_server.ConnectionHandler, "open_connection", loses_the_attempt)
    answer_lost_connection_attempts()
    answer_lost_connection_attempts()  # idempotent: one wrapper, not two
    sent = []

    async def server_event(event):
        sent.append(event)

    handler = SimpleNamespace(transports={}, server_event=server_event)
    command = commands.OpenConnection(conn)
    await proxy_server.ConnectionHandler.open_connection(handler, command)
    assert len(sent) == 1 and isinstance(sent[0], events.OpenConnectionCompleted)
    assert sent[0].command is command and "reset" in sent[0].reply
    assert conn.state is connection.ConnectionState.CLOSED and conn not in handler.transports


async def test_other_assertions_are_not_swallowed(monkeypatch):
    async def broken(self, command):
        command.connection.peername = ("127.0.0.1", 443)
        raise AssertionError("something else")

    monkeypatch.setattr(proxy_server.ConnectionHandler, "open_connection", broken)
    answer_lost_connection_attempts()
    handler = SimpleNamespace(transports={}, server_event=None)
    with pytest.raises(AssertionError, match="something else"):
        await proxy_server.ConnectionHandler.open_connection(
            handler, commands.OpenConnection(connection.Server(address=("graph.microsoft.com", 443))))
