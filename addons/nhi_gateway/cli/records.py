"""``nhi-gateway recordings`` and ``nhi-gateway audit``: reading what the gateway kept.

    nhi-gateway recordings list [--date D] [APP]          what is recorded, per app and day
    nhi-gateway recordings open APP|FILE|DIR [--date D]   serve it in mitmweb, print the URL
    nhi-gateway audit verify [FILE]                       check the hash chain, name broken lines
    nhi-gateway audit [--principal X] [--decision allow|deny] [--since T] [--until T] [--table] [FILE]

``APP`` is an app's display name or its service principal's object id; ``--date`` takes
``today`` (the default for ``open``), ``yesterday``, ``all`` or ``YYYY-MM-DD`` (UTC).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nhi_gateway.recording.audit import (
    TORN_TAIL,
    AuditQuery,
    chain_head,
    check_head,
    parse_head,
    parse_time,
    principal_names,
    read_records,
    verify_chain,
)
from nhi_gateway.recording.files import find, list_recordings, parse_day, scan

DEFAULT_RECORDINGS = Path("recordings")
WEB_COLUMNS = ("icon", "method", "path", "status", "timestamp", "comment")
# mitmweb's search box knows ~comment and ~marker but not ~meta (its own filter grammar);
# mitmdump and mitmproxy take ~meta "nhi.rule: RULE" as well.
SEARCH_HINT = ('search: ~marker no_entry (refused), ~marker white_check_mark (approved), '
               '~comment "rule RULE", ~comment "approver NAME", ~comment OBJECT-ID')

# audit verify's exit codes
CHAIN_INTACT, CHAIN_BROKEN, USAGE, TORN_TAIL_ONLY = 0, 1, 2, 3


def register(sub) -> None:
    _add_recordings(sub)
    _add_audit(sub)


def _fail(message: str, code: int = USAGE) -> int:
    print(f"nhi-gateway: {message}", file=sys.stderr)
    return code


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


# --- recordings ----------------------------------------------------------------------------------


def _add_recordings(sub) -> None:
    p = sub.add_parser("recordings", help="list recordings, or open one in mitmweb",
                       description="Recordings live in RECORDINGS/<YYYY-MM-DD>/<tenant>/<app>--<object-id>"
                                   "[.N].mitm (UTC days; .N after the size limit).")
    rsub = p.add_subparsers(dest="recordings_command", required=True)

    ls = rsub.add_parser("list", help="what is recorded, per app and day")
    ls.add_argument("app", nargs="?", help="only this app (display name or object id)")
    ls.add_argument("--recordings", type=Path, default=DEFAULT_RECORDINGS, help="default: ./recordings")
    ls.add_argument("--date", default="all", help="today, yesterday, YYYY-MM-DD or all (default)")
    ls.set_defaults(handler=cmd_recordings_list)

    op = rsub.add_parser("open", help="serve an app's recordings (or a file) in mitmweb and print the URL")
    op.add_argument("target", metavar="APP|FILE|DIR",
                    help="an app's display name or object id, a .mitm file, or a directory of them")
    op.add_argument("--recordings", type=Path, default=DEFAULT_RECORDINGS, help="default: ./recordings")
    op.add_argument("--date", default="today", help="today (default), yesterday, YYYY-MM-DD or all")
    op.add_argument("--host", default="127.0.0.1", help="where mitmweb listens (default 127.0.0.1)")
    op.add_argument("--port", type=int, default=0, help="mitmweb's port (default: a free one)")
    op.add_argument("--browser", action="store_true", help="also open it in the default browser")
    op.set_defaults(handler=cmd_recordings_open)


def cmd_recordings_list(args) -> int:
    try:
        day = parse_day(args.date)
    except ValueError as e:
        return _fail(str(e))
    found = list_recordings(args.recordings, day)
    if args.app:
        wanted = args.app.casefold()
        found = [r for r in found if wanted in (r.app.casefold(), r.object_id.casefold())]
    if not found:
        print(f"no recordings under {args.recordings}" + (f" for {args.app}" if args.app else "")
              + (f" on {day}" if day else ""), file=sys.stderr)
        return 1
    rows = [("DAY", "APP", "OBJECT ID", "FLOWS", "SIZE", "FILES")]
    for r in found:
        flows = sum(scan(f).records for f in r.files)
        rows.append((r.day, r.app, r.object_id or "-", str(flows), _human(r.size),
                     " ".join(str(f) for f in r.files)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _mitmweb_command() -> list[str]:
    beside = Path(sys.executable).parent / "mitmweb"
    if beside.exists():
        return [str(beside)]
    if found := shutil.which("mitmweb"):
        return [found]
    return [sys.executable, "-c", "from mitmproxy.tools.main import mitmweb; mitmweb()"]


def _one_file(files: list[Path], workdir: Path) -> tuple[Path, int]:
    """mitmweb reads one file: several parts (or a file whose last flow was cut short by a
    crash) are copied, whole flows only, into one private file."""
    scans = [scan(f) for f in files]
    if len(files) == 1 and scans[0].whole:
        return files[0], scans[0].records
    from mitmproxy import exceptions, io

    combined = workdir / "flows.mitm"
    count = 0
    fd = os.open(combined, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        writer = io.FlowWriter(out)
        for path, result in zip(files, scans):
            with open(path, "rb") as f:
                try:
                    for flow in io.FlowReader(f).stream():
                        writer.add(flow)
                        count += 1
                except exceptions.FlowReadException as e:
                    print(f"nhi-gateway: {path}: read {result.records} whole flows, the rest is "
                          f"unreadable ({e})", file=sys.stderr)
    return combined, count


def _wait_listening(host: str, port: int, proc: subprocess.Popen, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def cmd_recordings_open(args) -> int:
    try:
        day = parse_day(args.date)
    except ValueError as e:
        return _fail(str(e))
    files = find(args.recordings, args.target, day)
    if not files:
        when = f" on {day}" if day else ""
        return _fail(f"no recordings of {args.target!r}{when} under {args.recordings}; "
                     "`nhi-gateway recordings list` shows what there is", 1)
    import argon2  # comes with mitmproxy, for mitmweb's own password check

    workdir = Path(tempfile.mkdtemp(prefix="nhi-recordings-"))
    proc = None

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        rfile, flows = _one_file(files, workdir)
        token = secrets.token_urlsafe(24)
        port = args.port or _free_port(args.host)
        log = workdir / "mitmweb.log"
        command = [
            *_mitmweb_command(), "-n", "-r", str(rfile),
            "--set", f"confdir={workdir / 'confdir'}",  # not the user's ~/.mitmproxy
            "--set", f"web_host={args.host}", "--set", f"web_port={port}",
            "--set", f"web_open_browser={'true' if args.browser else 'false'}",
            # A hash, so the token is neither on the command line nor in mitmweb's warning.
            "--set", f"web_password={argon2.PasswordHasher().hash(token)}",
            *(a for column in WEB_COLUMNS for a in ("--set", f"web_columns={column}")),
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if not _wait_listening(args.host, port, proc, time.monotonic() + 60):
            return _fail(f"mitmweb did not start; it said:\n{log.read_text(errors='replace')[-3000:]}", 1)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"{flows} flows from {len(files)} file(s):")
        for f in files:
            print(f"  {f}")
        print(f"mitmweb: http://{host}:{port}/?token={token}")
        print(SEARCH_HINT)
        print("Ctrl-C stops mitmweb.", flush=True)
        proc.wait()
        return _fail(f"mitmweb exited with {proc.returncode}", 1) if proc.returncode else 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


# --- audit ---------------------------------------------------------------------------------------


def _add_audit(sub) -> None:
    p = sub.add_parser(
        "audit", help="verify the audit trail's hash chain, or filter and print its lines",
        usage="nhi-gateway audit verify [--expect-head SEQ:SHA256] [FILE]\n"
              "       nhi-gateway audit [--principal X] [--decision allow|deny] [--since T] [--until T] "
              "[--rule R] [--table] [FILE]",
        description="FILE defaults to RECORDINGS/audit.jsonl. Lines are printed as they are stored "
                    "(JSON, one per line, for jq), or as a table with --table. Times: 2026-11-01, "
                    "2026-11-01T09:30Z, or 15m / 2h / 7d ago; --since is inclusive, --until exclusive. "
                    f"audit verify exits {CHAIN_INTACT} when the chain is intact, {CHAIN_BROKEN} when a "
                    f"line was edited, deleted, inserted or reordered, {TORN_TAIL_ONLY} when only the "
                    "last line was cut short by a crash (the gateway's next start acknowledges it).",
    )
    p.add_argument("words", nargs="*", metavar="[verify] [FILE]", help=argparse.SUPPRESS)
    p.add_argument("--recordings", type=Path, default=DEFAULT_RECORDINGS,
                   help="where the default FILE lives (default ./recordings)")
    p.add_argument("--principal", help="display name, app id or object id (any case; * and ? match)")
    p.add_argument("--decision", choices=("allow", "deny", TORN_TAIL))
    p.add_argument("--rule", help="only lines decided by this rule")
    p.add_argument("--since", help="from this time on (inclusive)")
    p.add_argument("--until", help="before this time (exclusive)")
    p.add_argument("--table", action="store_true", help="a compact table instead of JSON lines")
    p.add_argument("--expect-head", metavar="SEQ:SHA256",
                   help="with verify: a head printed earlier (kept where the gateway cannot write); "
                        "fails when the trail no longer holds it (its tail was cut off or rewritten)")
    p.set_defaults(handler=cmd_audit)


def _audit_file(args, words: list[str]) -> Path | None:
    if len(words) > 1:
        return None
    return Path(words[0]) if words else args.recordings / "audit.jsonl"


def cmd_audit(args) -> int:
    words = list(args.words)
    verify = bool(words) and words[0] == "verify" and (len(words) == 2 or not Path("verify").is_file())
    if verify:
        words.pop(0)
        if any((args.principal, args.decision, args.rule, args.since, args.until, args.table)):
            return _fail("audit verify checks the whole file and takes no filters")
    elif args.expect_head:
        return _fail("--expect-head goes with audit verify")
    path = _audit_file(args, words)
    if path is None:
        return _fail("expected at most one FILE")
    if verify and path.is_dir():
        return audit_verify_all(path, args.expect_head)
    if verify and not words and not path.exists() and list(path.parent.glob("audit.w*.jsonl")):
        return audit_verify_all(path.parent, args.expect_head)  # a gateway run with --workers N
    if not path.is_file():
        return _fail(f"{path}: no such audit file (pass FILE, or --recordings DIR of a gateway)")
    return audit_verify(path, args.expect_head) if verify else audit_show(args, path)


def audit_verify_all(directory: Path, expect_head: str | None) -> int:
    """Every audit chain in a directory (one per worker of ``run --workers N``): the worst result."""
    trails = sorted(directory.glob("audit*.jsonl"))
    if not trails:
        return _fail(f"{directory}: no audit*.jsonl files in it")
    if expect_head and len(trails) > 1:
        return _fail("--expect-head names one chain's head: give that chain's FILE")
    codes = [audit_verify(path, expect_head) for path in trails]
    for worst in (CHAIN_BROKEN, USAGE, TORN_TAIL_ONLY):  # a broken chain outweighs a torn tail
        if worst in codes:
            return worst
    return CHAIN_INTACT


def audit_verify(path: Path, expect_head: str | None = None) -> int:
    try:
        anchor = parse_head(expect_head) if expect_head else None
    except ValueError as e:
        return _fail(f"--expect-head {e}")
    try:
        problems = verify_chain(path)
        moved = check_head(path, *anchor) if anchor else None
        head = chain_head(path)
    except OSError as e:
        return _fail(f"{path}: {e}")
    if moved:
        print(f"{path}: {moved}")
        print(f"{path}: the chain does not hold the anchored head {expect_head}", file=sys.stderr)
        return CHAIN_BROKEN
    if not problems:
        records, last = 0, None
        for _, _, rec in read_records(path):
            if rec is not None:
                records, last = records + 1, rec
        print(f"{path}: {records} lines, chain intact"
              + (f" (last seq {last['seq']} at {last.get('time')})" if last else "")
              + (f"; holds the anchored head {anchor[0]}" if anchor else ""))
        if head:
            print(f"head {head[0]}:{head[1]}   (keep it elsewhere; check later with --expect-head {head[0]}:{head[1]})")
        return CHAIN_INTACT
    for problem in problems:
        print(f"{path}:{problem}")
    if all(p.kind == "torn" for p in problems):
        print(f"{path}: only the last line is incomplete (a crash while it was written); the "
              "gateway's next start terminates and acknowledges it", file=sys.stderr)
        return TORN_TAIL_ONLY
    print(f"{path}: the chain is broken: {len(problems)} problem(s)", file=sys.stderr)
    return CHAIN_BROKEN


def _table_row(rec: dict) -> tuple[str, ...]:
    who = principal_names(rec)[0]
    rule = rec.get("rule") or (f"{rec.get('stage')}/{rec.get('check')}" if rec.get("check") else "-")
    time_text = str(rec.get("time") or "")[:19].replace("T", " ")
    return (time_text, str(rec.get("decision") or "-"), str(rec.get("status") or "-"), who,
            str(rec.get("method") or "-"), rule, str(rec.get("url") or "-"))


def audit_show(args, path: Path) -> int:
    try:
        query = AuditQuery(
            principal=args.principal, decision=args.decision, rule=args.rule,
            since=parse_time(args.since) if args.since else None,
            until=parse_time(args.until) if args.until else None,
        )
    except ValueError as e:
        return _fail(str(e))
    rows = []
    out = sys.stdout.buffer
    try:
        for number, raw, rec in read_records(path):
            if rec is None:
                if raw:
                    print(f"nhi-gateway: {path}:{number}: not an audit record (skipped; run "
                          "`nhi-gateway audit verify`)", file=sys.stderr)
                continue
            if not query.matches(rec):
                continue
            if args.table:
                rows.append(_table_row(rec))
            else:
                out.write(raw + b"\n")
        if args.table and rows:
            header = ("TIME (UTC)", "DECISION", "STATUS", "PRINCIPAL", "METHOD", "RULE", "URL")
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
            for row in [header, *rows]:
                out.write(("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] + "\n")
                          .encode("utf-8", "backslashreplace"))
        out.flush()
    except BrokenPipeError:  # `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0

