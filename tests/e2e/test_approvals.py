"""Just-in-time approval, end to end: the real gateway process holds a risky request from a real
client (requests, configured with HTTPS_PROXY and the gateway's CA) until a person answers
through the approval API, with their own Entra token, or through ``nhi-gateway approvals``.

Workloads and people are minted by the look-alike Entra authority: the workload is rotation-bot's
application (each test gets a service principal of its own, so grants of one test never cover
another's requests) and the approvers are users of the look-alike tenant with delegated tokens.
No test asserts a duration: "other traffic keeps flowing" is shown by requests that complete while
twenty others are still held.
"""

from __future__ import annotations

import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import requests

from ..support.approvals import (
    ADELE,
    ALEX,
    API,
    MEGAN,
    SELF_LISTED,
    WAIT,
    Call,
    add_password,
    audit_of,
    audited_outcome,
    cli,
    held_flow,
    hold,
    outcome_lines,
    person,
    policy_file,
    policy_text,
)
from ..support.e2e import GRAPH, marker, reached_graph, use_proxy
from ..support.e2e import cli as nhi_gateway
from ..support.e2e import recorded_flow as recorded
from ..support.recordings import flows_under
from .conftest import gateway_running, start_gateway, stop

AZURE_CLI = "04b07795-8ddb-461a-bbee-02f9e1bf7b46"  # the public client people sign in with
WEBHOOK_HOST = "hooks.nhi-test.example"


# --- identities ----------------------------------------------------------------------------------


def graph_token_of(lookalike, authority, who: tuple[str, str]) -> str:
    """The same person's delegated Graph token, as `az account get-access-token` gets it (and as
    any app acting on the person's behalf holds one)."""
    oid, name = who
    return authority.mint_user_token(
        tenant_id=lookalike.tenant_id, object_id=oid, client_id=AZURE_CLI, audience=GRAPH, version="1.0",
        scopes=["User.Read", "Directory.AccessAsUser.All"], name=name, amr=["pwd", "mfa"],
        acrs=[lookalike.info["approvals_api"]["auth_context"]])


# --- the gateway and its API ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, lookalike):
    workdir = tmp_path_factory.mktemp("approvals")
    with gateway_running(workdir, lookalike, policy=policy_file(workdir, lookalike)) as gw:
        yield gw


def error_message(response) -> str:
    return response.json()["error"]["message"]


# --- outcomes ------------------------------------------------------------------------------------


def test_approved_request_goes_on_and_the_approver_is_on_record(gateway, lookalike, workload, adele, api,
                                                                monkeypatch):
    use_proxy(monkeypatch, gateway)
    mark, call, held = hold(lookalike, api, workload())
    assert not call.done and not reached_graph(lookalike, mark)
    assert held["rule"] == "secret-rotation" and held["principal"]["display_name"] == "rotation-bot"
    assert held["operation"].startswith("POST graph.microsoft.com /v1.0/applications/")
    assert held["digest"].startswith("sha256:") and '"rotated"' in held["body_preview"]

    listed = cli(gateway, adele, "list")
    assert listed.returncode == 0, listed.stderr
    assert held["id"] in listed.stdout and "secret-rotation" in listed.stdout

    done = cli(gateway, adele, "approve", held["id"], "--reason", "ticket CHG-42")
    assert done.returncode == 0, done.stderr
    assert f"approved {held['id']}" in done.stdout

    r = call.result()
    assert r.status_code == 200, r.text
    assert r.json()["secretText"] == "[masked]"  # the approved answer is masked like any other
    assert reached_graph(lookalike, mark)

    lines = audit_of(gateway, held_flow(gateway, held["id"]))
    events = [line.get("event") for line in lines]
    assert "approval_requested" in events and "approval_approved" in events
    final = [line for line in lines if not line.get("event")]
    assert len(final) == 1 and final[0]["decision"] == "allow" and final[0]["status"] == 200
    assert "Adele Vance" in final[0]["approver"] and "ticket CHG-42" in final[0]["reason"]

    flow = recorded(gateway, mark)
    assert flow is not None and "Adele Vance" in flow.comment and flow.marked
    assert flow.metadata["nhi"]["extra"]["approval"]["state"] == "approved"
    assert flow.metadata["nhi"]["extra"]["approval"]["id"] == held["id"]


