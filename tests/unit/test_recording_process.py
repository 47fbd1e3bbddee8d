"""Recording in a child process: the same files as in-process recording, every flow confirmed
before its answer goes out, and no flow lost or answered unrecorded when either process dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from mitmproxy.test import tflow

from nhi_gateway.recording import process as recording_process
from nhi_gateway.policy.decision import set_decision
from nhi_gateway.addons.guard import Health
from nhi_gateway.addons.recorder import RECORDED_KEY, Recorder
from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.recording.process import RecordingFailed, RecordingProcess

from ..support.recordings import flows_under

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
OID = "0b1c2d3e-0000-4000-8000-000000000042"
PRINCIPAL = {"tenant_id": TENANT, "object_id": OID, "app_id": "5e0b1683-de22-5eac-9334-fb85a741f6ff",
             "display_name": "mcp-directory", "roles": ["User.Read.All"]}
JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL2dyYXBoIn0.c2lnbmF0dXJl"
ALLOWED = Decision(Action.ALLOW, Stage.POLICY, "allowed by rule 'directory-read'", rule_id="directory-read",
                   operation="GET graph.microsoft.com /v1.0/users", principal=PRINCIPAL)


def flow_on(base=None):
    f = tflow.tflow(resp=True)
    if base is not None:
        f.client_conn, f.server_conn = base.client_conn, base.server_conn
    f.request.headers["Authorization"] = f"Bearer {JWT}"
    f.response.headers["content-type"] = "application/json"
    f.response.content = b'{"value":[{"id":"1","displayName":"Ada","secretText":"x"}]}'
    set_decision(f, ALLOWED)
    return f


@pytest.fixture
async def child(tmp_path):
    process = RecordingProcess(tmp_path / "rec", fsync_interval=0.05)
    await process.start()
    yield process
    await process.close()


async def test_the_child_writes_what_in_process_recording_writes(tmp_path):
    base = flow_on()
    flows = [flow_on(base) for _ in range(3)] + [flow_on()]
    flows[1].metadata["nhi.refused"] = True
    inproc = Recorder(tmp_path / "in", Health())
    for f in flows:
        inproc.record_now(f)
    inproc.done()
    child = Recorder(tmp_path / "child", Health(), separate_process=True)
    await child.running()
    for f in flows:
        await child.response(f)
    await child.done()

    a, b = flows_under(tmp_path / "in"), flows_under(tmp_path / "child")
    assert [x.id for x in b] == [f.id for f in flows]
    for x, y in zip(a, b):
        sx, sy = x.get_state(), y.get_state()
        for s in (sx, sy):  # written at different instants
            s["server_conn"].pop("id"), s["client_conn"].pop("id")
        assert sx == sy
    assert b[0].request.headers["Authorization"] == "Bearer [redacted]"
    assert sorted(p.relative_to(tmp_path / "in") for p in (tmp_path / "in").rglob("*.mitm")) == \
        sorted(p.relative_to(tmp_path / "child") for p in (tmp_path / "child").rglob("*.mitm"))
    assert all(f.metadata[RECORDED_KEY] for f in flows)


async def test_a_connection_is_sent_once_and_again_when_it_changes(child, tmp_path):
    base = flow_on()
    first = flow_on(base)
    first_end = base.server_conn.timestamp_end
    await child.record(first)
    assert len(child._conns.entries) == 2
    second = flow_on(base)
    second.server_conn.timestamp_end = 1234.5  # the upstream closed it meanwhile
    third = flow_on(base)
    for f in (second, third):
        await child.record(f)
    back = flows_under(tmp_path / "rec")
    assert [f.server_conn.timestamp_end for f in back] == [first_end, 1234.5, 1234.5]
    assert len({f.server_conn.id for f in back}) == 1


async def test_live_objects_in_metadata_stay_behind(child, tmp_path):
    f = flow_on()
    f.metadata["live"] = threading.Lock()  # a live object on top
    f.metadata["nested"] = {"ok": 1, "lock": threading.Lock()}  # and one deep inside
    f.metadata["plain"] = {"kept": [1, "two", b"three"]}
    f.metadata["proxyauth"] = ("mcp", JWT)  # mitmproxy's own: the password is the token
    await child.record(f)
    (back,) = flows_under(tmp_path / "rec")
    assert back.metadata["plain"] == {"kept": [1, "two", b"three"]}
    assert not {"live", "nested", "proxyauth"} & set(back.metadata)


async def test_a_killed_child_fails_what_it_had_not_confirmed_and_the_next_flow_starts_another(child, tmp_path, monkeypatch):
    monkeypatch.setattr(recording_process, "RESTART_INTERVAL", 0.0)
    await child.record(flow_on())
    first_pid = child.pid
    os.kill(first_pid, signal.SIGSTOP)
    pending = asyncio.ensure_future(child.record(flow_on()))
    await asyncio.sleep(0.1)
    assert not pending.done()  # held: no answer before the record is confirmed
    os.kill(first_pid, signal.SIGKILL)
    with pytest.raises(OSError, match="recording process stopped"):
        await asyncio.wait_for(pending, 30)
    await child.record(flow_on())  # a new child
    assert child.pid != first_pid
    assert len(flows_under(tmp_path / "rec")) == 2


async def test_a_child_is_restarted_at_most_once_a_second(child):
    os.kill(child.pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    child._last_start = time.monotonic()  # as if it had just been started
    with pytest.raises(OSError, match="at most once a second"):
        await child.record(flow_on())


async def test_a_flow_not_confirmed_in_time_is_failed(tmp_path, monkeypatch):
    monkeypatch.setattr(recording_process, "_WATCHDOG_INTERVAL", 0.05)
    process = RecordingProcess(tmp_path / "rec", confirm_timeout=0.3)
    await process.start()
    os.kill(process.pid, signal.SIGSTOP)  # a disk that stalls
    try:
        with pytest.raises(OSError, match="did not confirm the flow within 0.3s"):
            await asyncio.wait_for(process.record(flow_on()), 30)
    finally:
        os.kill(process.pid, signal.SIGCONT)
        await process.close()


async def test_a_directory_the_child_cannot_write_is_named(tmp_path):
    blocked = tmp_path / "recordings"
    blocked.write_text("a file where the directory should be")
    health, refused = Health(), []
    r = Recorder(blocked, health, on_refusal=refused.append, separate_process=True)
    await r.running()
    f = flow_on()
    await r.response(f)
    await r.done()
    assert f.response.status_code == 503
    assert refused == [f]
    assert str(blocked) in health.problems["recording"]
    assert RECORDED_KEY not in f.metadata


async def test_a_bug_in_the_child_refuses_the_flow(tmp_path):
    health, refused = Health(), []
    r = Recorder(tmp_path / "rec", health, on_refusal=refused.append, separate_process=True)
    await r.running()
    f = flow_on()
    # The gateway believes the child knows this connection; it does not: the child cannot build
    # the record, says so, and the flow is refused as an internal error, not answered unrecorded.
    r.process._conns.use(f.server_conn.id, recording_process.connection_snapshot(f.server_conn))
    with pytest.raises(RecordingFailed):
        await r.process.record(flow_on(f))
    await r.response(f)
    await r.done()
    assert f.response.status_code == 500
    assert refused == [f]


_DYING_GATEWAY = textwrap.dedent("""
    import asyncio, os, sys
    from mitmproxy.test import tflow
    from nhi_gateway.recording.process import RecordingProcess

    async def main():
        process = RecordingProcess(sys.argv[1])
        await process.start()
        print(process.pid, flush=True)
        for _ in range(5):  # confirmed: answered
            await process.record(tflow.tflow(resp=True))
        for _ in range(5):  # handed over, never confirmed: the gateway dies first
            asyncio.ensure_future(process.record(tflow.tflow(resp=True)))
        await asyncio.sleep(0)  # the records take their turn: each queues its frame
        await asyncio.sleep(0)  # the frames of that turn go to the pipe, in one write
        os._exit(9)

    asyncio.run(main())
