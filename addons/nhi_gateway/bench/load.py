"""The load generator: HTTPS requests through a forward proxy (CONNECT, then TLS) or straight to
the upstream, in bounded closed loops, timing every request.

It runs in the benchmark's own process on asyncio, with h11 (the HTTP/1.1 state machine that
mitmproxy, httpx and uvicorn use) on plain stream sockets: a general-purpose client such as httpx
costs several times more CPU per request, and on a two-core machine every cycle the client burns is
taken from the proxy it measures. Its own CPU use is reported next to every figure.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import h11

READ_SIZE = 65536
IO_TIMEOUT = 10.0  # a request that takes this long counts as an error, it does not hang the run


@dataclass(frozen=True)
class Target:
    """Where the load goes: through a proxy (``proxy`` set) or straight to the upstream."""

    name: str
    address: tuple[str, int]  # the TCP peer: the proxy, or the upstream itself
    tls: ssl.SSLContext  # trusts the proxy's CA (or the upstream's, when direct)
    proxy: bool = True


@dataclass(frozen=True)
class RequestSpec:
    host: str
    target: str  # path and query
    token: str
    port: int = 443

    def h11_request(self) -> h11.Request:
        return h11.Request(method="GET", target=self.target, headers=[
            ("Host", self.host),
            ("Authorization", f"Bearer {self.token}"),
            ("Accept", "application/json"),
            ("User-Agent", "nhi-gateway-bench/1"),
        ])


class ProtocolFailure(Exception):
    """The peer answered something other than what the benchmark expects."""


@dataclass
class Result:
    """One scenario against one target: what was completed in the timed window."""

    requests: int = 0  # completed with the expected status
    errors: Counter = field(default_factory=Counter)  # kind -> count
    elapsed: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_ns:
            return math.nan
        ordered = sorted(self.latencies_ns)
        index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
        return ordered[index] / 1e6


class Tunnel:
    """One client connection: CONNECT through the proxy (unless direct), TLS, then keep-alive
    HTTP/1.1 requests, one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.http = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, target: Target, spec: RequestSpec) -> Tunnel:
        reader, writer = await asyncio.open_connection(*target.address)
        try:
            if target.proxy:
                await cls._connect(reader, writer, spec)
            await writer.start_tls(target.tls, server_hostname=spec.host)
        except BaseException:
            writer.transport.abort()
            raise
        return cls(reader, writer)

    @staticmethod
    async def _connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, spec: RequestSpec) -> None:
        authority = f"{spec.host}:{spec.port}"
        conn = h11.Connection(h11.CLIENT)
        writer.write(conn.send(h11.Request(method="CONNECT", target=authority, headers=[("Host", authority)])))
        writer.write(conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(READ_SIZE)
                if not data:
                    raise ProtocolFailure("proxy closed the connection after CONNECT")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                if event.status_code != 200:
                    raise ProtocolFailure(f"CONNECT answered {event.status_code}")
            elif event is h11.PAUSED:  # 2xx to CONNECT: the connection now carries the tunnel
                if conn.trailing_data[0]:
                    raise ProtocolFailure("proxy sent bytes before the TLS handshake")
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise ProtocolFailure("proxy closed the connection after CONNECT")

    async def request(self, request: h11.Request) -> int:
        """Send one request and read the whole response; returns its status. After it the
        connection is ready for the next request, or ``reusable`` is False."""
        http = self.http
        self.writer.write(http.send(request) + http.send(h11.EndOfMessage()))
        status = 0
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ_SIZE)
                http.receive_data(data)  # b"" tells h11 the peer closed
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ProtocolFailure("connection closed before the response ended")
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
        return status

    async def fetch(self, request: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
        """One request, keeping the whole response: status, headers and body."""
        http = self.http
        self.writer.write(http.send(request) + http.send(h11.EndOfMessage()))
        status, headers, body = 0, [], bytearray()
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(await self.reader.read(READ_SIZE))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ProtocolFailure("connection closed before the response ended")

    @property
    def reusable(self) -> bool:
        return self.http.our_state is h11.IDLE

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (OSError, TimeoutError, ssl.SSLError):
            pass


def _error_kind(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, ProtocolFailure):
        return str(e)
    return type(e).__name__


class _Budget:
    """Stops a closed loop at a deadline or after a number of requests, whichever comes first."""

    def __init__(self, duration: float, max_requests: int | None) -> None:
        self.deadline = time.perf_counter() + duration
        self.remaining = max_requests if max_requests is not None else math.inf

    def take(self) -> bool:
        if self.remaining <= 0 or time.perf_counter() >= self.deadline:
            return False
        self.remaining -= 1
        return True


async def keep_alive(target: Target, spec: RequestSpec, concurrency: int, duration: float,
                     max_requests: int | None = None, warmup: int = 20, expect: int = 200,
                     progress: Callable[[int], None] | None = None, every: int = 0,
                     on_start: Callable[[], None] | None = None, on_end: Callable[[], None] | None = None,
                     ) -> Result:
    """``concurrency`` tunnels, each sending one request after another. Opening the tunnels and
    ``warmup`` requests per tunnel happen before the timed window. ``progress(n)`` is called
    after every ``every`` completed requests (to sample the proxy's memory along the way);
    ``on_start``/``on_end`` bracket the timed window (to measure CPU over exactly that)."""
    request = spec.h11_request()
    tunnels = await asyncio.gather(*(Tunnel.open(target, spec) for _ in range(concurrency)))
    for _ in range(warmup):
        await asyncio.gather(*(t.request(request) for t in tunnels))
    result = Result()
    budget = _Budget(duration, max_requests)

    async def worker(tunnel: Tunnel) -> None:
        while budget.take():
            started = time.perf_counter_ns()
            try:
                status = await asyncio.wait_for(tunnel.request(request), IO_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - counted, then a fresh tunnel
                result.errors[_error_kind(e)] += 1
                tunnel.writer.transport.abort()
                try:
                    tunnel = await asyncio.wait_for(Tunnel.open(target, spec), IO_TIMEOUT)
                except Exception as e2:  # noqa: BLE001
                    result.errors[_error_kind(e2)] += 1
                    await asyncio.sleep(0.05)
                continue
            if status == expect:
                result.requests += 1
                result.latencies_ns.append(time.perf_counter_ns() - started)
                if progress is not None and every and result.requests % every == 0:
                    progress(result.requests)
            else:
                result.errors[f"status {status}"] += 1
            if not tunnel.reusable:
                await tunnel.close()
                tunnel = await asyncio.wait_for(Tunnel.open(target, spec), IO_TIMEOUT)
        await tunnel.close()

    if on_start is not None:
        on_start()
    start = time.perf_counter()
    await asyncio.gather(*(worker(t) for t in tunnels))
    result.elapsed = time.perf_counter() - start
    if on_end is not None:
        on_end()
    return result


async def new_connection_each(target: Target, spec: RequestSpec, concurrency: int, duration: float,
                              max_requests: int | None = None, warmup: int = 5, expect: int = 200,
                              on_start: Callable[[], None] | None = None,
                              on_end: Callable[[], None] | None = None) -> Result:
    """Every request on its own connection: TCP, CONNECT, TLS handshake, one request, close.
    The latency counts from the TCP connect to the end of the response."""
    request = spec.h11_request()

    async def one() -> int:
        tunnel = await Tunnel.open(target, spec)
        try:
            return await tunnel.request(request)
        finally:
            # Not awaited inside the timed part: the close_notify exchange is not the request's.
            asyncio.get_running_loop().create_task(tunnel.close())

    for _ in range(warmup):
        await asyncio.gather(*(one() for _ in range(concurrency)))
    result = Result()
    budget = _Budget(duration, max_requests)

    async def worker() -> None:
        while budget.take():
            started = time.perf_counter_ns()
            try:
                status = await asyncio.wait_for(one(), IO_TIMEOUT)
            except Exception as e:  # noqa: BLE001
                result.errors[_error_kind(e)] += 1
                continue
            if status == expect:
                result.requests += 1
                result.latencies_ns.append(time.perf_counter_ns() - started)
            else:
                result.errors[f"status {status}"] += 1

    if on_start is not None:
        on_start()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - start
    if on_end is not None:
        on_end()
    await asyncio.sleep(0.2)  # let the last closes finish before the next scenario
    return result


def client_tls(ca_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_file)
    # What Python clients (requests, httpx) negotiate by default; no session reuse, so each new
    # connection pays a full handshake as a fresh client process would.
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