def test_denied_request_gets_403_naming_the_approver_and_the_reason(gateway, lookalike, workload, adele, api,
                                                                    monkeypatch):
    use_proxy(monkeypatch, gateway)
    mark, call, held = hold(lookalike, api, workload())
    done = cli(gateway, adele, "deny", held["id"], "--reason", "no change ticket")
    assert done.returncode == 0, done.stderr

    r = call.result()
    assert r.status_code == 403
    message = error_message(r)
    assert "denied by Adele Vance" in message and "no change ticket" in message
    assert not reached_graph(lookalike, mark)
    [final] = outcome_lines(gateway, held["id"])
    assert final["decision"] == "deny" and final["status"] == 403 and "no change ticket" in final["reason"]
    assert final["approver"].startswith("Adele Vance (")
    flow = recorded(gateway, mark)
    assert flow is not None and "denied by Adele Vance" in flow.comment
    assert flow.metadata["nhi"]["extra"]["approval"]["state"] == "denied"


def test_no_decision_before_the_timeout_is_refused(gateway, lookalike, workload, api, monkeypatch):
    use_proxy(monkeypatch, gateway)
    mark = marker()
    app_id = lookalike.app("mcp-directory")["application_object_id"]
    r = Call("POST", f"{GRAPH}/v1.0/applications/{app_id}/addKey?m={mark}", workload(), {"keyCredential": {}}).result()
    assert r.status_code == 403
    assert error_message(r).startswith("approval timed out")
    assert not reached_graph(lookalike, mark)
    [held] = api.wait_for(mark, state="timed_out")
    [final] = outcome_lines(gateway, held["id"])
    assert final["decision"] == "deny" and "approval timed out" in final["reason"]
    assert recorded(gateway, mark).metadata["nhi"]["extra"]["approval"]["state"] == "timed_out"


def test_client_disconnecting_while_held_cancels_the_request(gateway, lookalike, workload, api, monkeypatch):
    use_proxy(monkeypatch, gateway)
    mark = marker()
    app_id = lookalike.app("mcp-directory")["application_object_id"]
    call = Call("POST", f"{GRAPH}/v1.0/applications/{app_id}/addPassword?m={mark}", workload(),
                {"passwordCredential": {}}, timeout=1.5)  # the client gives up and closes the connection
    with pytest.raises(requests.exceptions.ReadTimeout):
        call.result()
    [cancelled] = api.wait_for(mark, state="cancelled")
    assert "disconnected" in cancelled["reason"]
    assert api.approve(cancelled["id"]).status_code == 409  # nothing left to approve
    assert not reached_graph(lookalike, mark)
    final = audited_outcome(gateway, cancelled["id"])
    assert final["decision"] == "deny" and "cancelled" in final["reason"]
    assert recorded(gateway, mark).metadata["nhi"]["extra"]["approval"]["state"] == "cancelled"


# --- who may approve -----------------------------------------------------------------------------


def test_no_identity_approves_its_own_request(gateway, lookalike, authority, workload, adele, api, monkeypatch):
    """A workload the rule names as an approver cannot approve its own request: its token is no
    approver's token (401). A person whose own request is held (rotation-bot acting on Adele's
    behalf, with her delegated Graph token) cannot approve it either, although the rule names her
    and she presents her approver token (403)."""
    use_proxy(monkeypatch, gateway)
    mark = marker()
    own = workload(SELF_LISTED)
    call = add_password(lookalike, own, mark, app="rotation-bot")
    [held] = api.wait_for(mark)
    r = API(gateway, own).approve(held["id"], reason="trust me")
    assert r.status_code == 401 and r.json()["error"]["innerError"]["nhi-gateway"]["check"] == "approver_audience"
    assert cli(gateway, own, "approve", held["id"]).returncode == 1
    assert api.deny(held["id"], "self-approval attempt").status_code == 200
    assert call.result().status_code == 403

    hers = authority.mint_user_token(
        tenant_id=lookalike.tenant_id, object_id=ADELE[0], client_id=lookalike.app("rotation-bot")["client_id"],
        audience=GRAPH, version="1.0", scopes=["Application.ReadWrite.All"], name=ADELE[1])
    mark = marker()
    call = add_password(lookalike, hers, mark, app="rotation-bot")
    [held] = api.wait_for(mark)
    r = api.approve(held["id"], reason="trust me")
    assert r.status_code == 403
    assert "cannot approve its own request" in error_message(r)
    assert cli(gateway, adele, "approve", held["id"]).returncode == 1
    assert [a["state"] for a in api.approvals("all") if a["id"] == held["id"]] == ["pending"]
    assert not call.done and not reached_graph(lookalike, mark)
    assert api.deny(held["id"], "self-approval attempt").status_code == 200
    assert call.result().status_code == 403


