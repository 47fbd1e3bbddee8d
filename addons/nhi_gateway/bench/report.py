"""The benchmark's results as people read them: tables, ratios against bare mitmdump, what a grant
lookup in PostgreSQL adds, and the project's targets (issues 7 and 15), each marked met or not. The
run never fails on a target."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nhi_gateway.bench import hooks

SATURATED = 90.0  # % of one core: a process this busy is (one of) what limits the run


@dataclass(frozen=True)
class TargetCheck:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measurable in this run

    def to_dict(self) -> dict:
        return {"target": self.name, "goal": self.goal, "measured": self.measured,
                "met": self.met}


def json_safe(value):
    """JSON has no NaN or infinity: figures that could not be measured become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _by(summary: list[dict]) -> dict[tuple[str, str], dict]:
    return {(m["scenario"], m["target"]): m for m in summary}


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else math.nan


def _side_by_side(results: dict, reference: str):
    """``(scenario, reference's figures, the gateway's)`` for each scenario that measured both."""
    by = _by(results["summary"])
    for scenario in dict.fromkeys(m["scenario"] for m in results["summary"]):
        ref, gw = by.get((scenario, reference)), by.get((scenario, "gateway"))
        if ref and gw:
            yield scenario, ref, gw


def comparisons(results: dict) -> list[dict]:
    """Per scenario: gateway/bare throughput, added latency, peak memory ratio."""
    out = []
    for scenario, bare, gw in _side_by_side(results, "bare"):
        out.append({
            "scenario": scenario,
            "throughput_ratio": round(_ratio(gw["rps"], bare["rps"]), 3),
            "added_p50_ms": round((gw["p50_ms"] or math.nan) - (bare["p50_ms"] or math.nan), 3),
            "added_p99_ms": round((gw["p99_ms"] or math.nan) - (bare["p99_ms"] or math.nan), 3),
            "peak_rss_ratio": round(_ratio(gw["peak_rss_kb"], bare["peak_rss_kb"]), 2),
            "proxy_cpu_per_request_ratio": round(
                _ratio(gw["proxy_cpu_ms_per_request"], bare["proxy_cpu_ms_per_request"]), 2),
            "added_cpu_ms_per_request": round(
                (gw["proxy_cpu_ms_per_request"] or math.nan) - (bare["proxy_cpu_ms_per_request"] or math.nan), 3),
            # With the proxies' child processes: the gateway's recording process works on another core.
            "total_cpu_per_request_ratio": round(
                _ratio(gw.get("total_cpu_ms_per_request"), bare.get("total_cpu_ms_per_request")), 2),
        })
    return out


def recording_reference(results: dict) -> list[dict]:
    """Per scenario measured with it: the gateway against bare mitmdump writing every flow (``-w``),
    all processes' CPU per request and throughput. A reference for what recording costs in
    mitmproxy itself (which writes flows unredacted and keeps no audit trail), not a target."""
    out = []
    for scenario, ref, gw in _side_by_side(results, "bare-w"):
        out.append({
            "scenario": scenario,
            "bare_w_cpu_ms_per_request": ref.get("total_cpu_ms_per_request"),
            "gateway_cpu_ms_per_request": gw.get("total_cpu_ms_per_request"),
            "total_cpu_per_request_ratio": round(
                _ratio(gw.get("total_cpu_ms_per_request"), ref.get("total_cpu_ms_per_request")), 2),
            "throughput_ratio": round(_ratio(gw["rps"], ref["rps"]), 3),
        })
    return out


