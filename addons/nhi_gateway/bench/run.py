"""Running the benchmark: start the processes, drive the same load through bare mitmdump and the
gateway, measure, stop everything.

Processes (all on loopback):

- the look-alike Entra ID and Graph (its keys sign the token; its JWKS is what the gateway
  verifies against; its answer to the benchmark request is what the upstream replays),
- the upstream: a cheap replay of that answer (see :mod:`.upstream`), or the look-alike itself
  with ``--upstream lookalike``,
- bare ``mitmdump``, with the options of the gateway that matter for the data path,
- the gateway (``nhi-gateway run``) with a realistic policy: token verification, about 50 rules,
  masking, recording and audit, all on; the same as two workers (``--workers 2``); and, when a
  PostgreSQL server answers, two more with their state in it, to measure a grant lookup
  (:mod:`.grants`).

Both proxies resolve graph.microsoft.com to the upstream's loopback port (:mod:`.launch`).

The load generator runs in this process. Each figure is measured in the same run for both
proxies, so only the ratios carry over to another machine.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from nhi_gateway.bench import decisions, grants, hooks, load, procstat
from nhi_gateway.bench.launch import free_port
from nhi_gateway.bench.upstream import CannedResponse

PACKAGE_DIR = Path(__file__).resolve().parent
REPO = PACKAGE_DIR.parents[2]
DEFAULT_POLICY = REPO / "policies" / "bench.yaml"
BIN = Path(sys.executable).parent
GRAPH = "graph.microsoft.com"
REQUEST_TARGET = "/v1.0/users?$top=5"
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "keep-alive" or "new-connection"
    concurrency: int
    direct: bool = False  # also measured straight against the upstream, to show its capacity
    workers: bool = False  # also measured through the gateway with --workers 2
    recording: bool = False  # also measured through bare mitmdump writing every flow (-w)


SCENARIOS = (
    Scenario("keep-alive c=1", "keep-alive", 1, recording=True),
    Scenario("keep-alive c=10", "keep-alive", 10, direct=True, recording=True),
    Scenario("keep-alive c=50", "keep-alive", 50, workers=True),
    Scenario("new conn c=1", "new-connection", 1),
    Scenario("new conn c=10", "new-connection", 10, direct=True),
)
LATENCY = SCENARIOS[0]  # the latency scenario: each request waits for nothing but itself


@dataclass
class Settings:
    quick: bool = False
    duration: float = 10.0  # seconds per scenario and target
    rounds: int = 2
    memory_requests: int = 100_000
    decisions: int = 200_000
    upstream: str = "standin"  # or "lookalike"
    policy: Path = DEFAULT_POLICY
    workdir: Path | None = None
    keep: bool = False
    profile: float = 0.0  # seconds of py-spy on the gateway under keep-alive c=10 load; 0: none
    hooks: float = 0.0  # seconds of per-hook CPU accounting on a gateway of its own; 0: none
    records: Path | None = None  # where the gateway writes recordings and audit (default: workdir)

    @classmethod
    def for_mode(cls, quick: bool, **overrides) -> Settings:
        base = (cls(quick=True, duration=3.0, rounds=1, memory_requests=5_000, decisions=50_000)
                if quick else cls())
        for k, v in overrides.items():
            if v is not None:
                setattr(base, k, v)
        return base


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail(self.log)}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _die_with_parent() -> None:
    """In the child: be sent SIGTERM when the benchmark dies, however it dies (Linux), so no
    proxy or upstream outlives a killed run."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn(name: str, argv: list[str], workdir: Path, ready: Path | None = None,
          env: dict[str, str] | None = None) -> Process:
    if ready is not None:
        ready.unlink(missing_ok=True)  # a kept workdir's old ready file would name a dead port
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=workdir, preexec_fn=_die_with_parent,
                                 env={**os.environ, **env} if env else None)
    return Process(name, popen, log)


def make_workdir(given: Path | None, prefix: str) -> Path:
    """``given`` (created if need be), or a new temporary directory named ``<prefix>...``."""
    if given:
        given.mkdir(parents=True, exist_ok=True)
        return given.resolve()
    return Path(tempfile.mkdtemp(prefix=prefix))