def test_approver_outside_the_list_is_refused_and_a_group_member_may_approve(gateway, lookalike, authority,
                                                                             workload, api, monkeypatch):
    use_proxy(monkeypatch, gateway)
    mark, call, held = hold(lookalike, api, workload())
    alex = API(gateway, person(lookalike, authority, ALEX, groups=[lookalike.info["groups"]["Retail"]]))
    for r in (alex.approve(held["id"]), alex.deny(held["id"]), alex.get("/approvals")):
        assert r.status_code == 403, r.text
        assert "Alex Wilber" in error_message(r)
    unsigned = API(gateway, "not-a-token")
    assert unsigned.approve(held["id"]).status_code == 401
    assert not call.done

    megan = API(gateway, person(lookalike, authority, MEGAN, groups=[lookalike.info["groups"]["Finance"]]))
    assert [a["id"] for a in megan.approvals() if mark in a["url"]] == [held["id"]]
    r = megan.approve(held["id"], reason="finance on call")
    assert r.status_code == 200, r.text
    assert call.result().status_code == 200


def test_a_bad_grant_duration_is_refused_and_the_request_stays_held(gateway, lookalike, workload, api,
                                                                    monkeypatch):
    use_proxy(monkeypatch, gateway)
    mark, call, held = hold(lookalike, api, workload())
    for duration, why in (("2h", "max_grant 1h"), ("soon", "not a duration")):
        r = api.approve(held["id"], **{"for": duration})
        assert r.status_code == 400 and why in error_message(r)
    assert not call.done
    assert api.deny(held["id"]).status_code == 200
    assert call.result().status_code == 403


# --- grants --------------------------------------------------------------------------------------


def test_a_grant_covers_the_operation_until_revoked(gateway, lookalike, workload, adele, api, monkeypatch):
    use_proxy(monkeypatch, gateway)
    token = workload()
    mark = marker()
    first = add_password(lookalike, token, mark)
    [held] = api.wait_for(mark)
    done = cli(gateway, adele, "approve", held["id"], "--for", "30m", "--reason", "rotation window")
    assert done.returncode == 0, done.stderr
    assert first.result().status_code == 200
    [grant] = [g for g in api.grants() if g["approval_id"] == held["id"]]
    assert grant["state"] == "active" and grant["operation"] == held["operation"]
    assert grant["id"] in cli(gateway, adele, "list").stdout

    # Within the grant: another request of the same workload and operation goes straight on.
    again = marker()
    r = add_password(lookalike, token, again, name="second").result()
    assert r.status_code == 200, r.text
    assert not api.wait_for(again, count=0) and reached_graph(lookalike, again)
    [line] = [a for a in gateway.audit() if again in (a.get("url") or "")]
    assert line["decision"] == "allow" and grant["id"] in line["reason"] and "Adele Vance" in line["approver"]

    # The grant is the workload's: another service principal of the same app is held.
    other = marker()
    call = add_password(lookalike, workload(str(uuid.uuid4())), other)
    [held_other] = api.wait_for(other)
    assert api.deny(held_other["id"]).status_code == 200
    assert call.result().status_code == 403

    # Revoked: held again.
    r = api.revoke(grant["id"])
    assert r.status_code == 200 and r.json()["grant"]["state"] == "revoked"
    assert api.revoke(grant["id"]).status_code == 409
    late = marker()
    call = add_password(lookalike, token, late)
    [held_late] = api.wait_for(late)
    assert api.deny(held_late["id"], "grant revoked").status_code == 200
    assert call.result().status_code == 403
    assert any(a.get("event") == "grant_revoked" and grant["id"] in a["reason"] for a in gateway.audit())


def test_a_grant_expires_on_time(gateway, lookalike, workload, api, monkeypatch):
    use_proxy(monkeypatch, gateway)
    token = workload()
    mark = marker()
    first = add_password(lookalike, token, mark)
    [held] = api.wait_for(mark)
    r = api.approve(held["id"], **{"for": "2s", "reason": "just this once, briefly"})
    assert r.status_code == 200 and r.json()["grant"]["state"] == "active"
    grant_id = r.json()["grant"]["id"]
    assert first.result().status_code == 200

    deadline = time.monotonic() + WAIT
    while [g["state"] for g in api.grants("all") if g["id"] == grant_id] != ["expired"]:
        assert time.monotonic() < deadline, "the grant never expired"
        time.sleep(0.1)
    assert grant_id not in [g["id"] for g in api.grants()]
    late = marker()
    call = add_password(lookalike, token, late)
    [held_late] = api.wait_for(late)  # asked again: the expired grant covers nothing
    assert api.deny(held_late["id"], "expired").status_code == 200
    assert call.result().status_code == 403