def grant_lookup(results: dict) -> dict | None:
    """What a grant lookup in PostgreSQL added (:mod:`.grants`): pg-grant over pg-allow at
    keep-alive c=1, with what was counted; or why it was not measured. None: not attempted."""
    info = results.get("grant_lookup")
    if not info:
        return None
    out = dict(info)
    if info.get("status") != "measured":
        return out
    by = _by(results["summary"])
    allow, grant = (by.get((info["scenario"], t)) for t in info["targets"])
    if not allow or not grant:
        return {**out, "status": "failed", "why": "no measurement of " + " or ".join(info["targets"])}
    out.update(allow=allow, grant=grant,
               added_p50_ms=round((grant["p50_ms"] or math.nan) - (allow["p50_ms"] or math.nan), 3),
               added_p99_ms=round((grant["p99_ms"] or math.nan) - (allow["p99_ms"] or math.nan), 3))
    reads, granted = info.get("grants_table_reads"), info.get("granted_requests", 0)
    # Each request the grant allowed must have read the grants table for the figure to be a lookup's cost.
    out["every_request_read"] = None if reads is None else reads >= granted > 0
    return out


def targets(results: dict) -> list[TargetCheck]:
    comp = {c["scenario"]: c for c in comparisons(results)}
    checks = []
    c10 = comp.get("keep-alive c=10")
    if c10:
        r = c10["throughput_ratio"]
        ceiling = 1 / c10["proxy_cpu_per_request_ratio"] if c10["proxy_cpu_per_request_ratio"] else math.nan
        checks.append(TargetCheck("throughput", "gateway >= 90 % of bare mitmdump (keep-alive, c=10)",
                                  f"{r:.0%} (CPU per request allows at most {ceiling:.0%})", r >= 0.90))
    c1 = comp.get("keep-alive c=1")
    if c1:
        checks.append(TargetCheck("added p50", "<= 1 ms (keep-alive, c=1)", f"{c1['added_p50_ms']:+.2f} ms",
                                  c1["added_p50_ms"] <= 1.0))
        checks.append(TargetCheck("added p99", "<= 5 ms (keep-alive, c=1)", f"{c1['added_p99_ms']:+.2f} ms",
                                  c1["added_p99_ms"] <= 5.0))
    total = [(name, comp[name]["total_cpu_per_request_ratio"]) for name in ("keep-alive c=10", "keep-alive c=1")
             if name in comp]
    if total:
        checks.append(TargetCheck(
            "all processes", "gateway's processes together <= 1.0x bare's CPU per request (keep-alive c=10, c=1)",
            ", ".join(f"{r:.2f}x at {name.removeprefix('keep-alive ')}" for name, r in total),
            all(r <= 1.0 for _, r in total)))
    gw_mem = next((m for m in results["memory"] if m["target"] == "gateway"), None)
    if gw_mem:
        full = gw_mem["requests"] >= 100_000
        checks.append(TargetCheck(
            "memory flat", "<= 10 % RSS growth over 100,000 requests",
            f"{gw_mem['growth']:+.1%} over {gw_mem['requests']:,}" + ("" if full else " (quick run: indicative)"),
            gw_mem["growth"] <= 0.10))
    by = _by(results["summary"])
    one, two = by.get(("keep-alive c=50", "gateway")), by.get(("keep-alive c=50", "gateway-w2"))
    if one and two:
        r = _ratio(two["rps"], one["rps"])
        checks.append(TargetCheck("workers", "--workers 2 >= 1.2x one worker's throughput (keep-alive, c=50)",
                                  f"{r:.2f}x", r >= 1.2))
        c = _ratio(two.get("total_cpu_ms_per_request"), one.get("total_cpu_ms_per_request"))
        checks.append(TargetCheck("workers CPU", "CPU per request with 2 workers within 10 % of 1 worker's",
                                  f"{c:.2f}x", c <= 1.10))
    d = {t["rules"]: t for t in results["decisions"]}
    if 10 in d and 5000 in d:
        r = _ratio(d[5000]["us_per_decision"], d[10]["us_per_decision"])
        checks.append(TargetCheck("decision time", "5,000 rules within 2x of 10 rules", f"{r:.2f}x", r <= 2.0))
    g = grant_lookup(results)
    if g:
        goal = "grant lookup on PostgreSQL adds <= 1 ms at p50 (keep-alive c=1)"
        if g["status"] != "measured":
            checks.append(TargetCheck("grant lookup", goal, f"not measured: {first_line(g['why'])}", None))
        else:
            checks.append(TargetCheck("grant lookup", goal, f"{g['added_p50_ms']:+.2f} ms (p99 {g['added_p99_ms']:+.2f} ms)",
                                      g["added_p50_ms"] <= 1.0))
    return checks


