"""Where the gateway's event loop spends its CPU, per addon hook (``scripts/bench --hooks SECONDS``).

A gateway of its own is started with ``NHI_HOOK_CPU=<file>`` (see
:class:`nhi_gateway.proxy.dispatch.HookClock`): it adds up the CPU time of its event-loop thread
in each addon's hook, async hooks step by step without the time they wait, and writes the totals
to the file every second under load. Two snapshots taken under keep-alive c=10 load, divided by the
responses between them, give microseconds of CPU per request and hook.

Unlike a sampling profiler, the thread's own CPU clock does not count the time the process was
runnable but not running (on two cores, the recording process, the upstream and the load generator
take turns with it): py-spy puts that time in whatever call the process was in, such as the pipe
write that woke the recording process. The accounting costs about a microsecond per hook call, so
this gateway is measured apart from the others.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from nhi_gateway.bench import load
from nhi_gateway.proxy.dispatch import HOOK_CPU_ENV

WARM_UP = 2.0  # seconds of load before the first snapshot (the file is written every second)


def read_snapshot(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def per_request(before: dict, after: dict) -> dict:
    """Microseconds of CPU per request, by ``Addon.hook``, between two snapshots, most first."""
    responses = after["events"].get("response", 0) - before["events"].get("response", 0)
    if responses <= 0:
        return {"responses": 0, "hooks": [], "total_us": 0.0}
    rows = []
    for key, ns in after["hooks"].items():
        us = (ns - before["hooks"].get(key, 0)) / responses / 1000
        if us >= 0.05:
            rows.append((key, round(us, 1)))
    rows.sort(key=lambda row: -row[1])
    return {"responses": responses, "hooks": rows, "total_us": round(sum(us for _, us in rows), 1)}


async def measure(bench, seconds: float, say) -> dict | None:
    """Start the hook-timed gateway, load it at keep-alive c=10, return :func:`per_request`."""
    path = bench.workdir / "hook-cpu.json"
    path.unlink(missing_ok=True)
    await bench.start_gateways({"gateway-hooks": (bench.settings.policy, [])}, env={HOOK_CPU_ENV: str(path)})
    try:
        target = bench.targets["gateway-hooks"]
        run = asyncio.ensure_future(load.keep_alive(target, bench.spec, 10, duration=WARM_UP + seconds + 1.5))
        await asyncio.sleep(WARM_UP)
        before = read_snapshot(path)
        await asyncio.sleep(seconds)
        after = read_snapshot(path)
        result = await run
        if before is None or after is None:
            say("  hook CPU: the gateway wrote no snapshot")
            return None
        out = per_request(before, after)
        out["rps"] = round(result.rps, 1)
        out["errors"] = result.error_count
        return out
    finally:
        bench.stop_gateways(["gateway-hooks"])


def render(hooks: dict) -> list[str]:
    lines = [f"gateway CPU per request by addon hook (its event loop's thread CPU clock, keep-alive c=10, "
             f"{hooks['responses']:,} requests; a gateway measured apart, the accounting adds about 1 us a hook):"]
    for key, us in hooks["hooks"]:
        lines.append(f"  {us:7.1f} us  {key}")
    lines.append(f"  {hooks['total_us']:7.1f} us  in all hooks (the rest of the process's CPU is mitmproxy, asyncio and TLS)")
    return lines