def test_grants_are_kept_across_a_restart(tmp_path, lookalike, authority, workload, adele, monkeypatch):
    policy = policy_file(tmp_path, lookalike)
    token = workload()
    gw = start_gateway(tmp_path / "gw", lookalike, policy=policy)
    try:
        use_proxy(monkeypatch, gw)
        api = API(gw, adele)
        mark = marker()
        call = add_password(lookalike, token, mark)
        [held] = api.wait_for(mark)
        grant = api.approve(held["id"], **{"for": "30m", "reason": "maintenance"}).json()["grant"]
        assert call.result().status_code == 200
        # A request still held when the gateway stops is cancelled, not left pending.
        pending_mark = marker()
        pending = add_password(lookalike, workload(str(uuid.uuid4())), pending_mark)
        [still_held] = api.wait_for(pending_mark)
    finally:
        stop(gw.proc)
    pending.thread.join(WAIT)
    assert pending.done

    gw = start_gateway(tmp_path / "gw", lookalike, policy=policy)
    try:
        use_proxy(monkeypatch, gw)
        api = API(gw, adele)
        assert grant["id"] in [g["id"] for g in api.grants()]
        assert grant["id"] in cli(gw, adele, "list").stdout
        assert [a["state"] for a in api.approvals("all") if a["id"] == still_held["id"]] == ["cancelled"]
        after = marker()
        r = add_password(lookalike, token, after, name="after restart").result()
        assert r.status_code == 200, r.text
        assert not api.wait_for(after, count=0)
        [line] = [a for a in gw.audit() if after in (a.get("url") or "")]
        assert grant["id"] in line["reason"]
    finally:
        stop(gw.proc)


# --- many at once --------------------------------------------------------------------------------


def test_twenty_held_requests_do_not_hold_up_other_traffic(gateway, lookalike, workload, api, monkeypatch,
                                                           tokens):
    use_proxy(monkeypatch, gateway)
    mark = marker()
    held_calls = [add_password(lookalike, workload(), f"{mark}-{i}") for i in range(20)]
    held = api.wait_for(mark, count=20)
    assert len(held) == 20

    # Other traffic, while all twenty wait: reads by another identity, one after the other.
    reader = tokens()
    for i in range(10):
        r = requests.get(f"{GRAPH}/v1.0/users?$top=1&m={mark}-read-{i}",
                         headers={"Authorization": f"Bearer {reader}"}, timeout=30)
        assert r.status_code == 200, r.text
    # ... all of them answered while the twenty are still held.
    assert not any(c.done for c in held_calls)
    assert len(api.wait_for(mark, count=20)) == 20

    for a in held:
        assert api.deny(a["id"], "load test").status_code == 200
    assert [c.result().status_code for c in held_calls] == [403] * 20
    assert not any(reached_graph(lookalike, f"{mark}-{i}") for i in range(20))


# --- notifying approvers ---------------------------------------------------------------------------