def warnings(results: dict) -> list[str]:
    """Conditions under which a ratio says less than it seems to, one line each."""
    out = []
    loadgen, upstream, saturated, others = [], [], [], []
    cores = results["machine"].get("nproc") or 1
    for m in results["summary"]:
        cpu = m["cpu_percent"]
        where = f"{m['scenario']} / {m['target']}"
        if cpu.get("loadgen", 0) >= SATURATED:
            loadgen.append(f"{where} ({cpu['loadgen']:.0f}%)")
        if cpu.get("upstream", 0) >= SATURATED:
            upstream.append(f"{where} ({cpu['upstream']:.0f}%)")
        others.append(cpu.get("others", 0.0))
        if sum(cpu.values()) >= 100 * cores * 0.95:
            saturated.append(where)
        if sum(m["errors"].values()):
            out.append(f"{where}: {sum(m['errors'].values())} errors: {m['errors']}")
    if loadgen:
        out.append("the load generator used most of a core, so it may be the limit, in: " + ", ".join(loadgen))
    if upstream:
        out.append("the upstream used most of a core, so it may be the limit, in: " + ", ".join(upstream))
    if others and max(others) >= 15:
        out.append(f"other processes on this machine used {min(others):.0f} to {max(others):.0f}% of a core during "
                   "the measurements: throughput and latency ratios are noisy; the proxy CPU per request is not")
    if saturated:
        out.append(f"all {cores} cores were busy in {len(saturated)} of {len(results['summary'])} measurements: "
                   "the proxies competed for CPU")
    for run in results["memory"]:
        if run["errors"]:
            out.append(f"memory run through {run['target']}: {run['errors']} errors")
    pre = results.get("preflight", {})
    if pre and not pre.get("gateway_masks_response", True):
        out.append("the gateway did not change the response: masking did not run")
    g = grant_lookup(results)
    if g and g.get("every_request_read") is False:
        out.append(f"grant lookup: {g['grants_table_reads']:,} reads of the grants table for {g['granted_requests']:,} "
                   "requests allowed by the grant: some decisions did not ask PostgreSQL, so the added latency is "
                   "not (only) a lookup's")
    return out


