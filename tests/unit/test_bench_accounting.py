"""What the benchmark counts: a proxy's child processes are part of its CPU, the gateway's hook
dispatch is mitmproxy's cost rather than the gateway's, and a thread waiting on a condition is idle.
(The benchmark measures speed; these tests only check its bookkeeping, never a timing.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from nhi_gateway.bench import procstat, profile
from nhi_gateway.bench.report import comparisons, recording_reference


def test_a_proxys_children_are_found_and_their_cpu_counted():
    burn = ("import sys, time\nsys.stdin.readline()\nt = time.process_time()\n"
            "while time.process_time() - t < 0.5: pass\nprint('done', flush=True)\nsys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.pid in procstat.child_pids(os.getpid())
        window = procstat.CpuWindow({"children": procstat.child_pids(os.getpid())})
        window.start()
        started = time.perf_counter()
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"  # 0.5 s of CPU burnt inside the window
        wall = time.perf_counter() - started
        cpu_seconds = window.stop()["children"] / 100 * wall
        assert cpu_seconds >= 0.4
    finally:
        child.kill()
        child.wait()


def _summary(target: str, proxy_ms: float, total_ms: float) -> dict:
    return {"scenario": "keep-alive c=10", "target": target, "rps": 100.0, "p50_ms": 1.0, "p99_ms": 2.0,
            "peak_rss_kb": 1000, "proxy_cpu_ms_per_request": proxy_ms, "total_cpu_ms_per_request": total_ms}


def test_the_ratio_with_child_processes_is_reported_beside_the_proxys():
    (c,) = comparisons({"summary": [_summary("bare", 1.0, 1.0), _summary("gateway", 1.0, 1.3)]})
    assert c["proxy_cpu_per_request_ratio"] == 1.0
    assert c["total_cpu_per_request_ratio"] == 1.3


def test_mitmdump_writing_flows_is_a_reference_beside_bare_not_instead_of_it():
    summary = [_summary("bare", 1.0, 1.0), _summary("bare-w", 1.4, 1.4), _summary("gateway", 1.2, 1.54)]
    (c,) = comparisons({"summary": summary})
    assert c["total_cpu_per_request_ratio"] == 1.54  # the target still compares with bare
    (r,) = recording_reference({"summary": summary})
    assert (r["scenario"], r["total_cpu_per_request_ratio"]) == ("keep-alive c=10", 1.1)
    assert recording_reference({"summary": summary[::2]}) == []  # not measured: nothing reported


def test_the_hook_dispatch_counts_as_mitmproxy_and_a_condition_wait_as_idle():
    dispatch = ("nhi_gateway/dispatch.py", "IndexedAddonManager.trigger_event")
    builtin = ("mitmproxy/addons/core.py", "Core.request")
    ours = ("nhi_gateway/addons/identity.py", "Identity.request")
    assert profile._area([dispatch])[0].startswith("mitmproxy")
    assert profile._area([dispatch, builtin])[0].startswith("mitmproxy")
    assert profile._area([dispatch, ours]) == ("nhi_gateway", "nhi_gateway/addons/identity.py")
    assert profile.is_idle(("threading.py", "Condition.wait"))
    assert not profile.is_idle(ours)
