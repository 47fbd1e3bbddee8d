"""Two real gateway processes, one PostgreSQL database (``--state postgresql://...``): replicas that
share approvals and grants. Clients use each replica as users configure one: a proxy URL and the
replica's CA; approvers call whichever replica's approval API they reach.

The server is the one tests/conftest.py finds or starts (``postgres_url``: a fresh database).
"""

from __future__ import annotations

import signal
import threading
import time
from urllib.parse import urlsplit

import pytest
import requests

from ..support.approvals import API, MEGAN, WAIT, Call, add_password, cli, person, policy_file, workload_token
from ..support.e2e import GRAPH, marker, reached_graph
from ..support.relay import Relay
from .conftest import start_gateway, stop


@pytest.fixture(scope="module")
def megan(lookalike, authority) -> str:
    return person(lookalike, authority, MEGAN, groups=[lookalike.info["groups"]["Finance"]])


def start_replica(workdir, lookalike, state: str):
    return start_gateway(workdir, lookalike, policy=policy_file(workdir, lookalike), extra_args=["--state", state])


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, lookalike, postgres_url):
    root = tmp_path_factory.mktemp("replicas")
    a = start_replica(root / "a", lookalike, postgres_url)
    try:
        b = start_replica(root / "b", lookalike, postgres_url)
    except BaseException:
        stop(a.proc)
        raise
    try:
        yield a, b
    finally:
        stop(a.proc)
        stop(b.proc)


def test_a_request_held_on_one_replica_is_listed_and_released_through_the_other(replicas, lookalike, workload,
                                                                               adele):
    a, b = replicas
    mark = marker()
    call = add_password(lookalike, workload(), mark, gateway=a)
    [held] = API(b, adele).wait_for(mark)  # replica B's API lists what replica A holds
    assert held["id"] in [h["id"] for h in API(a, adele).approvals()]
    listed = cli(b, adele, "list")
    assert listed.returncode == 0 and held["id"] in listed.stdout, listed.stderr
    assert not call.done and not reached_graph(lookalike, mark)

    assert API(b, adele).approve(held["id"], reason="ticket CHG-7").status_code == 200
    # Released by the NOTIFY of the decision (tests/unit/test_approvals_postgres.py bounds it to
    # 1 s); here a generous bound only tells a wake-up from a timeout.
    r = call.result(timeout=5)
    assert r.status_code == 200, r.text
    assert reached_graph(lookalike, mark)
    [line] = [x for x in a.audit() if mark in (x.get("url") or "") and x.get("decision") == "allow"]
    assert "Adele Vance" in line["approver"]


def test_a_grant_given_through_one_replica_is_honoured_by_the_other_and_revoked_everywhere(
        replicas, lookalike, workload, adele):
    a, b = replicas
    mark = marker()
    first = add_password(lookalike, workload(), mark, gateway=a)
    [held] = API(a, adele).wait_for(mark)
    r = API(a, adele).approve(held["id"], **{"for": "10m"}, reason="rotation window")
    assert r.status_code == 200, r.text
    grant = r.json()["grant"]
    assert first.result().status_code == 200

    again = marker()
    r = add_password(lookalike, workload(), again, gateway=b).result()  # replica B: no asking
    assert r.status_code == 200, r.text
    assert reached_graph(lookalike, again)

    assert API(b, adele).revoke(grant["id"]).status_code == 200
    late = marker()
    call = add_password(lookalike, workload(), late, gateway=a)  # replica A: held again
    [held_late] = API(b, adele).wait_for(late)
    assert API(b, adele).deny(held_late["id"], "grant revoked").status_code == 200
    assert call.result().status_code == 403
    assert not reached_graph(lookalike, late)