def first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row(cells, widths) -> str:
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def render(results: dict) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [
        "",
        f"nhi-gateway benchmark ({s['mode']}): {m['nproc']} cores, {m['cpu_model']}, Python {m['python']}, "
        f"mitmproxy {m['mitmproxy']}",
        f"request: {s['request']}; upstream: {s['upstream']}; policy: {s['policy']}",
        f"{s['rounds']} round(s) x {s['duration_s']:g}s per scenario and target; figures are medians over rounds",
        "",
    ]
    head = ["scenario", "target", "req/s", "p50 ms", "p99 ms", "errors", "peak RSS MiB", "cpu-ms/req",
            "with children", "cpu proxy", "its children", "cpu upstream", "cpu loadgen", "cpu others"]
    widths = [16, 8, 8, 7, 7, 6, 12, 10, 13, 9, 12, 12, 11, 10]
    lines.append(_row(head, widths))
    lines.append(_row(["-" * w for w in widths], widths))
    for r in results["summary"]:
        cpu = r["cpu_percent"]
        lines.append(_row([
            r["scenario"], r["target"], f"{r['rps']:.0f}", _ms(r["p50_ms"]), _ms(r["p99_ms"]),
            sum(r["errors"].values()), f"{r['peak_rss_kb'] / 1024:.0f}" if r["peak_rss_kb"] else "-",
            f"{r['proxy_cpu_ms_per_request']:.3f}" if "proxy" in cpu else "-",
            f"{r['total_cpu_ms_per_request']:.3f}" if "proxy" in cpu else "-",
            f"{cpu['proxy']:.0f}%" if "proxy" in cpu else "-",
            f"{cpu.get('proxy children', 0):.0f}%" if "proxy" in cpu else "-",
            f"{cpu['upstream']:.0f}%", f"{cpu['loadgen']:.0f}%",
            f"{cpu.get('others', 0):.0f}%",
        ], widths))
    lines += ["", "gateway / bare mitmdump:"]
    head = ["scenario", "throughput", "added p50", "added p99", "peak RSS", "proxy CPU per request",
            "with child processes"]
    widths = [16, 10, 10, 10, 8, 24, 20]
    lines.append(_row(head, widths))
    lines.append(_row(["-" * w for w in widths], widths))
    for c in comparisons(results):
        lines.append(_row([c["scenario"], f"{c['throughput_ratio']:.0%}", f"{c['added_p50_ms']:+.2f} ms",
                           f"{c['added_p99_ms']:+.2f} ms", f"{c['peak_rss_ratio']:.2f}x",
                           f"{c['proxy_cpu_per_request_ratio']:.2f}x ({c['added_cpu_ms_per_request']:+.2f} ms)",
                           f"{c['total_cpu_per_request_ratio']:.2f}x"],
                          widths))
    reference = recording_reference(results)
    if reference:
        lines += ["", "gateway / mitmdump -w (bare mitmdump writing every flow, unredacted, no audit trail; "
                      "a reference, not a target):"]
        for c in reference:
            lines.append(f"  {c['scenario']:16} all processes' CPU per request {c['total_cpu_per_request_ratio']:.2f}x "
                         f"({c['gateway_cpu_ms_per_request']:.3f} against {c['bare_w_cpu_ms_per_request']:.3f} ms), "
                         f"throughput {c['throughput_ratio']:.0%}")
    lines += ["", "memory over a long keep-alive run (c=10), VmRSS:"]
    for run in results["memory"]:
        lines.append(f"  {run['target']:8} {run['requests']:>9,} requests  {run['rss_start_kb'] / 1024:7.1f} MiB -> "
                     f"{run['rss_end_kb'] / 1024:7.1f} MiB  ({run['growth']:+.1%})  at {run['rps']:.0f} req/s")
    lines += ["", "decision time (Policy.decide, in-process, same callers and operations):"]
    for t in results["decisions"]:
        lines.append(f"  {t['rules']:>6,} rules  {t['us_per_decision']:7.2f} us/decision  "
                     f"(policy loaded in {t['load_seconds']:.2f}s)")
    rec = results.get("gateway_records") or {}
    if rec:
        lines += ["", f"gateway wrote {rec['audit_lines']:,} audit lines and {rec['recording_bytes'] / 2**20:.1f} MiB "
                      f"of recordings in {rec['recording_files']} file(s)"]
    g = grant_lookup(results)
    if g:
        lines += [""] + render_grant_lookup(g)
    lines += ["", "targets (issues 7 and 15):"]
    for t in targets(results):
        mark = "n/a " if t.met is None else ("PASS" if t.met else "FAIL")
        lines.append(f"  [{mark}] {t.name:14} {t.goal:55} measured {t.measured}")
    warn = warnings(results)
    if warn:
        lines += ["", "notes:"] + [f"  - {w}" for w in warn]
    if results.get("hook_cpu"):
        lines += ["", *hooks.render(results["hook_cpu"])]
    prof = results.get("profile")
    if prof:
        lines += ["", render_profile(prof)]
    lines.append(f"\nwall time {results['wall_seconds']:.0f}s")
    return "\n".join(lines)