class _Webhook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook(lookalike, tmp_path):
    """An incoming-webhook receiver (like Slack's or Teams') with a certificate from the CA the
    gateway trusts for its own outbound HTTPS."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from nhi_gateway.lookalike.pki import issue_server_cert

    pki = lookalike.state_dir / "pki"
    ca_key = serialization.load_pem_private_key((pki / "ca.key.pem").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key, cert = issue_server_cert(ca_key, ca_cert, names=(WEBHOOK_HOST,), addresses=("127.0.0.1",))
    (tmp_path / "hook.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "hook.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "hook.pem", tmp_path / "hook.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    _Webhook.received = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], _Webhook.received
    finally:
        server.shutdown()


def test_webhook_tells_approvers_what_is_asked_and_how_to_approve(tmp_path, lookalike, workload, adele,
                                                                  webhook, monkeypatch):
    port, received = webhook
    policy = policy_file(tmp_path, lookalike, webhook=f"https://{WEBHOOK_HOST}/services/T000/B000/XXXX")
    gw = start_gateway(tmp_path / "gw", lookalike, policy=policy,
                       extra_args=["--resolve", f"{WEBHOOK_HOST}=127.0.0.1:{port}"])
    try:
        use_proxy(monkeypatch, gw)
        api = API(gw, adele)
        mark, call, held = hold(lookalike, api, workload())
        deadline = time.monotonic() + WAIT
        while not received:
            assert time.monotonic() < deadline, f"no webhook message; gateway log:\n{gw.log.read_text()[-2000:]}"
            time.sleep(0.05)
        message = received[0]["text"]
        assert held["id"] in message and "rotation-bot" in message and "secret-rotation" in message
        assert f"nhi-gateway approvals approve {held['id']}" in message and gw.info["approvals_api"] in message
        assert "body_preview" not in received[0]["nhi_gateway"]["approval"]  # the body stays with the gateway
        assert "B000/XXXX" not in gw.log.read_text()  # a webhook URL's path is its secret: never logged
        assert api.approve(held["id"]).status_code == 200
        assert call.result().status_code == 200
    finally:
        stop(gw.proc)


def test_a_failing_webhook_never_holds_up_the_request(tmp_path, lookalike, workload, adele, monkeypatch):
    policy = policy_file(tmp_path, lookalike, webhook=f"https://{WEBHOOK_HOST}/nobody-listens")
    gw = start_gateway(tmp_path / "gw", lookalike, policy=policy,
                       extra_args=["--resolve", f"{WEBHOOK_HOST}=127.0.0.1:9"])  # nothing listens there
    try:
        use_proxy(monkeypatch, gw)
        api = API(gw, adele)
        mark, call, held = hold(lookalike, api, workload())
        assert api.approve(held["id"]).status_code == 200
        assert call.result().status_code == 200
        deadline = time.monotonic() + WAIT
        while f"webhook to {WEBHOOK_HOST}" not in gw.log.read_text():
            assert time.monotonic() < deadline, "the failed webhook was not logged"
            time.sleep(0.05)
        logged = gw.log.read_text().split(f"webhook to {WEBHOOK_HOST}", 1)[1][:300]
        assert logged.startswith(" failed") and "nobody-listens" not in logged  # the URL's path stays out
    finally:
        stop(gw.proc)


# --- the API's own listener ------------------------------------------------------------------------


def test_the_api_listener_forwards_nothing(gateway, lookalike, adele):
    before = len(lookalike.received())
    with httpx.Client(base_url=gateway.info["approvals_api"], trust_env=False, timeout=30) as client:
        r = client.get("/v1.0/users", headers={"Authorization": f"Bearer {adele}", "Host": "graph.microsoft.com"})
    assert r.status_code == 404
    assert len(lookalike.received()) == before
    assert gateway.info["approvals_api"].startswith("http://127.0.0.1:")


def test_the_approval_api_is_not_reachable_through_the_proxy(gateway, adele, monkeypatch):
    use_proxy(monkeypatch, gateway)
    api = gateway.info["approvals_api"]
    r = requests.get(f"{api}/approvals", headers={"Authorization": f"Bearer {adele}"}, timeout=30,
                     proxies={"http": gateway.proxy()})
    assert r.status_code == 403, r.text
    assert "not an upstream named in the policy" in error_message(r)


# --- stopping and reloading by signal ------------------------------------------------------------


def test_sigterm_drains_held_requests_get_503_and_requests_in_flight_finish(tmp_path, lookalike, workload, adele,
                                                                           monkeypatch):
    """What an orchestrator's SIGTERM must do: no new connections, a new request on an open one
    refused 503, a held request answered 503 naming the stop, a request already at Graph answered
    in full, every one of them audited and recorded, and a clean exit."""
    import signal
    import socket

    from nhi_gateway.lookalike.pki import SERVER_CERT_FILE, SERVER_KEY_FILE

    from ..support.relay import MuteServer

    policy = policy_file(tmp_path, lookalike)
    pki = lookalike.state_dir / "pki"
    with MuteServer(str(pki / SERVER_CERT_FILE), str(pki / SERVER_KEY_FILE), "slow", delay=3) as graph:
        gw = start_gateway(tmp_path / "gw", lookalike, policy=policy,
                           extra_args=["--resolve", f"graph.microsoft.com={graph.address}"])
        try:
            use_proxy(monkeypatch, gw)
            api = API(gw, adele)
            token = workload()
            open_conn = requests.Session()  # a keep-alive tunnel opened before the stop
            first = open_conn.get(f"{GRAPH}/v1.0/users/{marker()}", headers={"Authorization": f"Bearer {token}"},
                                  timeout=WAIT)
            assert first.status_code == 200, first.text
            held_mark, slow_mark = marker(), marker()
            held = add_password(lookalike, token, held_mark)
            [pending] = api.wait_for(held_mark)
            slow = Call("GET", f"{GRAPH}/v1.0/users/{slow_mark}", token)
            deadline = time.monotonic() + WAIT
            while graph.requests < 2:  # the slow request is at Graph, waiting for its answer
                assert time.monotonic() < deadline and slow.thread.is_alive()
                time.sleep(0.02)

            gw.proc.send_signal(signal.SIGTERM)

            r = held.result()
            assert r.status_code == 503, r.text
            assert "stopping (SIGTERM)" in error_message(r)
            late = open_conn.get(f"{GRAPH}/v1.0/users/{marker()}", headers={"Authorization": f"Bearer {token}"},
                                 timeout=WAIT)
            assert late.status_code == 503 and "stopping" in error_message(late)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", gw.port), timeout=5).close()
            answered = slow.result()
            assert answered.status_code == 200 and answered.json()["slow"] is True
            assert gw.proc.wait(WAIT) == 0
        finally:
            stop(gw.proc)
        assert graph.requests == 2  # the held and the late request never reached Graph

    lines = gw.audit()
    [final] = [a for a in lines if a.get("flow_id") == held_flow(gw, pending["id"]) and not a.get("event")]
    assert final["status"] == 503 and final["decision"] == "deny" and "stopping" in final["reason"]
    [slow_line] = [a for a in lines if slow_mark in (a.get("url") or "")]
    assert slow_line["status"] == 200
    assert any(a["status"] == 503 and "stopping" in a["reason"] and "/users/" in a["url"] for a in lines)
    seen = {flow.request.path: flow for flow in flows_under(gw.recordings)}
    [held_flow_on_disk] = [f for p, f in seen.items() if held_mark in p]
    assert held_flow_on_disk.response.status_code == 503
    assert any(slow_mark in p and f.response.status_code == 200 for p, f in seen.items())


def test_sighup_reloads_the_policy_and_a_bad_file_keeps_the_last_good_one(tmp_path, lookalike, workload,
                                                                          monkeypatch):
    import signal

    policy = tmp_path / "policy.yaml"
    good = policy_text(lookalike)
    policy.write_text(good)
    gw = start_gateway(tmp_path / "gw", lookalike, policy=policy)
    try:
        use_proxy(monkeypatch, gw)
        token = workload()

        def read_user() -> tuple[requests.Response, bool]:
            """The answer, and whether the gateway let the request reach Graph."""
            mark = marker()
            r = requests.get(f"{GRAPH}/v1.0/users/{mark}", headers={"Authorization": f"Bearer {token}"},
                             timeout=WAIT)
            return r, reached_graph(lookalike, mark)

        assert read_user()[1]
        # The same size, inode and mtime: the file watcher cannot see this edit, only SIGHUP can.
        before = os.stat(policy)
        denying = good.replace("  - id: directory-read\n    action: allow\n", "  - id: directory-read\n    action: deny \n")
        assert denying != good and len(denying) == len(good)
        with open(policy, "r+") as f:
            f.write(denying)
        os.utime(policy, ns=(before.st_atime_ns, before.st_mtime_ns))
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while (answer := read_user())[1]:
            assert time.monotonic() < deadline, "SIGHUP did not reload the policy"
            time.sleep(0.1)
        assert answer[0].status_code == 403 and "directory-read" in answer[0].text
        assert gw.proc.poll() is None

        broken = denying.replace("rules:", "rulez:")
        with open(policy, "r+") as f:
            f.write(broken)
        os.utime(policy, ns=(before.st_atime_ns, before.st_mtime_ns))
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while "policy reload refused" not in gw.log.read_text():
            assert time.monotonic() < deadline, "the bad reload was never reported"
            time.sleep(0.1)
        assert gw.proc.poll() is None
        r, reached = read_user()
        assert r.status_code == 403 and not reached  # the last good policy (the denying one) stays
    finally:
        stop(gw.proc)


# --- what proves an approver (issue 17) --------------------------------------------------------------


def not_an_approvers_token(kind: str, lookalike, authority) -> str:
    """Tokens Entra really issues, right tenant, issuer, signature and lifetime, each of which must
    not prove an approver to the approval API, although each names a listed approver."""
    api = lookalike.info["approvals_api"]
    if kind == "graph-token":  # Adele's own Graph token: any app acting on her behalf holds one
        return graph_token_of(lookalike, authority, ADELE)
    if kind == "another-api":
        return person(lookalike, authority, ADELE, audience="api://2b1f4c62-0000-4000-8000-0000000000aa")
    if kind == "app-only":  # a listed workload, with an application permission named like the scope
        return authority.mint_app_token(tenant_id=lookalike.tenant_id, app_id=api["client_id"], object_id=SELF_LISTED,
                                        audience=api["client_id"], version="2.0", roles=(api["scope"],))
    if kind == "managed-identity":
        return authority.mint_app_token(
            tenant_id=lookalike.tenant_id, app_id=api["client_id"], object_id=SELF_LISTED, audience=api["client_id"],
            version="2.0", extra_claims={"xms_mirid": "/subscriptions/0/resourcegroups/rg/providers/"
                                         "Microsoft.ManagedIdentity/userAssignedIdentities/approver"})
    if kind == "on-behalf-of":  # an MCP server exchanged Adele's token for one of the approval API
        return person(lookalike, authority, ADELE, client_id=lookalike.app("mcp-directory")["client_id"],
                      client_acr="1")
    if kind == "without-scope":
        return person(lookalike, authority, ADELE, scopes=["User.Read"])
    if kind == "without-auth-context":  # signed in without the step-up
        return person(lookalike, authority, ADELE, acrs=[], amr=["pwd"])
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, check", [
    ("graph-token", "approver_audience"),
    ("another-api", "approver_audience"),
    ("app-only", "approver_person"),
    ("managed-identity", "approver_person"),
    ("on-behalf-of", "approver_client"),
    ("without-scope", "approver_scope"),
    ("without-auth-context", "approver_auth_context"),
])
def test_tokens_that_do_not_prove_an_approver_are_refused_401_even_for_a_listed_approver(
        kind, check, gateway, lookalike, authority, workload, api, monkeypatch):
    use_proxy(monkeypatch, gateway)
    mark, call, held = hold(lookalike, api, workload())
    token = not_an_approvers_token(kind, lookalike, authority)
    impostor = API(gateway, token)
    for r in (impostor.get("/approvals"), impostor.approve(held["id"], reason="self-approved"),
              impostor.get("/grants")):
        assert r.status_code == 401, r.text
        assert r.json()["error"]["innerError"]["nhi-gateway"]["check"] == check
    if kind == "without-auth-context":  # MSAL clients answer this challenge with a step-up
        assert 'error="insufficient_claims"' in r.headers["WWW-Authenticate"]
    done = cli(gateway, token, "approve", held["id"], "--reason", "self-approved")
    assert done.returncode == 1 and "401" in done.stderr and "approve" not in done.stdout
    assert api.get(f"/approvals/{held['id']}").json()["approval"]["state"] == "pending"
    assert not call.done and not reached_graph(lookalike, mark)
    refused = [a for a in gateway.audit() if a.get("check") == check and "approvals-api" in (a.get("operation") or "")]
    assert refused, "refused API calls are audited like any refusal"
    if kind in ("app-only", "managed-identity", "on-behalf-of", "without-scope", "without-auth-context"):
        assert refused[-1]["principal"]["object_id"] in (ADELE[0], SELF_LISTED)  # who tried is on record
    assert api.deny(held["id"], "test over").status_code == 200  # Adele's approver token is accepted
    assert call.result().status_code == 403 and not reached_graph(lookalike, mark)


def device_login(lookalike, home, api_url: str, *, mfa: bool) -> tuple[str, str]:
    """``nhi-gateway approvals login`` as an approver runs it, without an OS keyring; Adele enters
    the code at the look-alike's device login. Returns (stdout, stderr)."""
    import re

    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "NHI_APPROVER_TOKEN"}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local"),
               XDG_CACHE_HOME=str(home / ".cache"), NHI_APPROVALS_API=api_url,
               REQUESTS_CA_BUNDLE=lookalike.ca_cert, PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nhi_gateway.cli.main", "approvals", "login",
         "--authority", lookalike.info["local_authority"]],
        cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = []
        while not (found := re.search(r"enter the code (\S+)", "".join(said))):
            line = proc.stderr.readline()
            assert line, f"login ended before asking for a code: {''.join(said)}"
            said.append(line)
        r = httpx.post(f"{lookalike.info['local_authority']}/{lookalike.tenant_id}/oauth2/deviceauth",
                       data={"otc": found.group(1), "user": f"AdeleV@{lookalike.info['tenant_domain']}",
                             "mfa": str(mfa).lower()},
                       verify=ssl.create_default_context(cafile=lookalike.ca_cert), trust_env=False)
        assert r.status_code == 200, r.text
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return out, "".join(said) + err