""")


def test_flows_handed_over_are_written_when_the_gateway_dies(tmp_path):
    out = subprocess.run([sys.executable, "-c", _DYING_GATEWAY, str(tmp_path / "rec")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 9, out.stderr
    child = int(out.stdout.split()[0])
    deadline = 60.0
    while deadline > 0:  # it sees the end of its input, writes the rest and exits by itself
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        deadline -= 0.05
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the recording process outlived the gateway")
    assert len(flows_under(tmp_path / "rec")) == 10


async def test_closing_waits_for_every_flow_and_the_child_exits(child, tmp_path):
    flows = [flow_on() for _ in range(50)]
    results = await asyncio.gather(*(child.record(f) for f in flows))
    proc = child._proc
    await child.close()
    assert proc.returncode == 0
    assert len(set(results)) == 1
    assert [f.id for f in flows_under(tmp_path / "rec")] == [f.id for f in flows]


async def test_a_large_flow_goes_through_the_pipe(child, tmp_path):
    f = flow_on()
    f.response.headers["content-type"] = "application/octet-stream"
    f.response.content = os.urandom(6 * 2**20)  # more than the pipe and the drain threshold
    await child.record(f)
    (back,) = flows_under(tmp_path / "rec")
    assert back.response.content == f.response.content


def _serve_in_thread(directory: Path, fsync_interval: float):
    """The child's loop in this process, on pipes, so its disk can be made to fail."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    worker = threading.Thread(target=recording_process.serve,
                              args=(directory, 64 * 2**20, False, fsync_interval, to_child_r, from_child_w))
    worker.start()
    return worker, to_child_w, os.fdopen(from_child_r, "rb")


