"""``run --workers N``: N gateway processes on one host, sharing the listening ports.

mitmproxy serves on one thread, so one gateway process uses one core for the proxy. With
``--workers N`` this process becomes a supervisor: it starts N ordinary gateway processes
(``run ... --worker i``) that listen on the same ports with ``SO_REUSEPORT``, so the kernel spreads
new connections over them, and each has its own recording process, recordings (``.w2`` in their
names) and audit chain (``audit.w2.jsonl``). The supervisor forwards SIGTERM/SIGINT (each worker
drains) and SIGHUP (each reloads), restarts a worker that dies (at most once a second), and writes
one ready file once every worker is ready.

Workers share no memory: what must be shared (held approvals, grants) lives in the state backend.
The embedded SQLite state cannot wake a request held by one worker when another takes the decision,
so a policy with approve rules is refused with several workers on it unless the state is
PostgreSQL (``--state postgresql://...``), which wakes a held request on whichever worker holds it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# How a worker is started: `nhi-gateway` itself, unless the environment names another command
# prefix (the benchmark's launcher, which maps host names to loopback ports like DNS would).
WORKER_COMMAND_ENV = "NHI_WORKER_COMMAND"
READY_TIMEOUT = 90.0  # seconds for a worker to load the policy, start its recording process and listen
RESTART_INTERVAL = 1.0


def share_listening_ports() -> None:
    """In a worker: every listener mitmproxy opens is opened with SO_REUSEPORT, so the N workers
    bind the same address (mitmproxy has no option for it; it calls ``asyncio.start_server``)."""
    original = asyncio.start_server
    if getattr(original, "nhi_reuse_port", False):
        return

    async def start_server(*args, **kwargs):
        kwargs.setdefault("reuse_port", True)
        return await original(*args, **kwargs)

    start_server.nhi_reuse_port = True
    asyncio.start_server = start_server


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Supervisor:
    def __init__(self, argv: list[str], workers: int, listen: tuple[str, int],
                 approvals_listen: tuple[str, int] | None, ready_file: Path | None) -> None:
        host, port = listen
        self.listen = (host, port or free_port(host))
        if approvals_listen is None:
            approvals_listen = (host, self.listen[1] + 1 if port else 0)
        ahost, aport = approvals_listen
        self.approvals_listen = (ahost, aport or free_port(ahost))
        self.argv = argv  # `run` and its options, less --workers
        self.count = workers
        self.ready_file = ready_file
        self.scratch = Path(tempfile.mkdtemp(prefix="nhi-workers-"))
        self.procs: dict[int, subprocess.Popen] = {}
        self.started: dict[int, float] = {}
        self.stopping = False

    def _command(self, worker: int) -> list[str]:
        prefix = json.loads(os.environ[WORKER_COMMAND_ENV]) if os.environ.get(WORKER_COMMAND_ENV) \
            else [sys.executable, "-m", "nhi_gateway.cli.main"]
        return [*prefix, *self.argv, "--worker", str(worker),
                "--listen", _address(*self.listen), "--approvals-listen", _address(*self.approvals_listen),
                "--ready-file", str(self._ready_of(worker))]

    def _ready_of(self, worker: int) -> Path:
        return self.scratch / f"worker-{worker}.json"

    def _start(self, worker: int) -> None:
        self._ready_of(worker).unlink(missing_ok=True)
        self.procs[worker] = subprocess.Popen(self._command(worker))
        self.started[worker] = time.monotonic()

    def _wait_ready(self, worker: int) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT
        path = self._ready_of(worker)
        while not path.exists():
            code = self.procs[worker].poll()
            if code is not None:
                raise RuntimeError(f"worker {worker} exited ({code}) before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {worker} was not ready within {READY_TIMEOUT:g}s")
            time.sleep(0.05)
        return json.loads(path.read_text())

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        def stop(signum, _frame):
            if not self.stopping:
                logger.warning("%s: stopping %d workers (each drains)", signal.Signals(signum).name, self.count)
            self.stopping = True
            self._signal_all(signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda *_: self._signal_all(signal.SIGHUP))
        try:
            # The first worker alone first: it creates the CA in the confdir the others then read.
            self._start(1)
            first = self._wait_ready(1)
            for worker in range(2, self.count + 1):
                self._start(worker)
            for worker in range(2, self.count + 1):
                self._wait_ready(worker)
        except RuntimeError as e:
            print(f"nhi-gateway: {e}; stopping", file=sys.stderr)
            self.stopping = True
            self._signal_all(signal.SIGTERM)
            self._reap_all()
            return 1
        self._announce(first)
        return self._supervise()

    def _announce(self, first: dict) -> None:
        ready = {**first, "pid": os.getpid(), "workers": {str(w): p.pid for w, p in self.procs.items()}}
        print(f"nhi-gateway: {self.count} workers on {_address(*self.listen)} "
              f"(pids {', '.join(str(p.pid) for p in self.procs.values())})", flush=True)
        if self.ready_file is not None:
            tmp = self.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(ready))
            tmp.replace(self.ready_file)

    def _supervise(self) -> int:
        codes: dict[int, int] = {}
        while True:
            for worker, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None:
                    continue
                if self.stopping:
                    codes[worker] = code
                    continue
                logger.error("worker %d (pid %d) exited with %s; starting it again", worker, proc.pid, code)
                time.sleep(max(0.0, RESTART_INTERVAL - (time.monotonic() - self.started[worker])))
                self._start(worker)
            if self.stopping and len(codes) == len(self.procs):
                return max(codes.values(), default=0)
            time.sleep(0.1)

    def _reap_all(self) -> None:
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