def render_grant_lookup(g: dict) -> list[str]:
    if g["status"] != "measured":
        return [f"grant lookup on PostgreSQL: not measured: {first_line(g['why'])}"]
    allow, grant = g["targets"]
    granted = f"{g['granted_requests']:,} requests allowed by grant {g.get('grant_id', '?')} in the audit trail"
    reads = g.get("grants_table_reads")
    if reads is None:
        counted = f"the gateway caches no grant, so each decision of {grant} looks it up in PostgreSQL ({granted}; " \
                  "PostgreSQL's count of reads of the grants table was not available)"
    elif g.get("every_request_read"):
        counted = f"the gateway caches no grant: every decision of {grant} looked it up in PostgreSQL ({granted}; " \
                  f"PostgreSQL counted {reads:,} reads of the grants table)"
    else:
        counted = f"NOT every decision of {grant} looked the grant up in PostgreSQL ({granted}; PostgreSQL counted " \
                  f"{reads:,} reads of the grants table): see the notes"
    return [
        f"grant lookup on PostgreSQL ({g['scenario']}; gateways with --state {g['database']}, dropped after):",
        f"  {allow}: {g['policy']}, whose rule for the caller allows the request",
        f"  {grant}: the same policy, the caller's rule as an approve rule, and an active grant for the caller "
        "(given before measuring)",
        f"  {counted}",
        f"  added per request by the lookup and the approval stage around it ({grant} over {allow}): "
        f"p50 {g['added_p50_ms']:+.2f} ms, p99 {g['added_p99_ms']:+.2f} ms  "
        f"({grant} {_ms(g['grant']['p50_ms'])} / {_ms(g['grant']['p99_ms'])} ms, "
        f"{allow} {_ms(g['allow']['p50_ms'])} / {_ms(g['allow']['p99_ms'])} ms)",
    ]


def render_profile(prof: dict) -> str:
    lines = [f"gateway profile (py-spy, {prof['busy_samples']:,} busy samples of {prof['samples']:,} over "
             f"{prof['seconds']:g}s, {prof.get('rps', 0):.0f} req/s while sampled; % of busy samples):"]
    lines.append("  by area:")
    for name, pct in prof["areas"]:
        lines.append(f"    {pct:5.1f}%  {name}")
    lines.append("  the gateway's hottest functions (inclusive % / self %):")
    for fn, incl, self_ in prof["functions"][:20]:
        lines.append(f"    {incl:5.1f}% {self_:5.1f}%  {fn}")
    lines.append("  hottest functions overall (self %):")
    for fn, self_ in prof["self_top"][:15]:
        lines.append(f"    {self_:5.1f}%  {fn}")
    bare = prof.get("bare")
    if bare and "us_per_request" in prof and "us_per_request" in bare:
        g, b = prof["us_per_request"], bare["us_per_request"]
        lines.append("  CPU per request by area, sampled under the same load (us/request; "
                     "py-spy, so +-10 %):")
        lines.append(f"    {'area':70} {'bare':>7} {'gateway':>8}")
        bare_areas = dict(b["areas"])
        for name, us in g["areas"]:
            if not name.startswith("  "):
                lines.append(f"    {name[:70]:70} {bare_areas.get(name, 0.0):7.0f} {us:8.0f}")
        lines.append(f"    {'all busy samples':70} {b['busy']:7.0f} {g['busy']:8.0f}")
        lines.append("  functions costing the gateway more than bare (self us/request, top 15):")
        bare_self = dict(b["self_top"])
        extra = sorted(((us - bare_self.get(fn, 0.0), fn, us) for fn, us in g["self_top"]), reverse=True)
        for diff, fn, us in extra[:15]:
            lines.append(f"    {diff:+7.1f}  {fn}  ({bare_self.get(fn, 0.0):.1f} -> {us:.1f})")
    return "\n".join(lines)