def test_approvals_login_signs_in_with_the_device_code_flow_and_no_token_reaches_a_file(
        tmp_path, gateway, lookalike, workload, api, monkeypatch):
    import shlex

    home = tmp_path / "home"
    home.mkdir()
    url = gateway.info["approvals_api"]
    out, err = device_login(lookalike, home, url, mfa=True)
    assert "no OS keyring is available" in err and "Adele Vance" in err
    [export] = out.splitlines()
    assert export.startswith("export NHI_APPROVER_TOKEN=")
    token = shlex.split(export.removeprefix("export "))[0].split("=", 1)[1]

    use_proxy(monkeypatch, gateway)
    mark, call, held = hold(lookalike, api, workload())
    done = cli(gateway, token, "approve", held["id"], "--reason", "signed in with the device code flow")
    assert done.returncode == 0, done.stderr
    assert call.result().status_code == 200 and reached_graph(lookalike, mark)

    # Without the step-up the same sign-in gives a token the API refuses.
    out, _ = device_login(lookalike, home, url, mfa=False)
    weak = shlex.split(out.strip().removeprefix("export "))[0].split("=", 1)[1]
    r = API(gateway, weak).get("/approvals")
    assert r.status_code == 401 and r.json()["error"]["innerError"]["nhi-gateway"]["check"] == "approver_auth_context"

    # Nothing of either token, nor of the tokens the API was shown, is in any file.
    secrets = [t.rsplit(".", 1)[1] for t in (token, weak)] + [t.split(".")[1][:40] for t in (token, weak)]
    for root in (tmp_path, gateway.workdir, lookalike.state_dir):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(s.encode() in data for s in secrets), f"a token reached {path}"


