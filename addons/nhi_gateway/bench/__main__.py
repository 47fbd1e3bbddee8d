"""``python -m nhi_gateway.bench``: see :mod:`nhi_gateway.bench`.

    python -m nhi_gateway.bench [run] [--quick] [--json FILE] ...   the benchmark (scripts/bench)
    python -m nhi_gateway.bench policy --rules N                    print a realistic N-rule policy
    python -m nhi_gateway.bench upstream ...                        the replaying upstream (internal)
    python -m nhi_gateway.bench mitmdump|gateway --resolve H=A:P ... -- ARGS
                                                                     a proxy under test (internal)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path


def _positive(kind):
    def parse(value: str):
        v = kind(value)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{value}: must be more than 0")
        return v
    return parse


def run_main(argv: list[str]) -> int:
    from nhi_gateway.bench.report import render
    from nhi_gateway.bench.run import DEFAULT_POLICY, Settings, run_all

    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Measure the gateway against bare mitmdump with the same load, in the same run "
                    "(loopback only, bounded). Prints a table; --json writes every figure.")
    p.add_argument("--quick", action="store_true",
                   help="short runs (3s per scenario, 5,000-request memory run): about 1.5 minutes")
    p.add_argument("--json", type=Path, metavar="FILE", help="write all results here as JSON")
    p.add_argument("--duration", type=_positive(float), metavar="SECONDS",
                   help="seconds per scenario and target (quick 3, full 10)")
    p.add_argument("--rounds", type=_positive(int), help="rounds of all scenarios (quick 1, full 2)")
    p.add_argument("--requests", type=_positive(int), dest="memory_requests", metavar="N",
                   help="requests of the memory run (quick 5,000, full 100,000)")
    p.add_argument("--decisions", type=_positive(int), metavar="N",
                   help="Policy.decide calls per timing (quick 50,000, full 200,000)")
    p.add_argument("--upstream", choices=["standin", "lookalike"],
                   help="standin (default): a cheap replay of the look-alike's answer; lookalike: the "
                        "look-alike itself (slower than the proxies on small machines)")
    p.add_argument("--policy", type=Path, default=DEFAULT_POLICY, help=f"gateway policy (default {DEFAULT_POLICY})")
    p.add_argument("--profile", type=_positive(float), metavar="SECONDS",
                   help="after measuring, sample the gateway with py-spy under load for this long")
    p.add_argument("--hooks", type=_positive(float), metavar="SECONDS",
                   help="after measuring, count a gateway's CPU per addon hook (its event loop's thread CPU "
                        "clock) under keep-alive c=10 load for this long")
    p.add_argument("--records", type=Path, metavar="DIR",
                   help="where the gateway writes recordings and audit (default: the workdir); the audit "
                        "trail is fsynced per line, so this disk's flush latency shows in the figures")
    p.add_argument("--workdir", type=Path, help="keep state, logs and recordings here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="do not delete the workdir at the end")
    args = p.parse_args(argv)
    settings = Settings.for_mode(
        args.quick, duration=args.duration, rounds=args.rounds, memory_requests=args.memory_requests,
        decisions=args.decisions, upstream=args.upstream, policy=args.policy.resolve(), workdir=args.workdir,
        keep=args.keep or bool(args.workdir), profile=args.profile, hooks=args.hooks, records=args.records)
    if not settings.policy.exists():
        print(f"bench: no policy at {settings.policy}", file=sys.stderr)
        return 2

    def say(text: str) -> None:
        print(text, flush=True)

    try:
        results = asyncio.run(run_all(settings, say))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    print(render(results))
    if args.json:
        from nhi_gateway.bench.report import comparisons, grant_lookup, json_safe, recording_reference, targets, warnings

        results["comparisons"] = comparisons(results)
        results["recording_reference"] = recording_reference(results)
        if results.get("grant_lookup"):
            results["grant_lookup"] = grant_lookup(results)  # with the added p50 and p99
        results["targets"] = [t.to_dict() for t in targets(results)]
        results["warnings"] = warnings(results)
        args.json.write_text(json.dumps(json_safe(results), indent=2, allow_nan=False))
        print(f"results written to {args.json}")
    return 0


def policy_main(argv: list[str]) -> int:
    from nhi_gateway.bench.policies import policy_yaml

    p = argparse.ArgumentParser(prog="python -m nhi_gateway.bench policy",
                                description="Print a realistic policy of N rules for the look-alike tenant.")
    p.add_argument("--rules", type=_positive(int), default=50)
    args = p.parse_args(argv)
    sys.stdout.write(policy_yaml(args.rules))
    return 0


def upstream_main(argv: list[str]) -> int:
    from nhi_gateway.bench.upstream import CannedResponse, serve

    p = argparse.ArgumentParser(prog="python -m nhi_gateway.bench upstream")
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--path", required=True, help="the one request target answered")
    p.add_argument("--token-file", type=Path, required=True)
    p.add_argument("--canned", type=Path, required=True, help="the response to replay (JSON)")
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    asyncio.run(serve(cert=args.cert, key=args.key, path=args.path, token=args.token_file.read_text().strip(),
                      canned=CannedResponse.from_file(args.canned), ready_file=args.ready_file, port=args.port))
    return 0


from nhi_gateway.proxy.workers import WORKER_COMMAND_ENV  # noqa: E402


def proxy_main(kind: str, argv: list[str]) -> int:
    from nhi_gateway.bench.launch import run_proxy

    p = argparse.ArgumentParser(prog=f"python -m nhi_gateway.bench {kind}",
                                description=f"run {kind} with ARGS, resolving HOST to ADDR:PORT like DNS would")
    p.add_argument("--resolve", action="append", default=[], metavar="HOST=ADDR:PORT")
    p.add_argument("args", nargs=argparse.REMAINDER, help="after --: the proxy's own arguments")
    args = p.parse_args(argv)
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    if kind == "gateway":
        # With --workers, each worker is started through here too, so it resolves as this one does.
        os.environ[WORKER_COMMAND_ENV] = json.dumps(
            [sys.executable, "-m", "nhi_gateway.bench", "gateway", *(f"--resolve={r}" for r in args.resolve), "--"])
    return run_proxy(kind, args.resolve, rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run_main, "policy": policy_main, "upstream": upstream_main,
                "mitmdump": lambda a: proxy_main("mitmdump", a), "gateway": lambda a: proxy_main("gateway", a)}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
