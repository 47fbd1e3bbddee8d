"""Edges of holding a request for approval, through the real gateway: a held request whose
HTTP/2 stream the client resets is cancelled, as a disconnect cancels it (the connection stays
open, so no ``client_disconnected`` says so; without the cancellation the request stayed pending
and could still be approved, with a grant); an approval whose decision cannot be stored leaves
no grant behind."""

from __future__ import annotations

import sqlite3

import h2.config
import h2.connection
import h2.errors
import pytest

from ..support.approvals import audited_outcome, hold, policy_file
from ..support.e2e import GRAPH, marker, reached_graph, use_proxy
from ..support.wire import tunnel
from .conftest import gateway_running


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, lookalike):
    workdir = tmp_path_factory.mktemp("approvals-edges")
    with gateway_running(workdir, lookalike, policy=policy_file(workdir, lookalike)) as gw:
        yield gw


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
    final = audited_outcome(gateway, cancelled["id"])
    assert final["decision"] == "deny" and "cancelled" in final["reason"]


def test_an_approval_that_cannot_be_stored_leaves_no_grant(gateway, lookalike, workload, api, monkeypatch):
    """The database refuses the approval's update (as a failing disk would) after the grant could
    have been written: the approver is told (503), no grant exists, the request stays held."""
    use_proxy(monkeypatch, gateway)
    mark, call, held = hold(lookalike, api, workload())
    db = sqlite3.connect(gateway.recordings / "approvals.sqlite3", isolation_level=None)
    db.execute("CREATE TRIGGER broken BEFORE UPDATE ON approvals BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
    try:
        r = api.approve(held["id"], **{"for": "1h", "reason": "window"})
        assert r.status_code == 503, r.text
    finally:
        db.execute("DROP TRIGGER broken")
        db.close()
    assert [g for g in api.grants("all") if g.get("approval_id") == held["id"]] == []
    assert [a["state"] for a in api.approvals("all") if a["id"] == held["id"]] == ["pending"]
    assert not call.done and not reached_graph(lookalike, mark)
    assert api.deny(held["id"], "not now").status_code == 200
    assert call.result().status_code == 403
    assert not reached_graph(lookalike, mark)