def test_two_approvers_deciding_at_once_through_two_replicas_one_wins_the_other_gets_409(
        replicas, lookalike, workload, adele, megan):
    a, b = replicas
    mark = marker()
    call = add_password(lookalike, workload(), mark, gateway=a)
    [held] = API(a, adele).wait_for(mark)
    answers: dict[str, requests.Response] = {}
    go = threading.Barrier(2)

    def decide(name: str, api: API, verdict: str) -> None:
        go.wait()
        answers[name] = api.approve(held["id"], reason=name) if verdict == "approve" else api.deny(held["id"], name)

    threads = [threading.Thread(target=decide, args=("adele", API(a, adele), "approve")),
               threading.Thread(target=decide, args=("megan", API(b, megan), "deny"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    statuses = sorted(r.status_code for r in answers.values())
    assert statuses == [200, 409], {k: (v.status_code, v.text) for k, v in answers.items()}
    [loser] = [r for r in answers.values() if r.status_code == 409]
    assert "already" in loser.json()["error"]["message"] or "meanwhile" in loser.json()["error"]["message"]
    [winner] = [name for name, r in answers.items() if r.status_code == 200]
    final = call.result()
    assert final.status_code == (200 if winner == "adele" else 403)


def test_a_replica_killed_while_holding_a_request_cancels_it_and_the_others_go_on(
        tmp_path, replicas, lookalike, workload, adele, postgres_url):
    _, b = replicas
    doomed = start_replica(tmp_path / "c", lookalike, postgres_url)
    try:
        mark = marker()
        call = add_password(lookalike, workload(), mark, gateway=doomed)
        [held] = API(b, adele).wait_for(mark)
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
        with pytest.raises(requests.RequestException):
            call.result()  # its client is gone with it
        [cancelled] = API(b, adele).wait_for(mark, state="cancelled")
        assert cancelled["id"] == held["id"]
        assert "stopped while the request was held" in cancelled["reason"]
        assert API(b, adele).approve(held["id"]).status_code == 409
        assert not reached_graph(lookalike, mark)
        # replica B is unaffected: it holds and releases as before
        other = marker()
        call = add_password(lookalike, workload(), other, gateway=b)
        [held_b] = API(b, adele).wait_for(other)
        assert API(b, adele).approve(held_b["id"]).status_code == 200
        assert call.result().status_code == 200
    finally:
        stop(doomed.proc)


def test_postgres_unreachable_what_needs_approval_is_refused_503_the_rest_flows_and_it_recovers(
        tmp_path, lookalike, workload, adele, tokens, postgres_url):
    parts = urlsplit(postgres_url)
    relay = Relay((parts.hostname or "127.0.0.1", parts.port or 5432))
    url = parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{relay.port}").geturl()
    gw = start_replica(tmp_path / "d", lookalike, url)
    try:
        relay.set_mode("down")
        mark = marker()
        deadline = time.monotonic() + WAIT
        while True:  # the replica notices within its heartbeat; until then requests may still be held
            r = add_password(lookalike, workload(), mark, gateway=gw).result()
            if r.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 503, r.text
        assert "approval" in r.json()["error"]["message"]
        assert not reached_graph(lookalike, mark)
        # what needs no approval flows on
        users = Call("GET", f"{GRAPH}/v1.0/users?m={marker()}", tokens(), gateway=gw).result()
        assert users.status_code == 200, users.text
        # the API says it cannot answer, and changes nothing
        assert API(gw, adele).get("/approvals").status_code == 503

        relay.set_mode("forward")
        deadline = time.monotonic() + WAIT
        while API(gw, adele).get("/approvals").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        back = marker()
        call = add_password(lookalike, workload(), back, gateway=gw)
        [held] = API(gw, adele).wait_for(back)
        assert API(gw, adele).deny(held["id"], "checked").status_code == 200
        assert call.result().status_code == 403
    finally:
        stop(gw.proc)
        relay.set_mode("down")


def test_two_workers_on_postgresql_release_requests_held_on_either_through_either(tmp_path, lookalike, adele,
                                                                                  authority, postgres_url):
    workdir = tmp_path / "w"
    gw = start_gateway(workdir, lookalike, policy=policy_file(workdir, lookalike),
                       extra_args=["--workers", "2", "--state", postgres_url])
    try:
        assert sorted(gw.info["workers"]) == ["1", "2"]
        bot = workload_token(lookalike, authority)
        # Each call is a new connection, which the kernel hashes to either worker; so are the API calls.
        marks = [marker() for _ in range(8)]
        calls = [add_password(lookalike, bot, m, gateway=gw) for m in marks]
        for mark in marks:
            [held] = API(gw, adele).wait_for(mark)
            assert API(gw, adele).approve(held["id"], reason="batch").status_code == 200
        assert all(c.result(timeout=10).status_code == 200 for c in calls)
        holders = {w for w in (1, 2) if (gw.recordings / f"audit.w{w}.jsonl").exists()
                   and '"approval_requested"' in (gw.recordings / f"audit.w{w}.jsonl").read_text()}
        assert holders == {1, 2}  # 8 connections over two workers: both held some (odds 2 in 256 otherwise)
    finally:
        stop(gw.proc)
