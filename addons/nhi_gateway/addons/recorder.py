"""Recording: every flow, allowed or refused, appended in mitmproxy's own format.

What is written and how it is annotated: :mod:`nhi_gateway.recording.flows`; where the files go:
:mod:`nhi_gateway.recording.files`. This addon hands each flow over when its answer is known
(``response``, ``error``, a refused CONNECT) and refuses the flow (503) when it cannot be written,
so no client is answered for a request that left no record. Before that, ``WriteAhead`` puts the
request half and decision of every allowed request in the write-ahead log and forwards it only
once that is written: nothing reaches Graph unrecorded, even when the disk fails at that moment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from mitmproxy import http

from nhi_gateway.addons.failclosed import REFUSED_KEY, decision_of, fail_closed, internal_error, refuse
from nhi_gateway.addons.guard import Health
from nhi_gateway.addons.metrics import PROBE_KEY
from nhi_gateway.policy.decision import Decision, Stage
from nhi_gateway.recording.files import DEFAULT_FSYNC_INTERVAL, DEFAULT_MAX_BYTES, recover_recent
from nhi_gateway.recording.flows import FlowRecorder, in_part
from nhi_gateway.recording.process import WRITE_AHEAD, RecordingProcess

logger = logging.getLogger(__name__)

RECORDED_KEY = "nhi.recorded"


class Recorder(FlowRecorder):
    def __init__(self, directory: Path, health: Health, on_refusal=None, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, hourly: bool = False,
                 fsync_interval: float = DEFAULT_FSYNC_INTERVAL, separate_process: bool = False,
                 worker: int | None = None) -> None:
        super().__init__(directory, max_bytes=max_bytes, hourly=hourly, fsync_interval=fsync_interval,
                         worker=worker)
        self.health = health
        self.on_refusal = on_refusal  # called when the recorder refuses a flow another stage passed
        self.on_write = lambda kind, seconds, ok: None  # metrics
        self._sync_timer: asyncio.TimerHandle | None = None
        # With separate_process, a child process writes (see nhi_gateway.recording.process) and
        # this object only hands flows over; the child checks the files for torn tails itself.
        self.process = RecordingProcess(self.directory, max_bytes=max_bytes, hourly=hourly,
                                        fsync_interval=fsync_interval, worker=worker) if separate_process else None
        if self.process is not None:
            return
        try:
            recover_recent(self.directory, worker=worker)
        except OSError as e:  # the first write reports it, and refuses
            logger.error("cannot check %s for recordings cut short by a crash: %s", self.directory, e)

    async def _record(self, flow, live: bool) -> None:
        if flow.metadata.get(RECORDED_KEY) or flow.metadata.get(PROBE_KEY):
            return
        started = time.perf_counter()
        try:
            if self.process is not None:
                self.last_path = await self.process.record(flow)
            else:
                self.record_now(flow)
            self.on_write("flow", time.perf_counter() - started, True)
        except OSError as e:
            self.failed("flow", started, e)
            if live and isinstance(flow, http.HTTPFlow):
                refuse(flow, Decision.deny(
                    Stage.GUARD, 503, "ServiceUnavailable",
                    "the gateway could not record this request, so it refused it", check="recording"))
                if self.on_refusal is not None:
                    self.on_refusal(flow)
            return
        except Exception as e:
            # A flow the recorder cannot write in full (a bug, not the disk). What reached Graph
            # must still be on record: the flow is written without its bodies, its comment saying
            # why. Only when not even that can be written is the answer refused, and the refusal
            # says that Graph had the request; the audit line is amended to tell what the client got.
            self.on_write("flow", time.perf_counter() - started, False)
            logger.error("flow %s: recording it failed: %r", flow.id, e, exc_info=e)
            why = f"recording it in full failed: {type(e).__name__}: {e}"[:300]
            try:
                if self.process is not None:
                    self.last_path = await self.process.record(in_part(flow, why))
                else:
                    self.record_in_part(flow, why)
            except Exception as e2:  # noqa: BLE001 - answered below
                logger.error("flow %s: recording it in part failed too: %r", flow.id, e2, exc_info=e2)
            else:
                logger.warning("flow %s: recorded in part (%s)", flow.id, why)
                flow.metadata[RECORDED_KEY] = True
                return
            if live and isinstance(flow, http.HTTPFlow):
                refuse(flow, self._not_recorded(flow))
                if self.on_refusal is not None:
                    self.on_refusal(flow)
            return
        flow.metadata[RECORDED_KEY] = True
        self.health.recover("recording")

    def failed(self, kind: str, started: float, e: OSError) -> None:
        """A write of ``kind`` (flow, write_ahead) the disk or the recording process refused:
        counted, and the gateway reported unhealthy until a write succeeds again."""
        self.on_write(kind, time.perf_counter() - started, False)
        self.health.fail("recording", str(e) if self.process is not None
                         else f"cannot write {self.directory}: {e.strerror or e}")

    def _not_recorded(self, flow: http.HTTPFlow) -> Decision:
        if flow.server_conn is not None and flow.server_conn.timestamp_start is not None:
            return Decision.deny(
                Stage.ERROR, 500, "GatewayError",
                "the request reached the upstream, which answered, but the gateway could not record the "
                "exchange, so it withholds the answer", check="recording")
        return internal_error(f"{type(self).__qualname__}.write")

    @fail_closed
    async def response(self, flow: http.HTTPFlow) -> None:
        await self._record(flow, live=not flow.metadata.get(REFUSED_KEY))

    @fail_closed
    async def error(self, flow: http.HTTPFlow) -> None:
        await self._record(flow, live=False)

    @fail_closed
    async def http_connect_error(self, flow: http.HTTPFlow) -> None:
        await self._record(flow, live=False)

    def running(self):
        if self.process is not None:
            # Started already by the gateway (before it listens); else now (mitmproxy awaits it).
            return None if self.process.running else self.start_process()
        if self.writer.fsync_interval > 0:
            self._schedule_sync()
        return None

    async def start_process(self) -> None:
        try:
            await self.process.start()
        except OSError as e:  # every flow is refused until a child starts and writes
            self.health.fail("recording", str(e))

    def _schedule_sync(self) -> None:
        loop = asyncio.get_running_loop()
        self._sync_timer = loop.call_later(self.writer.fsync_interval, self._sync)

    def _sync(self) -> None:
        # Flows written just before traffic stopped reach the disk within the interval too.
        try:
            self.writer.sync_due()
        except OSError as e:
            self.health.fail("recording", f"cannot sync {self.directory}: {e.strerror or e}")
        self._schedule_sync()

    def done(self):
        if self.process is not None:
            return self.process.close()  # mitmproxy awaits it: the child writes what it has
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        self.close()


class WriteAhead:
    """Right after the guard, before anything goes upstream: the request is forwarded only once
    its request half and decision are in the write-ahead log (the recording process confirms it);
    otherwise it is refused 503 and Graph never sees it."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        decision = decision_of(flow)
        if decision is None or not decision.allowed:
            return  # refused by the guard already; recorded with its answer
        recorder = self.recorder
        started = time.perf_counter()
        try:
            if recorder.process is not None:
                await recorder.process.record(flow, WRITE_AHEAD)
            else:
                recorder.write_ahead(flow)
            recorder.on_write("write_ahead", time.perf_counter() - started, True)
        except OSError as e:
            recorder.failed("write_ahead", started, e)
            refuse(flow, Decision.deny(
                Stage.GUARD, 503, "ServiceUnavailable",
                "the gateway could not record this request before forwarding it, so it refused it",
                check="recording", rule_id=decision.rule_id, operation=decision.operation,
                principal=decision.principal))
        except Exception as e:
            logger.error("flow %s: writing it ahead failed: %r", flow.id, e, exc_info=e)
            refuse(flow, internal_error("WriteAhead.request"))
