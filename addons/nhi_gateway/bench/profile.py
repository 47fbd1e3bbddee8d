"""Where the gateway spends its time under load: py-spy samples of the running gateway process,
grouped into the gateway's own addons (by module) and everything else (mitmproxy, TLS, asyncio).

py-spy samples from outside the process (``--nonblocking``: without pausing it) and is not a
dependency of the project; ``pip install py-spy`` to use ``scripts/bench --profile SECONDS``.
Samples include idle ones (``--idle``), so time blocked in a system call the gateway makes on the
event loop (``fsync`` of the audit trail, say) is counted, under the Python line that made it.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections import Counter
from pathlib import Path

from nhi_gateway.bench import load

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
# Frames at the root of every stack of the gateway process (how it was started): not a cost.
_LAUNCH = ("nhi_gateway/bench/", "nhi_gateway/cli.py", "nhi_gateway/gateway.py")
_WRAPPER = "addons/failclosed.py"


def short_path(path: str) -> str:
    """``/x/site-packages/mitmproxy/http.py`` -> ``mitmproxy/http.py``; ours from ``nhi_gateway/``."""
    if "/nhi_gateway/" in path:
        return "nhi_gateway/" + path.rsplit("/nhi_gateway/", 1)[1]
    if "site-packages/" in path:
        return path.rsplit("site-packages/", 1)[1]
    m = re.search(r"/lib/python3\.\d+/(.*)$", path)
    if m:
        return m.group(1)
    return path


def parse_frame(frame: str) -> tuple[str, str]:
    """``"request (/x/addons/nhi_gateway/addons/identity.py:190)"`` -> (file, function)."""
    m = _FRAME.match(frame.strip())
    if not m:
        return "?", frame.strip()
    return short_path(m.group("file")), m.group("func")


def is_idle(leaf: tuple[str, str]) -> bool:
    """A thread waiting for work: the event loop in select, an executor thread on its queue."""
    file, func = leaf
    func = func.rpartition(".")[2]  # py-spy names methods "Class.method"
    return ((file.endswith("selectors.py") and func.endswith(("select", "poll")))
            or (file.endswith("concurrent/futures/thread.py") and func == "_worker")
            or (file.endswith("threading.py") and func in ("wait", "_wait_for_tstate_lock")))


# The gateway's hook dispatch stands in for mitmproxy's addon manager: what it calls is not ours.
_DISPATCH = "nhi_gateway/dispatch.py"


def _area(frames: list[tuple[str, str]]) -> tuple[str, str | None]:
    """(area, module of ours) of one busy sample."""
    if frames[-1][0] == _DISPATCH:
        return "mitmproxy's own code (layers, HTTP/1, addon manager, flow objects)", None
    ours = [f for f in frames if f[0].startswith("nhi_gateway/") and not f[0].startswith(_LAUNCH)
            and f[0] != _DISPATCH]
    if ours:
        # The fail-closed decorator wraps every hook: name the module whose hook it wraps.
        inner = [f for f in ours if not f[0].endswith(_WRAPPER)]
        return "nhi_gateway", (inner or ours)[0][0]
    files = {f[0] for f in frames}
    leaf = frames[-1][0]
    if "ssl" in leaf.lower() or "OpenSSL" in leaf:
        return "TLS (ssl, pyOpenSSL)", None
    if any(f.startswith("mitmproxy/") for f in files) and leaf.startswith("mitmproxy/"):
        return "mitmproxy's own code (layers, HTTP/1, addon manager, flow objects)", None
    return "asyncio, stdlib and other libraries (called from mitmproxy)", None


def summarize(folded: str, seconds: float, top: int = 30) -> dict:
    """Turn py-spy's raw (folded) output into shares of the gateway's busy samples: time spent
    running Python or blocked in a system call made on a busy thread (fsync, write), excluding
    threads that wait for work."""
    total = busy = 0
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    for line in folded.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [parse_frame(f) for f in stack_text.split(";") if f.strip()]
        if not frames:
            continue
        total += count
        if is_idle(frames[-1]):
            continue
        busy += count
        keys = [f"{file}:{func}" for file, func in frames if not file.startswith(_LAUNCH) and file != "<frozen runpy>"]
        for key in set(keys):
            inclusive[key] += count
        if keys:
            self_[keys[-1]] += count
        area, module = _area(frames)
        areas[area] += count
        if module:
            modules[module] += count

    def pct(n: int) -> float:
        return round(100 * n / busy, 1) if busy else 0.0

    ordered = sorted(areas.items(), key=lambda kv: (kv[0] != "nhi_gateway", -kv[1]))
    area_rows: list[tuple[str, float]] = []
    for name, n in ordered:
        area_rows.append((name + (" (all its code, inclusive)" if name == "nhi_gateway" else ""), pct(n)))
        if name == "nhi_gateway":
            area_rows += [(f"  {m}", pct(c)) for m, c in modules.most_common()]
    ours = [k for k in sorted(inclusive, key=lambda k: -inclusive[k]) if k.startswith("nhi_gateway/")][:top]
    return {
        "samples": total,
        "busy_samples": busy,
        "seconds": seconds,
        "areas": area_rows,
        "functions": [(k, pct(inclusive[k]), pct(self_[k])) for k in ours],
        "self_top": [(k, pct(n)) for k, n in self_.most_common(top)],
    }


RATE = 250  # samples per second


async def profile_target(bench, target: str, seconds: float) -> dict | None:
    """Sample one proxy (``bare`` or ``gateway``) for ``seconds`` under keep-alive c=10 load."""
    py_spy = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    if not Path(py_spy).exists():
        bench.say("  py-spy is not installed (pip install py-spy): no profile")
        return None
    out = bench.workdir / f"{target}-profile.folded"
    proc = await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(bench.proxies[target].pid), "--rate", str(RATE), "--idle",
        "--nonblocking", "--full-filenames", "--format", "raw", "--duration", str(int(round(seconds))), "--output", str(out),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    result = await load.keep_alive(bench.targets[target], bench.spec, 10, duration=seconds + 2)
    _, err = await proc.communicate()
    if proc.returncode != 0 or not out.exists():
        bench.say(f"  py-spy failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
        return None
    summary = summarize(out.read_text(errors="replace"), seconds, top=300)
    summary["rps"] = result.rps
    summary["folded_file"] = str(out)
    # One sample stands for 1/RATE s of the process: busy samples per request are CPU per request.
    per_request = 1e6 / RATE / max(result.rps * seconds, 1)
    summary["us_per_request"] = {
        "busy": round(summary["busy_samples"] * per_request, 1),
        "areas": [(name, round(pct / 100 * summary["busy_samples"] * per_request, 1)) for name, pct in summary["areas"]],
        "self_top": [(fn, round(pct / 100 * summary["busy_samples"] * per_request, 1)) for fn, pct in summary["self_top"]],
    }
    return summary


async def profile_gateway(bench, seconds: float) -> dict | None:
    """The gateway's profile, with bare mitmdump's under the same load for comparison."""
    gateway = await profile_target(bench, "gateway", seconds)
    if gateway is not None:
        gateway["bare"] = await profile_target(bench, "bare", seconds)
    return gateway