async def wait_for_json(path: Path, proc: Process, timeout: float = START_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        proc.check_alive()
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not become ready within {timeout:.0f}s:\n{tail(proc.log)}")


async def wait_for_listener(address: tuple[str, int], ca_cert: Path, proc: Process,
                            timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.check_alive()
        if ca_cert.exists():
            try:
                _, writer = await asyncio.open_connection(*address)
            except OSError:
                pass
            else:
                writer.close()
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not listen on {address} within {timeout:.0f}s:\n{tail(proc.log)}")


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        from mitmproxy.version import VERSION as mitmproxy_version
    except ImportError:  # pragma: no cover
        mitmproxy_version = "?"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "mitmproxy": mitmproxy_version,
        "kernel": platform.release(),
    }


def _num(value: float, digits: int) -> float | None:
    """JSON has no NaN: a figure that could not be measured is null."""
    return None if math.isnan(value) else round(value, digits)


@dataclass
class Measurement:
    scenario: str
    target: str
    round: int
    requests: int
    errors: dict[str, int]
    elapsed: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_percent: dict[str, float]  # proxy / upstream / loadgen, % of one core
    peak_rss_kb: int = 0  # the proxy's VmHWM over this measurement (reset before it)

    @property
    def proxy_cpu_ms(self) -> float:
        """CPU milliseconds the proxy spent per completed request: what a request costs it,
        whatever else competes for the cores (other processes lengthen the wait, not this)."""
        if "proxy" not in self.cpu_percent or not self.requests:
            return float("nan")
        return self.cpu_percent["proxy"] / 100 * self.elapsed / self.requests * 1000

    @property
    def total_cpu_ms(self) -> float:
        """The same with the proxy's child processes (the gateway's recording process) added."""
        if "proxy" not in self.cpu_percent or not self.requests:
            return float("nan")
        busy = self.cpu_percent["proxy"] + self.cpu_percent.get("proxy children", 0.0)
        return busy / 100 * self.elapsed / self.requests * 1000

    def line(self) -> str:
        """The measurement as the run prints it when done."""
        cpu = self.cpu_percent
        return (f"  round {self.round} {self.scenario:16} {self.target:8} {self.rps:8.1f} req/s  "
                f"p50 {self.p50_ms:6.2f} ms  p99 {self.p99_ms:6.2f} ms  errors {sum(self.errors.values())}  "
                f"proxy {self.proxy_cpu_ms:5.2f} cpu-ms/req; cpu proxy {cpu.get('proxy', 0):3.0f}% "
                f"its children {cpu.get('proxy children', 0):3.0f}% "
                f"upstream {cpu['upstream']:3.0f}% loadgen {cpu['loadgen']:3.0f}% others {cpu['others']:3.0f}%")

    def to_dict(self) -> dict:
        return {
            "scenario": self.scenario, "target": self.target, "round": self.round,
            "requests": self.requests, "errors": dict(self.errors), "elapsed_s": round(self.elapsed, 3),
            "rps": round(self.rps, 1), "p50_ms": _num(self.p50_ms, 3), "p99_ms": _num(self.p99_ms, 3),
            "cpu_percent": {k: round(v, 1) for k, v in self.cpu_percent.items()},
            "peak_rss_kb": self.peak_rss_kb, "proxy_cpu_ms_per_request": _num(self.proxy_cpu_ms, 4),
            "total_cpu_ms_per_request": _num(self.total_cpu_ms, 4),
        }


@dataclass
class MemoryRun:
    target: str
    requests: int
    samples: list[tuple[int, int]] = field(default_factory=list)  # (requests done, VmRSS KiB)
    errors: int = 0
    rps: float = 0.0

    @property
    def growth(self) -> float:
        first, last = self.samples[0][1], self.samples[-1][1]
        return (last - first) / first if first else 0.0

    def to_dict(self) -> dict:
        return {"target": self.target, "requests": self.requests, "errors": self.errors,
                "rps": round(self.rps, 1), "rss_kb_samples": self.samples,
                "rss_start_kb": self.samples[0][1], "rss_end_kb": self.samples[-1][1],
                "growth": round(self.growth, 4)}


class Bench:
    def __init__(self, settings: Settings, say=print) -> None:
        self.settings = settings
        self.say = say
        self.processes: list[Process] = []
        self.targets: dict[str, load.Target] = {}
        self.proxies: dict[str, Process] = {}
        self.upstream_proc: Process | None = None
        self.spec: load.RequestSpec | None = None
        self.workdir: Path = Path()
        self.records: Path = Path()
        self.record_dirs: dict[str, Path] = {}  # each gateway's recordings and audit
        self.resolve: list[str] = []  # the proxies' name mapping (launch.py)
        self._bare_ports: dict[str, int] = {}
        self.lookalike_port = 0
        self.upstream_ca = ""
        self.info: dict = {}

    # --- processes ------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.workdir = w = make_workdir(s.workdir, "nhi-bench-")
        self.say(f"workdir: {w}")
        if s.records:
            s.records.mkdir(parents=True, exist_ok=True)
            self.records = Path(tempfile.mkdtemp(prefix="nhi-bench-records-", dir=s.records))
        else:
            self.records = w / "recordings"
        lookalike = self._spawn("lookalike", [sys.executable, "-m", "nhi_gateway.cli.main", "lookalike",
                                              "--state-dir", str(w / "lookalike"), "--port", "0"],
                                w / "lookalike" / "lookalike.json")
        la = await wait_for_json(w / "lookalike" / "lookalike.json", lookalike)
        self.spec = load.RequestSpec(GRAPH, REQUEST_TARGET, self._mint(la))
        # The look-alike's own answer, verified by it with real RS256: what the stand-in replays.
        canned = await self._fetch_canned(("127.0.0.1", la["port"]), la["ca_cert"])
        if s.upstream == "lookalike":
            self.upstream_proc, up_port = lookalike, la["port"]
        else:
            up_port = await self._start_standin(canned, Path(la["ca_cert"]).parent)
        await self._start_proxies(la, up_port)
        await self._preflight(canned)

    async def _start_standin(self, canned: CannedResponse, pki: Path) -> int:
        w = self.workdir
        canned_path, token_path = w / "canned-response.json", w / "token"
        canned.to_file(canned_path)
        token_path.write_text(self.spec.token)
        token_path.chmod(0o600)
        self.upstream_proc = self._spawn("upstream", [
            sys.executable, "-m", "nhi_gateway.bench", "upstream",
            "--cert", str(pki / "server.pem"), "--key", str(pki / "server.key.pem"),
            "--path", REQUEST_TARGET, "--token-file", str(token_path), "--canned", str(canned_path),
            "--ready-file", str(w / "upstream.json")], w / "upstream.json")
        return (await wait_for_json(w / "upstream.json", self.upstream_proc))["port"]

    async def _start_proxies(self, la: dict, up_port: int) -> None:
        ca = la["ca_cert"]
        # Both proxies resolve the names to loopback like DNS would (see launch.py): no
        # address rewriting, so URL, Host, SNI and upstream connection reuse are production's.
        self.resolve = [f"--resolve={GRAPH}=127.0.0.1:{up_port}",
                        f"--resolve=login.microsoftonline.com=127.0.0.1:{la['port']}",
                        f"--resolve=sts.windows.net=127.0.0.1:{la['port']}"]
        self.lookalike_port, self.upstream_ca = la["port"], ca
        # Bare mitmdump with the gateway's data-path options; and the same writing every flow with
        # -w, as a team would record with mitmproxy alone (unredacted, no audit trail): a
        # reference for what recording costs in mitmproxy itself, not a target.
        self._start_bare("bare", [])
        self._start_bare("bare-w", ["-w", str(self.records.with_name(f"{self.records.name}-bare-w") / "flows")])
        await self.start_gateways({"gateway": (self.settings.policy, [])})
        self.targets["direct"] = load.Target("direct", ("127.0.0.1", up_port), load.client_tls(ca), proxy=False)
        for name in ("bare", "bare-w"):
            await self._bare_ready(name)
        # The same gateway as two workers sharing the port (run --workers 2), for issue 15's targets.
        await self.start_gateways({"gateway-w2": (self.settings.policy, ["--workers", "2"])})

    def _start_bare(self, name: str, extra: list[str]) -> None:
        """Bare mitmdump as a target named ``name``, with ``extra`` options (ready: :meth:`_bare_ready`)."""
        w = self.workdir
        port = free_port()
        if extra[:1] == ["-w"]:
            Path(extra[1]).parent.mkdir(parents=True, exist_ok=True)
            self.record_dirs[name] = Path(extra[1]).parent
        self.proxies[name] = self._spawn(name, [
            sys.executable, "-m", "nhi_gateway.bench", "mitmdump", *self.resolve, "--",
            "--listen-host", "127.0.0.1", "--listen-port", str(port),
            "--set", f"confdir={w / f'{name}-confdir'}",  # each its own CA: no race to create one
            # The gateway's data-path options: lazy upstream connections, the same upstream trust,
            # the same body limit (nothing streamed). Its log like the gateway's, without the
            # per-flow lines the gateway does not print either.
            "--set", "connection_strategy=lazy",
            "--set", f"ssl_verify_upstream_trusted_ca={self.upstream_ca}",
            "--set", "body_size_limit=32m",
            "--set", "flow_detail=0",
            *extra,
        ], None)
        self._bare_ports[name] = port

    async def _bare_ready(self, name: str) -> None:
        ca = self.workdir / f"{name}-confdir" / "mitmproxy-ca-cert.pem"
        address = ("127.0.0.1", self._bare_ports[name])
        await wait_for_listener(address, ca, self.proxies[name])
        self.targets[name] = load.Target(name, address, load.client_tls(str(ca)))

    async def start_gateways(self, gateways: dict[str, tuple[Path, list[str]]],
                             env: dict[str, str] | None = None) -> None:
        """Start a gateway per name (its policy, more ``run`` arguments), all at once, each with
        recordings of its own; each becomes a target of that name once ready. ``env``: more
        environment for them."""
        w = self.workdir
        started = {}
        for name, (policy, extra) in gateways.items():
            suffix = name.removeprefix("gateway").lstrip("-")
            records = self.records.with_name(f"{self.records.name}-{suffix}") if suffix else self.records
            self.record_dirs[name] = records
            started[name] = self._spawn(name, [
                sys.executable, "-m", "nhi_gateway.bench", "gateway", *self.resolve, "--",
                "run", "--policy", str(policy), *extra,
                "--listen", "127.0.0.1:0", "--confdir", str(w / "gateway-confdir"),
                "--recordings", str(records), "--upstream-ca", self.upstream_ca,
                "--ready-file", str(w / f"{name}.json"),
                # The gateway's own key fetches (httpx) take its --resolve; anyio keeps the port 443
                # of the URL whatever getaddrinfo says.
                "--resolve", f"login.microsoftonline.com=127.0.0.1:{self.lookalike_port}",
                "--resolve", f"sts.windows.net=127.0.0.1:{self.lookalike_port}",
            ], w / f"{name}.json", env)
        for name, proc in started.items():
            ready = await wait_for_json(w / f"{name}.json", proc)
            self.proxies[name] = proc
            self.targets[name] = load.Target(name, ("127.0.0.1", ready["port"]), load.client_tls(ready["ca_cert"]))

    def stop_gateways(self, names: list[str]) -> None:
        """Stop these gateways now (the others run on); they are no longer targets."""
        for name in names:
            self.targets.pop(name, None)
            proc = self.proxies.pop(name, None)
            if proc is not None:
                proc.stop()

    def _spawn(self, name: str, argv: list[str], ready: Path | None, env: dict[str, str] | None = None) -> Process:
        proc = spawn(name, argv, self.workdir, ready, env)
        self.processes.append(proc)
        return proc

    def _mint(self, la: dict) -> str:
        from nhi_gateway.lookalike.minting import EntraAuthority

        app = la["apps"]["mcp-directory"]
        authority = EntraAuthority.open(Path(la["signing_keys_dir"]))
        return authority.mint_app_token(
            tenant_id=la["tenant_id"], app_id=app["client_id"], object_id=app["object_id"],
            display_name="mcp-directory", roles=tuple(app.get("roles", ())), lifetime=4 * 3600,
        )

    async def _fetch_canned(self, address: tuple[str, int], ca: str) -> CannedResponse:
        target = load.Target("lookalike", address, load.client_tls(ca), proxy=False)
        tunnel = await load.Tunnel.open(target, self.spec)
        try:
            status, headers, body = await tunnel.fetch(self.spec.h11_request())
        finally:
            await tunnel.close()
        if status != 200:
            raise RuntimeError(f"the look-alike answered {status} to the benchmark request: {body[:300]!r}")
        return CannedResponse(status, tuple(headers), body)

    async def _preflight(self, canned: CannedResponse) -> None:
        bodies = await self.preflight(list(self.targets))
        masked = bodies["gateway"] != bodies["bare"]
        self.info["preflight"] = {"gateway_masks_response": masked, "bare_passes_response": bodies["bare"] == canned.body}
        if not masked:
            self.say("warning: the gateway's answer equals bare mitmdump's: masking did not change it")

    async def preflight(self, names: list[str]) -> dict[str, bytes]:
        """One request through each target named: the benchmark measures successes only, so a
        refusal here (a policy that does not allow the caller, say) must stop the run, saying why.
        Returns each one's answer."""
        bodies = {}
        for name in names:
            tunnel = await load.Tunnel.open(self.targets[name], self.spec)
            try:
                status, _, body = await tunnel.fetch(self.spec.h11_request())
            finally:
                await tunnel.close()
            if status != 200:
                proc = self.proxies.get(name)
                raise RuntimeError(f"preflight through {name}: status {status}: {body[:500]!r}\n"
                                   + (tail(proc.log) if proc else ""))
            bodies[name] = body
        return bodies

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        if not self.settings.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self.settings.records:
                for records in {self.records, *self.record_dirs.values()}:
                    shutil.rmtree(records, ignore_errors=True)

    # --- measuring --------------------------------------------------------------------------

    def _pids(self, target: str) -> dict[str, int]:
        pids = {"upstream": self.upstream_proc.pid, "loadgen": os.getpid()}
        if target in self.proxies:
            pids["proxy"] = pid = self.proxies[target].pid
            # The gateway's recording process does part of each request's work on another core
            # (with --workers: the workers and each one's recording process).
            pids["proxy children"] = procstat.descendant_pids(pid)
        return pids

    async def measure(self, scenario: Scenario, target: str, round_: int) -> Measurement:
        s = self.settings
        t = self.targets[target]
        proxy = self.proxies.get(target)
        if proxy is not None:
            proxy.check_alive()
            procstat.reset_peak(proxy.pid)
        window = procstat.CpuWindow(self._pids(target))
        run = load.keep_alive if scenario.kind == "keep-alive" else load.new_connection_each
        # The CPU window covers the timed part only, not the warm-up or the opening of tunnels.
        result = await run(t, self.spec, scenario.concurrency, s.duration, on_start=window.start, on_end=window.stop)
        cpu = window.percent
        peak = procstat.status_kb(proxy.pid, "VmHWM") if proxy is not None else 0
        return Measurement(scenario.name, target, round_, result.requests, dict(result.errors), result.elapsed,
                           result.rps, result.percentile_ms(50), result.percentile_ms(99), cpu, peak)

    async def memory_run(self, target: str, requests: int) -> MemoryRun:
        proxy = self.proxies[target]
        t = self.targets[target]
        warm = min(5_000, max(500, requests // 10))
        await load.keep_alive(t, self.spec, 10, duration=120, max_requests=warm)
        run = MemoryRun(target, requests)
        run.samples.append((0, procstat.status_kb(proxy.pid, "VmRSS")))
        every = max(1, requests // 10)
        result = await load.keep_alive(
            t, self.spec, 10, duration=max(120.0, requests / 50), max_requests=requests,
            progress=lambda n: run.samples.append((n, procstat.status_kb(proxy.pid, "VmRSS"))), every=every)
        if run.samples[-1][0] != result.requests:
            run.samples.append((result.requests, procstat.status_kb(proxy.pid, "VmRSS")))
        run.errors = result.error_count
        run.rps = result.rps
        return run

    def gateway_records(self) -> dict:
        audit = self.records / "audit.jsonl"
        lines = 0
        if audit.exists():
            with open(audit, "rb") as f:
                lines = sum(1 for _ in f)
        recordings = [p for p in self.records.rglob("*") if p.is_file() and p.name != "audit.jsonl"]
        return {"directory": str(self.records), "audit_lines": lines, "recording_files": len(recordings),
                "recording_bytes": sum(p.stat().st_size for p in recordings)}


def median_measurement(ms: list[Measurement]) -> dict:
    """Per metric, the median over rounds (one round: itself)."""
    if len(ms) == 1:
        return ms[0].to_dict()
    first = ms[0]
    errors: dict[str, int] = {}
    for m in ms:
        for k, v in m.errors.items():
            errors[k] = errors.get(k, 0) + v
    median = Measurement(
        first.scenario, first.target, 0, sum(m.requests for m in ms), errors, sum(m.elapsed for m in ms),
        statistics.median(m.rps for m in ms), statistics.median(m.p50_ms for m in ms),
        statistics.median(m.p99_ms for m in ms),
        {k: statistics.median(m.cpu_percent.get(k, 0.0) for m in ms) for k in first.cpu_percent},
        max(m.peak_rss_kb for m in ms),
    )
    out = median.to_dict()
    out["proxy_cpu_ms_per_request"] = _num(statistics.median(m.proxy_cpu_ms for m in ms), 4)
    out["total_cpu_ms_per_request"] = _num(statistics.median(m.total_cpu_ms for m in ms), 4)
    return out


async def run_all(settings: Settings, say=print) -> dict:
    bench = Bench(settings, say)
    started = time.monotonic()
    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C: the finally below stops every process.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    try:
        await bench.start()
        say(f"upstream: {settings.upstream}; policy: {settings.policy}; {settings.rounds} round(s) of "
            f"{settings.duration:g}s per scenario and target")
        raw: list[Measurement] = []
        for r in range(settings.rounds):
            for scenario in SCENARIOS:
                # Alternate the order between rounds, so drift (a warming disk, a busy neighbour)
                # does not always favour the same proxy.
                order = ["bare", "gateway"] if r % 2 == 0 else ["gateway", "bare"]
                if scenario.direct:
                    order.append("direct")
                if scenario.workers:
                    order.append("gateway-w2")
                if scenario.recording:
                    order.append("bare-w")
                for target in order:
                    m = await bench.measure(scenario, target, r + 1)
                    raw.append(m)
                    say(m.line())
        memory = []
        for target in ("bare", "gateway"):
            say(f"  memory: {settings.memory_requests:,} keep-alive requests (c=10) through {target} ...")
            memory.append(await bench.memory_run(target, settings.memory_requests))
        profile = None
        if settings.profile > 0:
            from nhi_gateway.bench.profile import profile_gateway

            say(f"  profiling the gateway with py-spy for {settings.profile:g}s under keep-alive c=10 ...")
            profile = await profile_gateway(bench, settings.profile)
        hook_cpu = None
        if settings.hooks > 0:
            say(f"  CPU per addon hook: a gateway of its own, {settings.hooks:g}s under keep-alive c=10 ...")
            hook_cpu = await hooks.measure(bench, settings.hooks, say)
        records = bench.gateway_records()
        # Last, with its own gateways: what a grant looked up in PostgreSQL adds (issue 15).
        measured, grant_lookup = await grants.measure(bench, LATENCY, say)
        raw += measured
    finally:
        bench.stop()
    say("  decision time: parsing generated policies of 10 and 5,000 rules ...")
    timings = decisions.measure((10, 5000), settings.decisions)
    grouped: dict[tuple[str, str], list[Measurement]] = {}
    for m in raw:
        grouped.setdefault((m.scenario, m.target), []).append(m)
    summary = [median_measurement(ms) for ms in grouped.values()]
    return {
        "machine": machine(),
        "settings": {"mode": "quick" if settings.quick else "full", "duration_s": settings.duration,
                     "rounds": settings.rounds, "memory_requests": settings.memory_requests,
                     "upstream": settings.upstream, "policy": str(settings.policy),
                     "records": str(settings.records or "workdir"),
                     "request": f"GET https://{GRAPH}{REQUEST_TARGET} (Authorization: Bearer, RS256)"},
        "preflight": bench.info.get("preflight", {}),
        "gateway_records": records,
        "measurements": [m.to_dict() for m in raw],
        "summary": summary,
        "memory": [m.to_dict() for m in memory],
        "decisions": [t.to_dict() for t in timings],
        "profile": profile,
        "hook_cpu": hook_cpu,
        "grant_lookup": grant_lookup,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
