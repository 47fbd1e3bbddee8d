"""Recording in a process of its own, so that the proxy's event loop never serialises a flow.

Redacting a flow and writing it in mitmproxy's format (tnetstring) is pure Python and took the
event loop about a quarter of its time per request. mitmproxy runs on one thread, so that was a
quarter of the gateway's throughput, while the machine's other cores sat idle. The gateway hands
each flow over a pipe, as plain data, to a child process that runs the same recording code
(:meth:`nhi_gateway.addons.recorder.Recorder.record_now`), and the client gets its answer only once
the child confirms that the flow is written. So what the in-process recorder promised still holds:

- no answer without its record: a flow the child cannot write (full disk, a bug) is reported back
  and refused (503), as before;
- nothing is lost on a crash: a killed gateway leaves the flows already handed over in the pipe,
  and the child writes them all before it sees the end of its input and exits; a killed child
  fails every flow it had not confirmed (each refused, none answered unrecorded), and the next
  flow starts a new child;
- the same files, rotation, fsync interval, torn-tail recovery, redaction and annotations, since
  it is the same code.

Only plain data crosses the pipe (``marshal``: dicts, lists, tuples, bytes, str, numbers): the
flow's state less its connections, the ``flow.metadata`` entries that are plain data (live objects
such as the principal stay in the gateway, as they would stay out of the recording anyway), and
each connection's state the first time it is seen and whenever it changes. Both ends keep the same
bounded table of connection states, updated in the same order, so a connection seen before is sent
as its id alone. The pipe carries credentials unredacted (the child redacts them); it exists only
between the two processes, which run as the same user.

Frames both ways start with a 4-byte big-endian length of the rest. Gateway to child: the flow's
sequence number (8 bytes), the length of the connections part (4 bytes), its kind (1 byte: the
answered flow, the request half for the write-ahead log, or the answered flow without its
request), the connections part (``marshal`` of ``((client_id, state | None), (server_id, state |
None))``), then the flow's state (``marshal``). Child to gateway, a ``marshal`` payload:
``(seq, status, detail)`` with status ``ok`` (detail: the file written), ``oserror`` (detail: why),
``error`` (a bug; detail: the exception's type) or ``resend`` (a flow sent without its request, which
the child no longer has: send it whole), and ``(0, "ready" | "oserror", detail)`` once at start.

A request is sent, redacted and encoded once: the child keeps the request half of each flow it
wrote ahead, by flow id, for the flow's whole record, and the gateway sends that record without the
request when the request has not changed since (:func:`request_fingerprint`). Both ends keep the
same bounded table (:data:`KEPT_REQUESTS`); a new child starts with none.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import marshal
import os
import select
import signal
import struct
import sys
import time
from collections import OrderedDict
from pathlib import Path

from mitmproxy import flow as mflow
from mitmproxy import http

from nhi_gateway.recording.flowformat import escape_unencodable
from nhi_gateway.recording.files import DEFAULT_FSYNC_INTERVAL, DEFAULT_MAX_BYTES, ConnectionTable, connection_snapshot

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")  # frame length
_FLOW_PREFIX = struct.Struct("!QIB")  # a flow's frame, after its length: seq, length of the connections part, kind
# Kinds of flow frames: the answered flow for the recordings; the request half, before it is
# forwarded; the answered flow without its request, which is the one written ahead (unchanged).
RECORD, WRITE_AHEAD, RECORD_AFTER_AHEAD = 0, 1, 2
# Requests written ahead that both ends remember, by flow id, until their flow's record (the most
# recent, so flows in flight; beyond that a record carries its request again).
KEPT_REQUESTS = 10_000
READY = 0
CONFIRM_TIMEOUT = 30.0  # seconds a flow waits for the child before it is refused (a stalled disk)
START_TIMEOUT = 60.0  # seconds for a child to import, check the newest files for torn tails, and say so
RESTART_INTERVAL = 1.0  # at most one new child per second after one stopped
_WATCHDOG_INTERVAL = 1.0
_DRAIN_ABOVE = 4 * 2**20  # bytes waiting for the pipe beyond which a flow waits for them to go
# flow.metadata keys that never cross the pipe: proxyauth holds (username, password), and the
# password is the caller's JWT; the recording leaves it out anyway.
_LEFT_OUT = frozenset({"proxyauth"})


class RecordingFailed(Exception):
    """The child could not record a flow for a reason other than the disk (a bug)."""


def frame(payload: object) -> tuple[bytes, bytes]:
    data = marshal.dumps(payload)
    return _HEADER.pack(len(data)), data


_PLAIN = frozenset({dict, list, tuple, str, bytes, int, float, bool, type(None)})


def flow_frame(seq: int, conns: bytes, state: bytes, kind: int = RECORD) -> bytes:
    """One flow for the child: ``conns`` and ``state`` already ``marshal``-encoded."""
    return b"".join((_HEADER.pack(_FLOW_PREFIX.size + len(conns) + len(state)),
                     _FLOW_PREFIX.pack(seq, len(conns), kind), conns, state))


def take_frames(buffer: bytearray) -> list[bytes]:
    """The payloads of the whole frames at the start of ``buffer``, taken out of it; a frame
    not yet whole stays for the next read."""
    frames = []
    offset = 0
    while len(buffer) - offset >= _HEADER.size:
        (size,) = _HEADER.unpack_from(buffer, offset)
        end = offset + _HEADER.size + size
        if end > len(buffer):
            break
        frames.append(bytes(buffer[offset + _HEADER.size:end]))
        offset = end
    del buffer[:offset]
    return frames


def _plain(value: object) -> bool:
    try:
        marshal.dumps(value)
    except ValueError:
        return False
    return True


def _encode_state(state: dict) -> bytes:
    """``marshal`` of a flow state; a metadata value holding a live object deep inside (the type
    check of :func:`flow_state` looks at the top only) is left out, like a live object on top."""
    try:
        return marshal.dumps(state)
    except ValueError:
        state["metadata"] = {k: v for k, v in state["metadata"].items() if _plain(v)}
        return marshal.dumps(state)


def flow_state(flow: http.HTTPFlow, with_request: bool = True) -> dict:
    """What the child needs to rebuild ``flow`` for the recording: its state less connections
    (less its request too, without ``with_request``: the child has it from the write-ahead)."""
    return {
        "id": flow.id,
        "type": flow.type,
        "request": flow.request.get_state() if with_request else None,
        "response": flow.response.get_state() if flow.response is not None else None,
        "error": flow.error.get_state() if flow.error is not None else None,
        "websocket": flow.websocket.get_state() if flow.websocket is not None else None,
        "metadata": {k: v for k, v in flow.metadata.items() if k not in _LEFT_OUT and type(v) in _PLAIN},
        "comment": flow.comment,
        "marked": flow.marked,
        "is_replay": flow.is_replay,
        "intercepted": flow.intercepted,
        "timestamp_created": flow.timestamp_created,
    }


def request_fingerprint(request: http.Request) -> tuple:
    """Every field of ``request``'s state, to tell cheaply whether it is still the request that was
    written ahead: mitmproxy replaces a field's value (bytes, str, the headers' tuple of fields)
    rather than changing it in place, so an unchanged request compares by identity at once."""
    headers = http.Headers  # compared by exact type: isinstance goes through the ABCs of MultiDict
    return tuple(v.fields if type(v) is headers else v for v in vars(request.data).values())


def rebuild_flow(state: dict, request: http.Request | None = None) -> http.HTTPFlow:
    """The child's copy of a flow. Its connections are None: they travel as encoded parts.
    ``request``: the flow's request when ``state`` has none (kept from its write-ahead)."""
    from mitmproxy import websocket

    f = http.HTTPFlow(None, None)  # type: ignore[arg-type]
    f.id = state["id"]
    f.request = http.Request.from_state(state["request"]) if state["request"] is not None else request
    if state["response"] is not None:
        f.response = http.Response.from_state(state["response"])
    if state["error"] is not None:
        f.error = mflow.Error.from_state(state["error"])
    if state["websocket"] is not None:
        f.websocket = websocket.WebSocketData.from_state(state["websocket"])
    f.metadata = state["metadata"]
    f.comment = state["comment"]
    f.marked = state["marked"]
    f.is_replay = state["is_replay"]
    f.intercepted = state["intercepted"]
    f.timestamp_created = state["timestamp_created"]
    return f


