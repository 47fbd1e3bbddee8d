"""Faults around the real gateway process end in a refusal the client can read, and never in a
request that goes upstream unjudged or goes unrecorded.

Entra and Graph "go down" for one gateway at a time: its ``--resolve`` sends the host to a
loopback relay (tests/e2e/relay.py) that the test stops, stalls or makes reset connections; the
look-alike the other tests share is never touched. Disks fill up for real: the recordings or the
audit trail live on a tiny tmpfs that the test fills (where this machine lets it mount one; the
test is skipped otherwise), and a recordings directory stops being one while the gateway runs.

Cases covered elsewhere: keys unreachable at a cold start (test_gateway.py,
test_unreachable_signing_keys_at_cold_start_answer_503), a broken or deleted policy file
(test_policy_reload.py), a client that disconnects while its request is held for approval
(test_approvals.py, test_client_disconnecting_while_held_cancels_the_request).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from nhi_gateway.lookalike.pki import SERVER_CERT_FILE, SERVER_KEY_FILE, SigningKey

from ..support.e2e import GRAPH, marker, nhi, reached, recorded, until
from ..support.recordings import flows_under
from ..support.relay import MuteServer, Relay
from .conftest import start_gateway, stop

LOGIN = "login.microsoftonline.com"
FAULTY_GATEWAY = Path(__file__).with_name("faulty_gateway.py")
UPSTREAM_TIMEOUT = 2  # seconds, for the gateways of this module that meet a hanging upstream


def get(gw, token: str | None, mark: str, path: str = "/v1.0/users", timeout: float = 30) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(f"{GRAPH}{path}?m={mark}", headers=headers, proxies={"https": gw.proxy()},
                        verify=gw.ca_cert, timeout=timeout)


def audit_lines(path: Path, mark: str) -> list[dict]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if mark in (line.get("url") or "")]


def log_of(gw) -> str:
    return gw.log.read_text(errors="replace")


def start_keeping_records_in(tmp_path: Path, lookalike):
    """A gateway whose recordings, audit trail and approvals database are in ``tmp_path``, for
    a test to break."""
    return start_gateway(tmp_path / "gw", lookalike, env={"PYTHONUNBUFFERED": "1"},
                         extra_args=["--recordings", str(tmp_path / "recordings"),
                                     "--audit", str(tmp_path / "audit.jsonl"),
                                     "--approvals-db", str(tmp_path / "approvals.sqlite3")])


def break_directory(path: Path) -> Callable[[], None]:
    """Make the directory ``path`` unwritable while the gateway runs; returns the repair. Root
    ignores file modes, so it is done the way that stops root too: the directory is replaced by
    a file."""
    away = path.with_name(path.name + ".away")
    path.rename(away)
    path.write_text("not a directory")

    def repair() -> None:
        path.unlink()
        away.rename(path)

    return repair


# --- Entra: signing keys ------------------------------------------------------------------------


def test_keys_already_cached_carry_the_gateway_while_entra_is_down(tmp_path, lookalike, tokens):
    with Relay(("127.0.0.1", lookalike.port)) as entra:
        gw = start_gateway(tmp_path / "gw", lookalike, env={"PYTHONUNBUFFERED": "1"},
                           extra_args=["--resolve", f"{LOGIN}={entra.address}"])
        try:
            assert get(gw, tokens(), marker()).status_code == 200  # keys fetched through the relay
            assert entra.accepted["forward"] >= 1
            entra.set_mode("down")

            for _ in range(3):
                assert get(gw, tokens(), marker()).status_code == 200
            # A kid the cache does not hold makes the gateway look again; Entra is unreachable, so
            # the token is refused, and the keys it had are kept (not dropped with the failed fetch).
            mark = marker()
            r = get(gw, tokens(key=SigningKey.generate()), mark)
            assert r.status_code == 401 and nhi(r)["check"], r.text
            until(lambda: "keeping the last good set" in log_of(gw), "the failed refetch was logged")
            assert get(gw, tokens(), marker()).status_code == 200
            # Keys never fetched (v2 tokens have their own metadata document) cannot be had: 503.
            mark_v2 = marker()
            r = get(gw, tokens(version="2.0"), mark_v2)
            assert r.status_code == 503, r.text
            assert nhi(r)["check"] == "keys_unavailable"
            assert not reached(lookalike, mark) and not reached(lookalike, mark_v2)
        finally:
            stop(gw.proc)


def test_slow_discovery_refuses_503_while_verified_traffic_keeps_flowing(tmp_path, lookalike, tokens):
    """Entra accepts the connection and never answers: the request that needs new keys gets 503
    once the gateway's own fetch times out, is never forwarded, and meanwhile requests whose keys
    are cached are answered: the fetch does not hold up the event loop."""
    with Relay(("127.0.0.1", lookalike.port)) as entra:
        gw = start_gateway(tmp_path / "gw", lookalike, extra_args=["--resolve", f"{LOGIN}={entra.address}"])
        try:
            v1 = tokens()
            assert get(gw, v1, marker()).status_code == 200  # v1 keys cached
            entra.set_mode("stall")

            slow_mark, answer = marker(), {}
            waiting = threading.Thread(target=lambda: answer.update(r=get(gw, tokens(version="2.0"), slow_mark)))
            waiting.start()
            until(lambda: entra.held() > 0, "the gateway's fetch of the v2 keys reached the stalled Entra")
            for _ in range(5):
                assert get(gw, v1, marker()).status_code == 200
            assert waiting.is_alive(), "the key fetch should still be hanging on Entra"

            waiting.join(timeout=40)
            assert not waiting.is_alive()
            r = answer["r"]
            assert r.status_code == 503, r.text
            assert nhi(r)["check"] == "keys_unavailable"
            assert not reached(lookalike, slow_mark)
            line = until(lambda: audit_lines(gw.recordings / "audit.jsonl", slow_mark), "the audit line")[-1]
            assert (line["decision"], line["status"]) == ("deny", 503)
        finally:
            stop(gw.proc)


# --- Graph: down, hanging, resetting --------------------------------------------------------------


@pytest.fixture(scope="module")
def graph_faults(tmp_path_factory, lookalike):
    """A gateway whose Graph is a relay (to the look-alike, or to a server that hangs)."""
    pki = lookalike.state_dir / "pki"
    with Relay(("127.0.0.1", lookalike.port)) as relay, \
            MuteServer(str(pki / SERVER_CERT_FILE), str(pki / SERVER_KEY_FILE), "silent") as silent, \
            MuteServer(str(pki / SERVER_CERT_FILE), str(pki / SERVER_KEY_FILE), "trickle") as trickle:
        gw = start_gateway(tmp_path_factory.mktemp("graph-faults"), lookalike, env={"PYTHONUNBUFFERED": "1"},
                           extra_args=["--resolve", f"graph.microsoft.com={relay.address}",
                                       "--upstream-timeout", str(UPSTREAM_TIMEOUT)])
        try:
            yield gw, relay, {"silent": silent, "trickle": trickle}
        finally:
            stop(gw.proc)


UPSTREAM_FAULTS = {
    # fault: (how the relay behaves, what the audit line's error says)
    "down": ("down", "Connect call failed"),
    "resets connections": ("reset", ""),
    "accepts and never answers (TLS)": ("stall", ""),
    "never answers the request": ("silent", ""),
    "sends half an answer": ("trickle", ""),
}


@pytest.mark.parametrize("fault", list(UPSTREAM_FAULTS))
def test_upstream_fault_answers_502_and_is_audited_and_recorded(graph_faults, lookalike, tokens, fault):
    gw, relay, mute = graph_faults
    mode, error = UPSTREAM_FAULTS[fault]
    if mode in mute:
        relay.set_mode("forward", target=("127.0.0.1", mute[mode].port))
    else:
        relay.set_mode(mode)
    # A reset can land before mitmproxy has even read the connection's peer address (see
    # gateway.answer_lost_connection_attempts): a few tries, so that race is met too.
    try:
        for _ in range(8 if mode == "reset" else 1):
            mark = marker()
            r = get(gw, tokens(), mark)
            assert r.status_code in (502, 504), r.text[:300]
            assert "Adele" not in r.text  # nothing of a directory answer
    finally:
        relay.set_mode("forward", target=("127.0.0.1", lookalike.port))

    line = until(lambda: audit_lines(gw.recordings / "audit.jsonl", mark), "the audit line")[-1]
    assert line["status"] == r.status_code and line["decision"] == "allow" and line["rule"] == "directory-read"
    assert error in (line["error"] or ""), line
    if mode in ("stall", "silent", "trickle"):
        assert "upstream_timeout" in line["flags"]
        assert f"did not answer within {UPSTREAM_TIMEOUT}s" in log_of(gw)
    flows = until(lambda: recorded(gw, mark), "the recording")
    assert flows[-1].error is not None
    assert get(gw, tokens(), marker()).status_code == 200  # and the gateway carries on


def _impostor_pki(directory: Path, lookalike, kind: str) -> tuple[str, str]:
    """A certificate for graph.microsoft.com from a CA nobody trusts (``untrusted``), or one from
    the trusted CA for another name (``wrong-name``); returns (cert file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from nhi_gateway.lookalike import pki

    if kind == "untrusted":
        ca_key, ca_cert = pki.generate_ca("an impostor's CA")
        key, cert = pki.issue_server_cert(ca_key, ca_cert, names=("graph.microsoft.com",), addresses=())
    else:
        state = lookalike.state_dir / "pki"
        ca_key = serialization.load_pem_private_key((state / pki.CA_KEY_FILE).read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((state / pki.CA_CERT_FILE).read_bytes())
        key, cert = pki.issue_server_cert(ca_key, ca_cert, names=("graph.example.net",), addresses=())
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / f"{kind}.pem", directory / f"{kind}.key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(pki._private_key_pem(key))
    return str(cert_file), str(key_file)


@pytest.mark.parametrize("kind", ["untrusted", "wrong-name"])
def test_an_upstream_whose_certificate_does_not_verify_gets_nothing(graph_faults, lookalike, tokens, tmp_path, kind):
    """Someone who can redirect Graph's name (DNS, a proxy on the way) must not receive the request,
    and with it the caller's token: the gateway verifies the upstream's certificate and name."""
    gw, relay, _ = graph_faults
    with MuteServer(*_impostor_pki(tmp_path, lookalike, kind), "silent") as impostor:
        relay.set_mode("forward", target=("127.0.0.1", impostor.port))
        try:
            mark = marker()
            r = get(gw, tokens(), mark)
        finally:
            relay.set_mode("forward", target=("127.0.0.1", lookalike.port))
        assert r.status_code == 502, r.text[:300]
        assert impostor.requests == 0  # the TLS handshake failed: no request, no token reached it
    line = until(lambda: audit_lines(gw.recordings / "audit.jsonl", mark), "the audit line")[-1]
    assert line["status"] == 502 and "certificate" in (line["error"] or "").lower(), line
    assert until(lambda: recorded(gw, mark), "the recording")[-1].error is not None
    assert get(gw, tokens(), marker()).status_code == 200


BODY_LIMIT = 32 * 2**20  # gateway.BODY_SIZE_LIMIT


def test_a_response_over_the_body_limit_is_not_relayed(graph_faults, lookalike, tokens):
    """Masking needs the whole body: a response larger than the limit is refused (502), never
    streamed to the client unmasked."""
    gw, relay, _ = graph_faults
    pki = lookalike.state_dir / "pki"
    with MuteServer(str(pki / SERVER_CERT_FILE), str(pki / SERVER_KEY_FILE), "huge", BODY_LIMIT + 2**20) as huge:
        relay.set_mode("forward", target=("127.0.0.1", huge.port))
        try:
            mark = marker()
            r = get(gw, tokens(), mark, timeout=60)
        finally:
            relay.set_mode("forward", target=("127.0.0.1", lookalike.port))
    assert huge.requests == 1  # Graph was asked (the request was allowed) ...
    assert r.status_code == 502 and len(r.content) < 10_000, (r.status_code, len(r.content))  # ... its answer withheld
    line = until(lambda: audit_lines(gw.recordings / "audit.jsonl", mark), "the audit line")[-1]
    assert line["status"] == 502 and line["error"], line
    assert until(lambda: recorded(gw, mark), "the recording")[-1].error is not None
    assert get(gw, tokens(), marker()).status_code == 200


def test_a_request_body_over_the_limit_never_reaches_graph(graph_faults, lookalike, tokens):
    gw, _, _ = graph_faults
    mark = marker()
    try:
        r = requests.post(f"{GRAPH}/v1.0/users?m={mark}", data=b"x" * (BODY_LIMIT + 2**20),
                          headers={"Authorization": f"Bearer {tokens()}", "Content-Type": "application/json"},
                          proxies={"https": gw.proxy()}, verify=gw.ca_cert, timeout=60)
        status = r.status_code
    except requests.exceptions.ConnectionError:
        status = None  # mitmproxy answered 413 and closed while the client was still sending
    assert status in (413, None), status
    assert not reached(lookalike, mark)
    line = until(lambda: audit_lines(gw.recordings / "audit.jsonl", mark), "the audit line")[-1]
    assert line["decision"] == "deny" and "body_size_limit" in (line["error"] or ""), line
    assert get(gw, tokens(), marker()).status_code == 200


# --- the record cannot be written ---------------------------------------------------------------


class Tmpfs:
    """A tiny tmpfs at ``path`` (skips the test where mounting is not allowed)."""

    def __init__(self, path: Path, size: str = "256k") -> None:
        path.mkdir(parents=True, exist_ok=True)
        try:
            out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True, text=True, timeout=30)
        except OSError as e:
            pytest.skip(f"cannot mount a tmpfs here: {e}")
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        with open(self.filler, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def refused_for(check: str):
    def predicate(r: requests.Response) -> bool:
        return r.status_code == 503 and nhi(r)["check"] == check
    return predicate


def write_ahead_flows(recordings: Path) -> list:
    """Every flow in the write-ahead logs (request halves, as they were forwarded)."""
    return flows_under(recordings, "*.wal")


def first_refusal(gw, tokens, check: str, tries: int = 20) -> tuple[requests.Response, str]:
    """Send allowed requests until one is refused for ``check`` (a full tmpfs still takes what fits
    in the pages a file already has); every one before it was answered normally."""
    for _ in range(tries):
        mark = marker()
        r = get(gw, tokens(), mark)
        if refused_for(check)(r):
            return r, mark
        assert r.status_code == 200, r.text[:300]
    pytest.fail(f"no request was refused for {check} in {tries} tries")


def status_of(gw, token: str, mark: str) -> int:
    """The status a client gets, also when the gateway refuses the CONNECT itself (clients
    report that as a proxy error and hide the body)."""
    try:
        return get(gw, token, mark).status_code
    except requests.exceptions.ProxyError as e:
        found = re.search(r"Tunnel connection failed: (\d{3})", str(e))
        if found is None:
            raise
        return int(found[1])


def connect_refusal(gw) -> tuple[int, dict]:
    """A CONNECT sent by hand, to read the body of its refusal."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"CONNECT graph.microsoft.com:443 HTTP/1.1\r\nHost: graph.microsoft.com:443\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data and (chunk := s.recv(65536)):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                       if h.lower().startswith(b"content-length:")), 0)
        while len(body) < length and (chunk := s.recv(65536)):
            body += chunk
    return int(head.split()[1]), json.loads(body) if body else {}


def assert_refuses_until_recovered(gw, lookalike, tokens, component: str, recover) -> None:
    """With ``component`` failing: new requests are refused before they go anywhere (from the
    CONNECT on); once the cause is gone, requests are answered again."""
    status, body = connect_refusal(gw)
    assert status == 503, body
    assert body["error"]["innerError"]["nhi-gateway"]["check"] == "health"
    assert component in body["error"]["message"]
    mark = marker()
    assert status_of(gw, tokens(), mark) == 503
    assert not reached(lookalike, mark)
    recover()
    # The first request after recovery is still refused (health is only restored by a write that
    # works, the record of that very refusal); the next one is answered.
    until(lambda: status_of(gw, tokens(), marker()) == 200, f"{component} recovered")
    assert f"{component} recovered; requests are judged again" in log_of(gw)


def test_recordings_disk_full_refuses_new_requests_503(tmp_path, lookalike, tokens):
    recordings = tmp_path / "recordings"
    disk = Tmpfs(recordings)
    gw = start_keeping_records_in(tmp_path, lookalike)
    gw.recordings = recordings
    try:
        assert get(gw, tokens(), marker()).status_code == 200
        disk.fill()

        r, mark = first_refusal(gw, tokens, "recording")
        assert r.json()["error"]["code"] == "ServiceUnavailable"
        assert "could not record" in r.json()["error"]["message"]
        log = log_of(gw)
        assert "recording is failing" in log and "All new requests are refused until it recovers" in log
        lines = audit_lines(tmp_path / "audit.jsonl", mark)
        if reached(lookalike, mark):
            # Its request half still fitted in the write-ahead log (a full tmpfs takes what fits in
            # pages a file already has): the allow, amended by the 503 once the answer could not be.
            assert [line["status"] for line in lines] == [200, 503] and "amends" in lines[-1]
            assert any(mark in f.request.path for f in write_ahead_flows(recordings))
        else:
            assert [line["status"] for line in lines] == [503]  # refused before it was forwarded

        assert_refuses_until_recovered(gw, lookalike, tokens, "recording", disk.free)
    finally:
        stop(gw.proc)
        disk.unmount()


def test_a_request_at_graph_is_on_record_even_if_the_gateway_dies_before_the_answer(tmp_path, lookalike, tokens):
    """The write-ahead log: what the gateway forwarded is on disk before Graph sees it, so a
    gateway killed (SIGKILL: no chance to write anything) while Graph works leaves its record,
    with the decision and without the caller's token."""
    import signal

    pki = lookalike.state_dir / "pki"
    with MuteServer(str(pki / SERVER_CERT_FILE), str(pki / SERVER_KEY_FILE), "slow", delay=30) as graph:
        gw = start_gateway(tmp_path / "gw", lookalike, extra_args=["--resolve", f"graph.microsoft.com={graph.address}"])
        token = tokens()
        mark = marker()
        try:
            call = threading.Thread(target=lambda: _ignore_errors(lambda: get(gw, token, mark, timeout=60)), daemon=True)
            call.start()
            until(lambda: graph.requests == 1, "the request reached Graph")
            gw.proc.send_signal(signal.SIGKILL)
            gw.proc.wait(30)
        finally:
            stop(gw.proc)
    [ahead] = [f for f in write_ahead_flows(gw.recordings) if mark in f.request.path]
    assert ahead.response is None  # the request half: Graph had not answered
    assert ahead.metadata["nhi"]["action"] == "allow" and ahead.metadata["nhi"]["rule"]
    assert ahead.comment.startswith("FORWARDING")
    on_disk = b"".join(p.read_bytes() for p in gw.recordings.rglob("*.wal"))
    assert token.encode() not in on_disk and token.split(".")[2].encode() not in on_disk


def _ignore_errors(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - the gateway is killed under this request
        pass


def test_recordings_directory_not_writable_refuses_new_requests_503(tmp_path, lookalike, tokens):
    recordings = tmp_path / "recordings"
    gw = start_keeping_records_in(tmp_path, lookalike)
    try:
        recover = break_directory(recordings)
        mark = marker()
        r = get(gw, tokens(), mark)
        assert r.status_code == 503 and nhi(r)["check"] == "recording", r.text
        assert "before forwarding" in r.json()["error"]["message"]
        assert not reached(lookalike, mark)  # the first request after the failure never left the gateway
        assert "recording is failing" in log_of(gw)
        assert_refuses_until_recovered(gw, lookalike, tokens, "recording", recover)
    finally:
        stop(gw.proc)


def test_audit_write_failure_refuses_new_requests_503(tmp_path, lookalike, tokens):
    trail = tmp_path / "trail"
    disk = Tmpfs(trail, size="64k")
    audit = trail / "audit.jsonl"
    gw = start_gateway(tmp_path / "gw", lookalike, env={"PYTHONUNBUFFERED": "1"}, extra_args=["--audit", str(audit)])
    try:
        assert get(gw, tokens(), marker()).status_code == 200
        disk.fill()

        r, mark = first_refusal(gw, tokens, "audit")
        assert "could not write the audit trail" in r.json()["error"]["message"]
        assert "audit is failing" in log_of(gw)
        assert_refuses_until_recovered(gw, lookalike, tokens, "audit", disk.free)
        # What happened while the trail could not be written is in the recording.
        assert recorded(gw, mark)
    finally:
        stop(gw.proc)
        disk.unmount()


# --- an exception inside each addon -------------------------------------------------------------

# addon: (the client's status, whether the request reached Graph before the fault)
ADDON_FAULTS = {
    "identity": (500, False),
    "membership": (500, False),
    "authorization": (500, False),
    "approval": (500, False),
    "guard": (500, False),
    "masking": (500, True),  # response side: Graph answered, the answer is withheld
    "audit": (500, True),
    "recorder": (500, False),  # its write-ahead fails first: refused before Graph sees it
}


@pytest.mark.parametrize("addon", list(ADDON_FAULTS))
def test_an_exception_in_an_addon_refuses_the_request(tmp_path, lookalike, tokens, addon):
    status, forwarded = ADDON_FAULTS[addon]
    gw = start_gateway(tmp_path / "gw", lookalike, command=[sys.executable, str(FAULTY_GATEWAY), addon])
    try:
        mark = marker()
        r = get(gw, tokens(), mark)
        assert r.status_code == status, r.text[:300]
        assert "Adele" not in r.text and "displayName" not in r.text  # nothing of Graph's answer
        assert reached(lookalike, mark) is forwarded
        if status == 500:
            assert r.json()["error"]["code"] == "GatewayError"
            assert nhi(r)["stage"] == "error"
            assert "injected fault" in log_of(gw)
        if addon != "recorder":  # (whose fault is that it cannot record)
            flow = until(lambda: recorded(gw, mark), "the recording")[-1]
            assert flow.error is not None if status == 502 else flow.response.status_code == status
        if addon != "audit":
            # The trail ends with what the client got (for the recorder: an amendment of the allow).
            line = until(lambda: audit_lines(gw.recordings / "audit.jsonl", mark), "the audit line")[-1]
            assert line["status"] == status and (line["decision"] == "deny" or line["error"]), line
        assert gw.proc.poll() is None
    finally:
        stop(gw.proc)


def test_an_exception_in_the_approval_api_refuses_the_call(tmp_path, lookalike, tokens):
    gw = start_gateway(tmp_path / "gw", lookalike, command=[sys.executable, str(FAULTY_GATEWAY), "approvals_api"])
    try:
        r = requests.get(f"{gw.info['approvals_api']}/approvals", headers={"Authorization": f"Bearer {tokens()}"},
                         proxies={"http": "", "https": ""}, timeout=20)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["code"] == "GatewayError"
    finally:
        stop(gw.proc)


NO_USER_READS = """
  - id: no-user-reads
    action: deny
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users/**"]
"""


def test_an_exception_in_the_policy_watcher_keeps_the_policy_in_force(tmp_path, lookalike, tokens):
    from .conftest import EXAMPLE_POLICY

    policy = tmp_path / "policy.yaml"
    policy.write_text(EXAMPLE_POLICY.read_text() + NO_USER_READS)
    gw = start_gateway(tmp_path / "gw", lookalike, policy=policy, env={"PYTHONUNBUFFERED": "1"},
                       command=[sys.executable, str(FAULTY_GATEWAY), "reload"])
    try:
        assert get(gw, tokens(), marker()).status_code == 403
        policy.write_text(EXAMPLE_POLICY.read_text())  # an edit that would allow user reads
        until(lambda: "policy reload: unexpected error" in log_of(gw), "the watcher's failure was logged")
        mark = marker()
        r = get(gw, tokens(), mark)
        assert r.status_code == 403 and nhi(r)["rule"] == "no-user-reads"
        assert not reached(lookalike, mark)
    finally:
        stop(gw.proc)


# --- a client that goes away mid-request --------------------------------------------------------


def test_client_disconnecting_mid_request_sends_nothing_upstream(gateway, lookalike, tokens):
    mark = marker()
    s = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    s.sendall(b"CONNECT graph.microsoft.com:443 HTTP/1.1\r\nHost: graph.microsoft.com:443\r\n\r\n")
    assert b" 200 " in s.recv(65536)
    tls = ssl.create_default_context(cafile=gateway.ca_cert).wrap_socket(s, server_hostname="graph.microsoft.com")
    # A request the policy would allow, cut off after its headers and part of its body.
    tls.sendall(f"GET /v1.0/users?m={mark} HTTP/1.1\r\nHost: graph.microsoft.com\r\n"
                f"Authorization: Bearer {tokens()}\r\nContent-Type: application/json\r\n"
                f"Content-Length: 1000\r\n\r\n{{\"partial\": ".encode())
    time.sleep(0.3)
    tls.close()

    line = until(lambda: audit_lines(gateway.recordings / "audit.jsonl", mark), "the audit line")[-1]
    assert line["error"] and line["status"] != 200
    assert not reached(lookalike, mark)
    assert requests.get(f"{GRAPH}/v1.0/users?m={marker()}", headers={"Authorization": f"Bearer {tokens()}"},
                        proxies={"https": gateway.proxy()}, verify=gateway.ca_cert, timeout=20).status_code == 200


def test_a_flow_that_reached_graph_is_recorded_in_part_when_it_cannot_be_in_full(tmp_path, lookalike, tokens):
    """Recording an already-forwarded flow cannot fail silently: what reached Graph is on record
    (without its bodies, the comment saying why) and audited as it was; the client gets its answer."""
    gw = start_gateway(tmp_path / "gw", lookalike, command=[sys.executable, str(FAULTY_GATEWAY), "recorder-bodies"])
    try:
        mark = marker()
        r = get(gw, tokens(), mark)
        assert r.status_code == 200, r.text[:300]
        assert reached(lookalike, mark)
        flow = until(lambda: recorded(gw, mark), "the recording")[-1]
        assert "recorded in part" in flow.comment and "injected fault" in flow.comment
        assert flow.response.status_code == 200 and not flow.response.raw_content
        line = until(lambda: audit_lines(gw.recordings / "audit.jsonl", mark), "the audit line")[-1]
        assert line["status"] == 200 and line["decision"] == "allow"
        assert "recorded in part" in log_of(gw)
    finally:
        stop(gw.proc)


def test_a_connect_refused_after_its_token_was_verified_leaves_no_identity_on_the_connection(
        tmp_path, lookalike, tokens):
    """The proxy token of a CONNECT is verified, then the guard refuses the CONNECT (the records
    are failing). mitmproxy keeps the connection open: a request sent on it afterwards, in
    absolute form without any token, must not ride on the identity of the refused CONNECT."""
    import base64

    recordings = tmp_path / "recordings"
    gw = start_keeping_records_in(tmp_path, lookalike)
    try:
        repair = break_directory(recordings)

        def status() -> int:
            try:
                return get(gw, tokens(), marker()).status_code
            except requests.exceptions.ProxyError:
                return 503  # the CONNECT itself was refused

        until(lambda: status() == 503, "the records fail")
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        credentials = base64.b64encode(f"agent:{tokens()}".encode())
        s.sendall(b"CONNECT graph.microsoft.com:443 HTTP/1.1\r\nHost: graph.microsoft.com:443\r\n"
                  b"Proxy-Authorization: Basic " + credentials + b"\r\n\r\n")
        time.sleep(0.5)
        assert s.recv(65536).startswith(b"HTTP/1.1 503"), "the guard refuses the CONNECT"
        repair()
        until(lambda: status() == 200, "the gateway recovers")

        mark = marker()
        s.sendall(f"GET https://graph.microsoft.com/v1.0/users?m={mark} HTTP/1.1\r\n"
                  "Host: graph.microsoft.com\r\n\r\n".encode())
        time.sleep(1)
        answer = s.recv(65536)
        s.close()
        assert answer.split(b" ", 2)[1] in (b"401", b"407", b"421"), answer[:300]
        assert not reached(lookalike, mark)
    finally:
        stop(gw.proc)
