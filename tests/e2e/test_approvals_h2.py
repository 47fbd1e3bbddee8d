"""A held request whose HTTP/2 stream the client resets is cancelled, as a disconnect cancels it:
the connection stays open (other streams go on), so no ``client_disconnected`` says so, and
without the cancellation the request stayed pending and could still be approved, with a grant."""

from __future__ import annotations

import time

import h2.config
import h2.connection
import h2.errors

from .test_approvals import (  # noqa: F401  (fixtures)
    GRAPH,
    WAIT,
    adele,
    api,
    audit_of,
    authority,
    gateway,
    held_flow,
    marker,
    reached_graph,
    workload,
)
from .test_protocol_edges import tunnel


def test_an_http2_stream_reset_while_held_cancels_the_request(gateway, lookalike, workload, api):
    mark = marker()
    app_id = lookalike.app("mcp-directory")["application_object_id"]
    tls = tunnel(gateway, alpn=["h2"])
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    body = b'{"passwordCredential": {}}'
    conn.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", GRAPH.removeprefix("https://")),
                          (":path", f"/v1.0/applications/{app_id}/addPassword?m={mark}"),
                          ("authorization", f"Bearer {workload()}"), ("content-type", "application/json"),
                          ("content-length", str(len(body)))])
    conn.send_data(1, body, end_stream=True)
    tls.sendall(conn.data_to_send())
    try:
        [held] = api.wait_for(mark)
        conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        tls.sendall(conn.data_to_send())
        [cancelled] = api.wait_for(mark, state="cancelled")
        assert cancelled["id"] == held["id"] and "reset the request's stream" in cancelled["reason"]
        assert api.approve(cancelled["id"], **{"for": "1h"}).status_code == 409  # nothing left to approve
    finally:
        tls.close()
    assert not reached_graph(lookalike, mark)
    deadline = time.monotonic() + WAIT
    while not [x for x in audit_of(gateway, held_flow(gateway, cancelled["id"])) if not x.get("event")]:
        assert time.monotonic() < deadline, "the cancelled flow was never audited"
        time.sleep(0.05)
    [final] = [x for x in audit_of(gateway, held_flow(gateway, cancelled["id"])) if not x.get("event")]
    assert final["decision"] == "deny" and "cancelled" in final["reason"]