# --- the gateway's side --------------------------------------------------------------------------


class RecordingProcess:
    """The gateway's handle on the child: hand a flow over, wait for its confirmation."""

    def __init__(self, directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, hourly: bool = False,
                 fsync_interval: float = DEFAULT_FSYNC_INTERVAL, confirm_timeout: float = CONFIRM_TIMEOUT,
                 python: str = sys.executable, worker: int | None = None) -> None:
        # -O: mitmproxy type-checks every message it builds when __debug__ is on; the child only
        # rebuilds messages from states of messages the gateway built (and checked) already.
        self.argv = [python, "-O", "-m", __name__, str(directory), "--max-bytes", str(max_bytes),
                     "--fsync", repr(float(fsync_interval))] + (["--hourly"] if hourly else []) \
            + (["--worker", str(worker)] if worker else [])
        self.confirm_timeout = confirm_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, tuple[asyncio.Future, float]] = {}  # seq -> (future, handed over at)
        # flow id -> request_fingerprint of each request the child wrote ahead and keeps (its
        # FlowRecorder.kept, same bound, same order of steps), for a record sent without it.
        self._ahead: OrderedDict[str, tuple] = OrderedDict()
        # Frames handed over in one turn of the event loop go to the pipe in one write: under load
        # several flows are handed over per turn, and each write would wake the child again.
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._watchdog: asyncio.TimerHandle | None = None
        self._seq = READY
        self._conns = ConnectionTable()
        self._starting: asyncio.Future | None = None
        self._last_start = float("-inf")
        self._stopped_why = ""

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and self._reader is not None \
            and not self._reader.done()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the child and wait until it has checked its files (raises OSError if it cannot)."""
        if self._starting is not None:  # another flow is already starting it
            await asyncio.shield(self._starting)
            return
        self._starting = asyncio.get_running_loop().create_future()
        try:
            await self._start()
            self._starting.set_result(None)
        except BaseException as e:
            self._starting.set_exception(e if isinstance(e, Exception) else OSError(str(e)))
            self._starting.exception()  # retrieved: waiters re-raise it
            raise
        finally:
            self._starting = None

    async def _start(self) -> None:
        self._last_start = time.monotonic()
        self._conns = ConnectionTable()  # a new child knows no connection yet
        self._ahead.clear()  # nor any request written ahead
        self._outbox.clear()  # frames for a child that stopped (their flows failed with it)
        self._outbox_bytes = 0
        proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=2**20)
        try:
            seq, status, detail = await asyncio.wait_for(_read_frame(proc.stdout), START_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, EOFError) as e:
            proc.kill()
            await proc.wait()
            raise OSError(f"the recording process did not start (exit {proc.returncode}): {e!r}") from None
        if (seq, status) != (READY, "ready"):
            proc.stdin.close()
            await proc.wait()
            raise OSError(f"the recording process cannot write: {detail}")
        self._proc = proc
        self._reader = asyncio.get_running_loop().create_task(self._read_confirmations(proc))
        if self._watchdog is None:
            self._fail_overdue()

    async def _read_confirmations(self, proc: asyncio.subprocess.Process) -> None:
        why = "its output ended"
        buffer = bytearray()
        try:
            # Whatever has arrived, all its frames at once: under load the child confirms several
            # flows per write, and a read per frame would cost a turn of the event loop each.
            while chunk := await proc.stdout.read(1 << 16):
                buffer += chunk
                for payload in take_frames(buffer):
                    self._confirm(*marshal.loads(payload))
        except (ValueError, EOFError, TypeError) as e:
            why = f"it sent what is not a confirmation ({type(e).__name__})"
            proc.kill()
        finally:
            self._stopped(proc, why)

    def _confirm(self, seq: int, status: str, detail: str) -> None:
        entry = self._pending.pop(seq, None)
        if entry is None or entry[0].done():
            return
        future = entry[0]
        if status == "ok":
            future.set_result(Path(detail))
        elif status == "resend":  # it no longer has the request written ahead
            future.set_result(None)
        elif status == "oserror":
            future.set_exception(OSError(detail))
        else:
            future.set_exception(RecordingFailed(detail))

    def _stopped(self, proc: asyncio.subprocess.Process, why: str) -> None:
        if proc is not self._proc:
            return
        code = proc.returncode
        pending, self._pending = self._pending, {}
        if proc.stdin.is_closing() and not pending:
            logger.info("the recording process finished (exit %s)", code)
            return
        self._stopped_why = f"the recording process stopped ({why}" + (f", exit {code})" if code is not None else ")")
        logger.error("%s; flows it had not confirmed are refused", self._stopped_why)
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(OSError(self._stopped_why))

    async def record(self, flow: http.HTTPFlow, kind: int = RECORD) -> Path:
        """Hand ``flow`` to the child; returns the file it was written to once the child confirms.
        ``kind``: ``WRITE_AHEAD`` for a request about to be forwarded (to the write-ahead log).

        Raises OSError when it is not written (the disk, the child stopped, no confirmation in
        time) and RecordingFailed for a bug in the child: either way the flow must be refused.

        A flow's request is sent once: its record goes without it when the child wrote it ahead
        and it has not changed since (most flows; the child redacts it once, too).
        """
        if not self.running:
            if self._starting is None and time.monotonic() - self._last_start < RESTART_INTERVAL:
                raise OSError(f"{self._stopped_why or 'the recording process is not running'}; "
                              "it is restarted at most once a second")
            await self.start()
        fingerprint = request_fingerprint(flow.request)
        if kind == RECORD and self._ahead.pop(flow.id, None) == fingerprint:
            kind = RECORD_AFTER_AHEAD
        path = await self._hand_over(flow, kind)
        if path is None:  # the child had forgotten the request: the whole flow, once more
            path = await self._hand_over(flow, RECORD)
        elif kind == WRITE_AHEAD:
            self._ahead[flow.id] = fingerprint
            while len(self._ahead) > KEPT_REQUESTS:
                self._ahead.popitem(last=False)
        return path

    async def _hand_over(self, flow: http.HTTPFlow, kind: int) -> Path | None:
        # An error here comes before anything changed.
        state = _encode_state(flow_state(flow, with_request=kind != RECORD_AFTER_AHEAD))
        try:
            conns = marshal.dumps(tuple(self._connection(c) for c in (flow.client_conn, flow.server_conn)))
        except Exception:
            # The connection tables changed and the child will not hear of it: they would
            # disagree from now on, so start over with a new child and empty tables.
            self._restart_now()
            raise
        self._seq += 1
        seq = self._seq
        future = asyncio.get_running_loop().create_future()
        self._pending[seq] = (future, time.monotonic())  # the watchdog fails it when overdue
        stdin = self._proc.stdin
        data = flow_frame(seq, conns, state, kind)
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._send_outbox, self._proc)
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        try:
            if stdin.transport.get_write_buffer_size() + self._outbox_bytes > _DRAIN_ABOVE:
                self._send_outbox(self._proc)
                # Large flows: wait until the pipe takes them, so the gateway's memory stays bounded.
                await asyncio.wait_for(stdin.drain(), self.confirm_timeout)
            return await future
        except TimeoutError:
            self._pending.pop(seq, None)
            raise OSError(f"the recording process did not take the flow within {self.confirm_timeout:g}s") from None
        except (BrokenPipeError, ConnectionResetError):
            self._pending.pop(seq, None)
            raise OSError(self._stopped_why or "the recording process stopped") from None

    def _send_outbox(self, proc: asyncio.subprocess.Process) -> None:
        if not self._outbox or proc is not self._proc:
            return  # sent already; or its child stopped, which failed their flows
        data = b"".join(self._outbox)
        self._outbox.clear()
        self._outbox_bytes = 0
        proc.stdin.write(data)

    def _fail_overdue(self) -> None:
        """Fail flows the child has not confirmed in time (a stalled disk): refused, not held forever."""
        now = time.monotonic()
        for seq, (future, since) in list(self._pending.items()):
            if now - since < self.confirm_timeout:
                break  # in the order they were handed over
            del self._pending[seq]
            if not future.done():
                future.set_exception(OSError(
                    f"the recording process did not confirm the flow within {self.confirm_timeout:g}s"))
        self._watchdog = asyncio.get_running_loop().call_later(_WATCHDOG_INTERVAL, self._fail_overdue)

    def _connection(self, conn) -> tuple[str, dict | None]:
        """``(id, state)`` for a connection the child has not seen as it is now, else ``(id, None)``."""
        snap = connection_snapshot(conn)
        if self._conns.entries.get(conn.id) == snap:
            self._conns.use(conn.id, None)
            return conn.id, None
        self._conns.use(conn.id, snap)
        return conn.id, conn.get_state()

    def _restart_now(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.kill()  # the reader sees the end, fails what was pending; the next flow starts one
        self._last_start = float("-inf")

    async def close(self, timeout: float = 30.0) -> None:
        """End the child's input; it writes what it has, fsyncs and exits (waited for, bounded)."""
        proc = self._proc
        if proc is None:
            return
        try:
            proc.stdin.close()
            await proc.stdin.wait_closed()
        except (OSError, RuntimeError):
            pass
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            logger.error("the recording process did not finish within %gs; killed", timeout)
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)  # ends at the child's exit
        self._proc = self._reader = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


