"""The recorder addon: a redacted, annotated copy of every flow, readable by mitmproxy's tools and
searchable with its filters."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from mitmproxy import certs, flowfilter, http
from mitmproxy import io as mio
from mitmproxy.test import taddons, tflow

from nhi_gateway.policy.decision import set_decision
from nhi_gateway.addons.guard import Health
from nhi_gateway.recording.flows import APPROVED_MARK, REFUSED_MARK, flow_comment
from nhi_gateway.addons.recorder import RECORDED_KEY, Recorder
from nhi_gateway.policy.decision import Action, Decision, Stage

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
OID = "0b1c2d3e-0000-4000-8000-000000000042"
APP_ID = "5e0b1683-de22-5eac-9334-fb85a741f6ff"
PRINCIPAL = {"tenant_id": TENANT, "object_id": OID, "app_id": APP_ID, "display_name": "mcp-directory",
             "roles": ["User.Read.All"]}
JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL2dyYXBoIn0.c2lnbmF0dXJl"
OPERATION = "GET graph.microsoft.com /v1.0/users"

ALLOWED = Decision(Action.ALLOW, Stage.POLICY, "allowed by rule 'directory-read'", rule_id="directory-read",
                   operation=OPERATION, principal=PRINCIPAL)
DENIED = Decision.deny(Stage.POLICY, 403, "Authorization_RequestDenied", "denied by rule 'no-user-deletes'",
                       rule_id="no-user-deletes", operation="DELETE graph.microsoft.com /v1.0/users/{id}",
                       principal=PRINCIPAL)
BAD_TOKEN = Decision.deny(Stage.IDENTITY, 401, "InvalidAuthenticationToken", "the token's signature is invalid",
                          check="signature", operation=OPERATION)
APPROVED = Decision(Action.ALLOW, Stage.POLICY, "approved", rule_id="user-writes-need-approval",
                    operation="PATCH graph.microsoft.com /v1.0/users/{id}", principal=PRINCIPAL,
                    extra={"approval": {"id": "apr-1", "approver": "alice@contoso.example"},
                           "approver": "alice@contoso.example"})
APPROVAL_REFUSED = APPROVED.but(action=Action.DENY, status=403, reason="the approver refused")


def flow_with(decision: Decision | None, **headers) -> http.HTTPFlow:
    f = tflow.tflow(resp=True)
    f.request.headers.update(headers)
    if decision is not None:
        set_decision(f, decision)
    return f


@pytest.fixture
def recorder(tmp_path):
    r = Recorder(tmp_path / "recordings", Health())
    yield r
    r.done()


def read_back(path: Path) -> list[http.HTTPFlow]:
    with open(path, "rb") as fh:
        return list(mio.FlowReader(fh).stream())


# --- annotations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decision", "mark", "in_comment"),
    [
        (ALLOWED, "", ["ALLOW", "mcp-directory", OID, OPERATION, "rule directory-read"]),
        (DENIED, REFUSED_MARK, ["DENY", "mcp-directory", "DELETE graph.microsoft.com /v1.0/users/{id}",
                                "rule no-user-deletes", "denied by rule 'no-user-deletes'"]),
        (BAD_TOKEN, REFUSED_MARK, ["DENY", "anonymous", "identity check signature", "signature is invalid"]),
        (APPROVED, APPROVED_MARK, ["ALLOW", "rule user-writes-need-approval", "approver alice@contoso.example"]),
        (APPROVAL_REFUSED, REFUSED_MARK, ["DENY", "approver alice@contoso.example", "the approver refused"]),
        (None, REFUSED_MARK, ["DENY", "no decision was recorded"]),
    ],
    ids=["allowed", "denied", "bad-token", "approved", "approval-refused", "no-decision"],
)
def test_each_recorded_flow_says_who_what_verdict_rule_and_approver(recorder, decision, mark, in_comment):
    path = recorder.write(flow_with(decision))
    (flow,) = read_back(path)
    for text in in_comment:
        assert text in flow.comment
    assert flow.comment.startswith("DENY" if mark == REFUSED_MARK else "ALLOW")
    assert flow.marked == mark


def test_approver_may_come_only_inside_the_approval():
    d = APPROVED.but(extra={"approval": {"approver": "bob@contoso.example"}})
    assert "approver bob@contoso.example" in flow_comment(d)


def test_an_error_after_the_decision_is_in_the_comment(recorder):
    f = flow_with(ALLOWED)
    f.error = tflow.terr("Connection killed.")
    (flow,) = read_back(recorder.write(f))
    assert "error: Connection killed." in flow.comment


def test_structured_decision_is_in_metadata(recorder):
    (flow,) = read_back(recorder.write(flow_with(APPROVED)))
    assert Decision.from_dict(flow.metadata["nhi"]) == APPROVED
    assert flow.metadata["nhi.decision"] == "allow"
    assert flow.metadata["nhi.rule"] == "user-writes-need-approval"
    assert flow.metadata["nhi.object_id"] == OID
    assert flow.metadata["nhi.approver"] == "alice@contoso.example"


def test_the_mark_shows_as_an_emoji_in_mitmweb():
    from mitmproxy.utils import emoji

    assert emoji.emoji[REFUSED_MARK] == "⛔"
    assert emoji.emoji[APPROVED_MARK] == "✅"


@pytest.mark.parametrize(
    ("expression", "matching"),
    [
        ('~meta "nhi.rule: no-user-deletes"', ["denied"]),
        ('~meta "^nhi.decision: deny$"', ["denied", "bad-token"]),
        ('~meta "^nhi.decision: allow$"', ["allowed", "approved"]),
        (f'~meta "nhi.object_id: {OID}"', ["allowed", "denied", "approved"]),
        ('~meta "nhi.principal: mcp-directory"', ["allowed", "denied", "approved"]),
        ('~meta "nhi.approver: alice@"', ["approved"]),
        ('~meta "nhi.check: signature"', ["bad-token"]),
        # The nested structured decision is searchable too, as mitmproxy prints it.
        ("~meta \"'rule': 'directory-read'\"", ["allowed"]),
        ("~marked", ["denied", "bad-token", "approved"]),
        ("~marker :white_check_mark:", ["approved"]),
        ('~meta "nhi.decision: deny" & ~meta "nhi.principal: mcp-directory"', ["denied"]),
    ],
)
def test_recorded_flows_are_searchable_with_mitmproxy_filters(recorder, expression, matching):
    flows = {"allowed": ALLOWED, "denied": DENIED, "bad-token": BAD_TOKEN, "approved": APPROVED}
    ids = {}
    for name, decision in flows.items():
        f = flow_with(decision)
        ids[f.id] = name
        recorder.write(f)
    recorded = [f for p in sorted(recorder.directory.rglob("*.mitm")) for f in read_back(p)]
    assert len(recorded) == 4
    match = flowfilter.parse(expression)
    assert sorted(ids[f.id] for f in recorded if match(f)) == sorted(matching)


# --- what is written -----------------------------------------------------------------------------


def test_credentials_are_redacted_on_disk_and_the_live_flow_is_untouched(recorder):
    live = flow_with(DENIED.but(reason=f"refused; the caller sent {JWT}"), Authorization=f"Bearer {JWT}")
    path = recorder.write(live)
    assert JWT.encode() not in path.read_bytes()
    (flow,) = read_back(path)
    assert flow.request.headers["Authorization"] == "Bearer [redacted]"
    assert "[redacted]" in flow.comment
    assert live.request.headers["Authorization"] == f"Bearer {JWT}"
    assert live.comment == "" and not live.marked
    assert flow.id == live.id  # audit lines and recorded flows join on the flow id


def test_the_undo_backup_is_never_written(recorder):
    live = flow_with(ALLOWED, Authorization=f"Bearer {JWT}")
    live.backup()  # what mitmproxy's replay and edit commands do: the backup keeps the token
    live.request.headers["Authorization"] = "Bearer edited"
    path = recorder.write(live)
    assert JWT.encode() not in path.read_bytes()
    (flow,) = read_back(path)
    assert flow._backup is None
    assert live._backup is not None


def test_flows_sharing_a_connection_are_each_written_whole_in_one_write(recorder, monkeypatch):
    from nhi_gateway.recording import files as recordings

    key, ca = certs.create_ca("nhi-gateway tests", "test CA", 2048)
    chain = [certs.dummy_cert(key, ca, "graph.microsoft.com", []), certs.Cert(ca)]
    first = flow_with(ALLOWED, Authorization=f"Bearer {JWT}")
    first.server_conn.certificate_list = chain
    first.server_conn.timestamp_end = None  # open
    flows = [first]
    for _ in range(2):  # keep-alive: the next requests on the same connections
        f = flow_with(ALLOWED, Authorization=f"Bearer {JWT}")
        f.client_conn, f.server_conn = first.client_conn, first.server_conn
        flows.append(f)
    writes = []
    real_write = recordings.os.write
    monkeypatch.setattr(recordings.os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))

    for f in flows[:2]:
        path = recorder.write(f)
    first.server_conn.timestamp_end = first.server_conn.timestamp_start + 1  # the server closed it
    path = recorder.write(flows[2])

    assert len(writes) == 3
    back = read_back(path)
    assert [f.id for f in back] == [f.id for f in flows]
    assert all(f.server_conn.certificate_list == chain for f in back)
    assert all(f.server_conn.id == first.server_conn.id for f in back)
    assert [f.server_conn.timestamp_end for f in back] == [None, None, first.server_conn.timestamp_end]
    assert all(f.request.headers["Authorization"] == "Bearer [redacted]" for f in back)
    assert all(f.request.headers["Authorization"] == f"Bearer {JWT}" for f in flows)


def test_flows_go_to_their_apps_file_of_the_day(recorder):
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    assert recorder.write(flow_with(ALLOWED)) == \
        recorder.directory / day / TENANT / f"mcp-directory--{OID}.mitm"
    assert recorder.write(flow_with(BAD_TOKEN)) == recorder.directory / day / "anonymous.mitm"


def test_hourly_rotation(tmp_path):
    r = Recorder(tmp_path, Health(), hourly=True)
    now = datetime.now(UTC)
    path = r.write(flow_with(ALLOWED))
    r.done()
    assert path.name in {f"mcp-directory--{OID}.{h:%H}h.mitm" for h in (now, datetime.now(UTC))}


def test_size_rotation_through_the_recorder(tmp_path):
    r = Recorder(tmp_path, Health(), max_bytes=1)
    names = [r.write(flow_with(ALLOWED)).name for _ in range(3)]
    r.done()
    assert names == [f"mcp-directory--{OID}.mitm", f"mcp-directory--{OID}.1.mitm", f"mcp-directory--{OID}.2.mitm"]


async def test_every_flow_is_recorded_once_through_the_hooks(tmp_path):
    r = Recorder(tmp_path, Health())
    with taddons.context(r):
        f = flow_with(DENIED)
        await r.response(f)
        await r.error(f)  # a later error of the same flow is not a second record
        assert f.metadata[RECORDED_KEY] is True
        g = flow_with(ALLOWED)
        g.response = None
        g.error = tflow.terr("client disconnected")
        await r.error(g)
    r.done()
    recorded = [x for p in tmp_path.rglob("*.mitm") for x in read_back(p)]
    assert sorted(x.id for x in recorded) == sorted([f.id, g.id])


async def test_a_flow_that_cannot_be_recorded_is_refused(tmp_path):
    blocked = tmp_path / "recordings"
    blocked.write_text("a file where the directory should be")
    health = Health()
    refused = []
    r = Recorder(blocked, health, on_refusal=refused.append)
    with taddons.context(r):
        f = flow_with(ALLOWED)
        await r.response(f)
    assert f.response.status_code == 503
    assert refused == [f]
    assert "recording" in health.problems
    assert RECORDED_KEY not in f.metadata


async def test_a_timer_syncs_flows_when_traffic_stops(tmp_path, monkeypatch):
    import asyncio

    from nhi_gateway.recording import files as recordings

    synced = asyncio.Event()
    monkeypatch.setattr(recordings.os, "fsync", lambda fd: synced.set())
    r = Recorder(tmp_path, Health(), fsync_interval=0.05)
    r.write(flow_with(ALLOWED))
    synced.clear()  # creating the file synced its directory
    r.running()
    await asyncio.wait_for(synced.wait(), 30)  # no further write: the timer did it
    r.done()
    assert r._sync_timer is None


# --- a flow that reached Graph is recorded, in part if not in full (issue 18.6) --------------------


def forwarded_batch(inner_body: str) -> http.HTTPFlow:
    import json as _json

    from nhi_gateway.policy.batch import BATCH_KEY

    f = tflow.tflow(resp=True)
    f.request.method, f.request.path = "POST", "/v1.0/$batch"
    f.request.headers["Content-Type"] = "application/json"
    f.request.content = ('{"requests": [{"id": "1", "method": "PATCH", "url": "/users/u1", "headers": '
                         '{"Content-Type": "application/json"}, "body": ' + inner_body + '}]}').encode()
    f.response.headers["Content-Type"] = "application/json"
    f.response.content = _json.dumps({"responses": [{"id": "1", "status": 204}]}).encode()
    entries = [{"index": 0, "id": "1", "method": "PATCH", "url": "/users/u1", "target": "/v1.0/users/u1",
                "operation": "PATCH graph.microsoft.com /v1.0/users/u1", "decision": "allow", "rule": "writes",
                "stage": "policy", "reason": "allowed", "check": "", "status": 0, "code": "", "mask_profile": None,
                "sent": True}]
    f.metadata[BATCH_KEY] = entries
    set_decision(f, ALLOWED.but(extra={"batch": entries}))
    return f


async def test_a_forwarded_batch_is_recorded_whole_even_with_a_number_python_cannot_hold(tmp_path):
    r = Recorder(tmp_path, Health())
    with taddons.context(r):
        f = forwarded_batch('{"n": 1e400}')
        await r.response(f)
    r.done()
    assert f.response.status_code == 200 and f.metadata[RECORDED_KEY] is True
    recorded = [x for p in tmp_path.rglob("*.mitm") for x in read_back(p)]
    inner = [x for x in recorded if x.id != f.id]
    assert len(recorded) == 2 and inner[0].request.path == "/v1.0/users/u1" and inner[0].request.content


async def test_a_flow_that_reached_graph_is_recorded_in_part_when_it_cannot_be_in_full(tmp_path, monkeypatch):
    r = Recorder(tmp_path, Health())
    write = r.write

    def fails_with_bodies(flow, *args, **kwargs):
        if flow.request.raw_content or (flow.response is not None and flow.response.raw_content):
            raise ValueError("cannot encode this body")
        return write(flow, *args, **kwargs)

    monkeypatch.setattr(r, "write", fails_with_bodies)
    with taddons.context(r):
        f = flow_with(ALLOWED)
        f.request.content = b'{"x": 1}'
        await r.response(f)
    r.done()
    assert f.response.status_code == 200 and f.metadata[RECORDED_KEY] is True
    recorded = [x for p in tmp_path.rglob("*.mitm") for x in read_back(p)]
    assert [x.id for x in recorded] == [f.id]
    assert "recorded in part" in recorded[0].comment and "cannot encode this body" in recorded[0].comment


async def test_when_not_even_a_part_can_be_recorded_the_refusal_says_graph_had_it(tmp_path, monkeypatch):
    refused = []
    r = Recorder(tmp_path, Health(), on_refusal=refused.append)

    def fails(flow, *args, **kwargs):
        raise ValueError("cannot encode anything")

    monkeypatch.setattr(r, "write", fails)
    with taddons.context(r):
        f = flow_with(ALLOWED)
        await r.response(f)
    r.done()
    assert f.response.status_code == 500 and refused == [f]
    message = f.response.json()["error"]["message"] if hasattr(f.response, "json") else f.response.text
    assert "not forwarded" not in f.response.text and "reached the upstream" in f.response.text