# --- the look-alike as a tool --------------------------------------------------------------------


def test_a_token_minted_by_hand_with_the_lookalike_approves_and_its_calls_are_not_graph_flows(gateway, lookalike):
    """`nhi-gateway lookalike token --user adele` gives the token `approvals login` would: the
    approval API accepts it (and refuses the one from a sign-in without MFA), and its calls are
    recorded in the day's approval-api.mitm, not as Graph flows of the app the token names."""
    def minted(*args: str) -> str:
        out = nhi_gateway("lookalike", "token", "--state-dir", str(lookalike.state_dir), *args, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert API(gateway, minted("--user", "adele")).get("/approvals").status_code == 200
    r = API(gateway, minted("--user", "AdeleV", "--no-mfa")).get("/approvals")
    assert r.status_code == 401 and "auth_context" in r.text
    unknown = nhi_gateway("lookalike", "token", "--state-dir", str(lookalike.state_dir), "--user", "nobody", timeout=60)
    assert unknown.returncode == 2 and "no user 'nobody'" in unknown.stderr and "adele" in unknown.stderr

    from mitmproxy import io

    deadline = time.monotonic() + WAIT
    while not list(gateway.recordings.rglob("approval-api.mitm")):
        assert time.monotonic() < deadline, "the approval API calls were not recorded"
        time.sleep(0.05)
    [api_file] = gateway.recordings.rglob("approval-api.mitm")
    with open(api_file, "rb") as f:
        paths = [flow.request.path for flow in io.FlowReader(f).stream()]
    assert "/approvals" in paths
    for path in gateway.recording_files():
        if path.name != "approval-api.mitm":
            with open(path, "rb") as f:
                # (a request *through the proxy* to some /approvals path is a proxy flow like any other)
                assert not any(" approvals-api " in str((flow.metadata.get("nhi") or {}).get("operation"))
                               for flow in io.FlowReader(f).stream())
# --- judged again at release (issue 18, item 2) ------------------------------------------------------

NO_MINTING = """
  - id: no-minting-now
    description: Added while a request was held.
    action: deny
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/applications/{id}/addPassword"]
"""


def test_a_deny_added_while_held_wins_at_release(tmp_path, lookalike, workload, adele, monkeypatch):
    """A request is held; a reload adds a rule that denies it; the approver approves (with a grant).
    The approval does not replace the policy: the client gets 403 naming the new rule, the
    approver's answer says the request was refused, the grant covers nothing the policy denies,
    and Graph never receives the request."""
    policy = policy_file(tmp_path, lookalike)
    gw = start_gateway(tmp_path / "gw", lookalike, policy=policy, env={"PYTHONUNBUFFERED": "1"})
    try:
        use_proxy(monkeypatch, gw)
        api = API(gw, adele)
        token = workload()
        mark = marker()
        call = add_password(lookalike, token, mark)
        [held] = api.wait_for(mark)

        policy.write_text(policy_text(lookalike) + NO_MINTING)
        deadline = time.monotonic() + WAIT
        while "generation 2" not in gw.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the edited policy was not reloaded"
            time.sleep(0.1)
        assert not call.done  # still held: the approval decides when it ends

        # The approver's answer (nhi-gateway approvals approve, reading the API's "release") says so.
        done = cli(gw, adele, "approve", held["id"], "--for", "30m", "--reason", "looks fine")
        assert done.returncode == 0, done.stderr
        assert f"approved {held['id']}, but" in done.stdout and "does not go on" in done.stdout
        assert "no-minting-now" in done.stdout

        r = call.result()
        assert r.status_code == 403, r.text
        assert r.json()["error"]["innerError"]["nhi-gateway"]["rule"] == "no-minting-now"
        assert "no-minting-now" in error_message(r) and "Adele Vance" in error_message(r)
        assert not reached_graph(lookalike, mark)
        [final] = outcome_lines(gw, held["id"])
        assert final["decision"] == "deny" and final["rule"] == "no-minting-now"

        # The grant the approver gave covers nothing the policy in force denies.
        again = marker()
        r = add_password(lookalike, token, again).result()
        assert r.status_code == 403 and r.json()["error"]["innerError"]["nhi-gateway"]["rule"] == "no-minting-now"
        assert not reached_graph(lookalike, again)
    finally:
        stop(gw.proc)