async def _read_frame(stream: asyncio.StreamReader):
    (size,) = _HEADER.unpack(await stream.readexactly(_HEADER.size))
    return marshal.loads(await stream.readexactly(size))


# --- the child's side ----------------------------------------------------------------------------


class _Frames:
    """Whole frames from a file descriptor, as they arrive; ``None`` when nothing came in time."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.ended = False
        # Read into one buffer: os.read(fd, 1 MiB) would map and unmap a fresh megabyte per read.
        self._chunk = bytearray(1 << 18)
        self._view = memoryview(self._chunk)

    def read(self, timeout: float | None) -> list[bytes] | None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        n = os.readv(self.fd, [self._chunk])
        if not n:
            self.ended = True
        self.buffer += self._view[:n]
        return take_frames(self.buffer)


class _Confirmations:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.gateway_gone = False

    def send(self, payloads: list[object]) -> None:
        if self.gateway_gone:
            return
        view = memoryview(b"".join(b"".join(frame(p)) for p in payloads))
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except BrokenPipeError:
            # The gateway stopped (killed, say): nobody waits for confirmations, but the flows
            # still in the pipe are written all the same.
            self.gateway_gone = True


def serve(directory: Path, max_bytes: int, hourly: bool, fsync_interval: float, inp: int, out: int,
          worker: int | None = None) -> int:
    from nhi_gateway.recording import flowformat
    from nhi_gateway.recording.files import recover_recent
    from nhi_gateway.recording.flows import FlowRecorder

    try:
        recover_recent(directory, worker=worker)
    except OSError as e:  # the first write reports it, and refuses
        logger.error("cannot check %s for recordings cut short by a crash: %s", directory, e)
    try:
        recorder = FlowRecorder(directory, max_bytes=max_bytes, hourly=hourly, fsync_interval=fsync_interval,
                                worker=worker, keep_requests=KEPT_REQUESTS)
    except OSError as e:
        _Confirmations(out).send([(READY, "oserror", f"{directory}: {e.strerror or e}")])
        return 1
    confirmations = _Confirmations(out)
    confirmations.send([(READY, "ready", "")])
    conns = ConnectionTable()
    frames = _Frames(inp)
    # With an interval, a flow is confirmed once it is written and the files are fsynced after the
    # confirmations go out (at most once per interval), so no answer waits for the disk's flush,
    # as when the gateway wrote them itself. A failed fsync fails the next flow (closed).
    recorder.writer.sync_in_append = fsync_interval <= 0
    sync_error: OSError | None = None
    idle = fsync_interval if fsync_interval > 0 else None
    try:
        while not frames.ended:
            batch = frames.read(idle)
            if batch:
                done = []
                for raw in batch:
                    if sync_error is not None:
                        done.append(_sync_failed(raw, recorder, sync_error))
                        sync_error = None
                    else:
                        done.append(_record_one(recorder, conns, raw, flowformat))
                confirmations.send(done)
            try:
                recorder.writer.sync_due()
            except OSError as e:
                logger.error("cannot sync the recordings in %s: %s", directory, e)
                sync_error = e
    finally:
        recorder.close()
    return 0


def _sync_failed(raw: bytes, recorder, error: OSError) -> tuple:
    seq, _, _ = _FLOW_PREFIX.unpack_from(raw)
    return seq, "oserror", f"cannot sync {recorder.directory}: {error.strerror or error}"


def _record_one(recorder, conns: ConnectionTable, raw: bytes, tnetstring) -> tuple:
    seq = 0
    try:
        seq, conns_size, kind = _FLOW_PREFIX.unpack_from(raw)
        start = _FLOW_PREFIX.size
        conn_states = marshal.loads(raw[start:start + conns_size])
        state = marshal.loads(raw[start + conns_size:])
        parts, missing = [], []
        for key, (conn_id, conn_state) in zip(("client_conn", "server_conn"), conn_states):
            if conn_state is not None:
                try:
                    conn_state = tnetstring.dumps(key) + tnetstring.dumps(conn_state)
                except UnicodeEncodeError:  # an SNI or address that is not UTF-8: written escaped
                    conn_state = tnetstring.dumps(key) + tnetstring.dumps(escape_unencodable(conn_state))
            encoded = conns.use(conn_id, conn_state)
            if encoded is None:
                missing.append(conn_id)
            parts.append(encoded)
        if missing:
            raise LookupError(f"connections {missing} were never sent")
        kept = recorder.kept_request(state["id"])  # forgotten by any record of the flow
        if kind == WRITE_AHEAD:
            path = recorder.write_ahead(rebuild_flow(state), connections=tuple(parts))
        elif kind == RECORD_AFTER_AHEAD:
            if kept is None:
                return seq, "resend", ""
            request, disk_request, withheld = kept
            path = recorder.record_now(rebuild_flow(state, request), connections=tuple(parts),
                                       request_part=(disk_request, withheld))
        else:
            path = recorder.record_now(rebuild_flow(state), connections=tuple(parts))
        return seq, "ok", str(path)
    except OSError as e:
        return seq, "oserror", f"cannot write {recorder.directory}: {e.strerror or e}"
    except Exception as e:
        logger.error("flow %s: recording it failed: %r", seq, e, exc_info=e)
        return seq, "error", type(e).__name__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nhi_gateway.recording.process")
    p.add_argument("directory", type=Path)
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    p.add_argument("--fsync", type=float, default=DEFAULT_FSYNC_INTERVAL)
    p.add_argument("--hourly", action="store_true")
    p.add_argument("--worker", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="recording process: %(levelname)s %(message)s")
    # Frames go to the gateway on the original stdout; anything else printed goes to stderr.
    out = os.dup(1)
    os.dup2(2, 1)
    # Ctrl-C in the gateway's terminal, or a service manager's SIGTERM, reaches the whole process
    # group: this process stops when its input ends (the gateway closed it, or died), not before,
    # so every flow already handed over is written.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return serve(args.directory, args.max_bytes, args.hourly, args.fsync, 0, out, args.worker)


if __name__ == "__main__":
    sys.exit(main())
