"""The soak (``scripts/soak``) works: a few seconds of it here, and its checks catch what they
must. The real soak (minutes at 80 % of capacity) is run by hand, never by the test suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nhi_gateway.bench import soak


def test_a_short_soak_accounts_for_every_request(tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "-m", "nhi_gateway.bench.soak", "--seconds", "4", "--rate", "25", "--json", str(out)],
        capture_output=True, text=True, timeout=110,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sent"] >= 90 and report["violations"] == [] and report["errors"] == {}
    assert set(report["by_kind"]) == {"allowed", "denied", "no-rule", "bad-token"}
    assert report["by_kind"]["allowed"] == {"200": report["by_kind"]["allowed"]["200"]}
    assert report["by_kind"]["bad-token"].keys() == {"401"} and report["by_kind"]["denied"].keys() == {"403"}
    # Every request in the audit trail and the recordings once; the refused never reached Graph.
    assert report["audit_lines"] == report["sent"] and report["recorded_flows"] == report["sent"]
    assert report["lost_in_audit"] == report["lost_in_recordings"] == report["refused_reached_upstream"] == 0
    assert report["rss_kb"], "memory was not sampled"
    assert "OK: every request answered as intended" in run.stdout


class _Rig:
    """What :func:`soak.account` reads: a work directory with recordings, audit and upstream log."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.recordings = workdir / "recordings"
        self.recordings.mkdir()
        (workdir / "lookalike").mkdir()
        self.gateway = None


def _traffic(markers: list[tuple[str, str, int]]) -> soak.Traffic:
    t = soak.Traffic(None, "token", "forged", soak.DEFAULT_MIX, concurrency=1, requests_per_connection=1)
    t.sent = [soak.Sent(m, kind, status, masked=True) for m, kind, status in markers]
    t.latencies_ns = [1_000_000] * len(markers)
    return t


def test_the_accounting_names_lost_duplicated_and_leaked_flows(tmp_path):
    """The checks are not vacuous: a flow missing from the audit trail, one recorded twice, a
    refused one that reached Graph and a wrong status are each reported as a violation."""
    from mitmproxy import io
    from mitmproxy.test import tflow

    rig = _Rig(tmp_path)
    sent = [("r-1", "allowed", 200), ("r-2", "denied", 403), ("r-3", "bad-token", 500)]
    (rig.recordings / "audit.jsonl").write_text(  # r-1 missing; no hash chain either
        "".join(json.dumps({"url": f"https://graph.microsoft.com/v1.0/users?soak={m}"}) + "\n" for m in ("r-2", "r-3")))
    with open(rig.recordings / "a.mitm", "wb") as f:
        writer = io.FlowWriter(f)
        for m in ("r-1", "r-2", "r-2", "r-3"):
            flow = tflow.tflow(resp=True)
            flow.request.path = f"/v1.0/users?soak={m}"
            writer.add(flow)
    (tmp_path / "lookalike" / "received.jsonl").write_text(
        "".join(json.dumps({"path": f"/v1.0/users?soak={m}"}) + "\n" for m in ("r-1", "r-2")))
    report = soak.Report(settings={"concurrency": 1})
    soak.account(report, _traffic(sent), rig, soak.Settings(rate=None))
    assert (report.lost_in_audit, report.duplicated_in_recordings, report.refused_reached_upstream) == (1, 1, 1)
    assert report.errors == {"bad-token: status 500 (expected 401)": 1}
    joined = "\n".join(report.violations)
    for words in ("not in the audit trail", "in the recordings more than once", "refused, yet received by Graph",
                  "did not get their intended answer", "audit chain does not verify"):
        assert words in joined
    assert "VIOLATIONS" in soak.render(report)


def test_memory_growth_is_judged_from_the_first_to_the_last_quarter():
    flat = [(t, 100_000 + (t % 3)) for t in range(40)]
    growing = [(t, 100_000 + 1_000 * t) for t in range(40)]
    assert abs(soak.rss_figures(flat)[0]) < 0.001
    growth, slope = soak.rss_figures(growing)
    assert growth > 0.25 and round(slope) == 60_000