def _send_flow(fd: int, seq: int, f) -> None:
    import marshal

    conns = marshal.dumps(tuple((c.id, c.get_state()) for c in (f.client_conn, f.server_conn)))
    os.write(fd, recording_process.flow_frame(seq, conns, marshal.dumps(recording_process.flow_state(f))))


def _confirmation(reader):
    import marshal

    (size,) = recording_process._HEADER.unpack(reader.read(recording_process._HEADER.size))
    return marshal.loads(reader.read(size))


def test_flows_are_confirmed_before_the_fsync_and_a_failed_fsync_fails_the_next_flow(tmp_path, monkeypatch):
    from nhi_gateway.recording import files as recordings

    failing, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    entered = threading.Event()

    def fsync(fd):
        if failing.is_set():
            entered.set()
            release.wait(30)  # a slow disk: the flow's confirmation must not wait for this
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(recordings.os, "fsync", fsync)
    worker, to_child, from_child = _serve_in_thread(tmp_path / "rec", fsync_interval=0.01)
    try:
        assert _confirmation(from_child) == (0, "ready", "")
        _send_flow(to_child, 1, flow_on())
        assert _confirmation(from_child)[:2] == (1, "ok")
        time.sleep(0.1)  # synced while idle; and the interval has passed again
        failing.set()
        _send_flow(to_child, 2, flow_on())
        assert _confirmation(from_child)[:2] == (2, "ok")  # confirmed before (or while) its fsync runs
        assert entered.wait(30)
        release.set()
        failing.clear()
        _send_flow(to_child, 3, flow_on())
        seq, status, detail = _confirmation(from_child)
        assert (seq, status) == (3, "oserror") and "cannot sync" in detail and "Input/output error" in detail
        _send_flow(to_child, 4, flow_on())
        assert _confirmation(from_child)[:2] == (4, "ok")
    finally:
        release.set()
        os.close(to_child)
        worker.join(30)
        from_child.close()
    assert not worker.is_alive()


NOT_UTF8 = {
    "host": lambda f: setattr(f.request, "host", "gr\udcffaph.microsoft.com"),
    "path": lambda f: setattr(f.request.data, "path", b"/v1.0/users?x=\xff\xfe"),
    "authority": lambda f: setattr(f.request.data, "authority", b"gr\xffaph.microsoft.com"),
    "sni": lambda f: setattr(f.client_conn, "sni", "gr\udcffaph"),
    "a lone surrogate that is no escaped byte": lambda f: setattr(f.request, "host", "gr\ud800aph"),
}


@pytest.mark.parametrize("where", list(NOT_UTF8))
async def test_text_that_is_not_utf8_is_recorded_escaped_in_and_out_of_process(child, tmp_path, where):
    """A host, target or SNI holding bytes that are not UTF-8 never keeps a flow from its
    recording (a refusal a hostile client could provoke at will, leaving no record)."""
    f = flow_on()
    NOT_UTF8[where](f)
    await child.record(f)
    recorder = Recorder(tmp_path / "inproc", Health())
    g = flow_on()
    NOT_UTF8[where](g)
    recorder.record_now(g)
    recorder.close()
    for root in (tmp_path / "rec", tmp_path / "inproc"):
        written = flows_under(root)
        assert len(written) == 1
        if where in ("host", "sni"):
            assert "gr\\xffaph" in (written[0].request.host + str(written[0].client_conn.sni))
            assert written[0].metadata.get("nhi.escaped") or where == "sni"


# --- a request is sent once: its write-ahead record, then the whole flow without it --------------


def _state_less_ids(flow) -> dict:
    state = flow.get_state()
    for key in ("server_conn", "client_conn"):  # written at different instants
        state[key].pop("id")
    return state


def _request_sent(process: RecordingProcess) -> list[bool]:
    """Whether each frame handed to ``process`` from now on carries its flow's request."""
    sent = []
    original = recording_process.flow_state

    def spy(flow, with_request=True):
        sent.append(with_request)
        return original(flow, with_request)

    recording_process.flow_state = spy
    return sent


@pytest.fixture
def restore_flow_state():
    original = recording_process.flow_state
    yield
    recording_process.flow_state = original


async def test_a_flow_written_ahead_is_recorded_whole_without_sending_its_request_again(
        child, tmp_path, restore_flow_state):
    f = flow_on()
    f.request.method, f.request.content = "POST", b'{"displayName":"Ada","passwordProfile":{"password":"hunter2"}}'
    f.request.headers["content-type"] = "application/json"
    whole = Recorder(tmp_path / "in", Health())
    whole.record_now(f)
    whole.done()
    sent = _request_sent(child)
    response, f.response = f.response, None  # written ahead before Graph answers
    await child.record(f, recording_process.WRITE_AHEAD)
    f.response = response
    await child.record(f)
    assert sent == [True, False]
    (ahead,) = flows_under(tmp_path / "rec", "*.wal")
    (recorded,) = flows_under(tmp_path / "rec")
    assert ahead.response is None and ahead.request.content == recorded.request.content
    assert b"hunter2" not in recorded.request.content  # redacted once, for both records
    (expected,) = flows_under(tmp_path / "in")
    assert _state_less_ids(recorded) == _state_less_ids(expected)


async def test_a_request_changed_after_its_write_ahead_is_sent_again(child, tmp_path, restore_flow_state):
    f = flow_on()
    sent = _request_sent(child)
    await child.record(f, recording_process.WRITE_AHEAD)
    f.request.headers["x-changed"] = "after the write-ahead"
    await child.record(f)
    assert sent == [True, True]
    (recorded,) = flows_under(tmp_path / "rec")
    assert recorded.request.headers["x-changed"] == "after the write-ahead"


async def test_a_child_that_no_longer_keeps_the_request_gets_the_whole_flow(child, tmp_path, restore_flow_state):
    written, forgotten = flow_on(), flow_on()
    await child.record(written, recording_process.WRITE_AHEAD)
    # As if the child had let the request go (it keeps a bounded number) while the gateway did not.
    child._ahead[forgotten.id] = recording_process.request_fingerprint(forgotten.request)
    sent = _request_sent(child)
    await child.record(forgotten)
    await child.record(written)
    assert sent == [False, True, False]  # refused as forgotten, then sent whole
    recorded = flows_under(tmp_path / "rec")
    assert [x.id for x in recorded] == [forgotten.id, written.id]
    assert all(x.request.headers["Authorization"] == "Bearer [redacted]" for x in recorded)


async def test_a_new_child_gets_whole_flows(child, tmp_path, restore_flow_state):
    f = flow_on()
    await child.record(f, recording_process.WRITE_AHEAD)
    await child.close()
    await child.start()
    sent = _request_sent(child)
    await child.record(f)
    assert sent == [True]
    (recorded,) = flows_under(tmp_path / "rec")
    assert recorded.response is not None and recorded.request.headers["Authorization"] == "Bearer [redacted]"
