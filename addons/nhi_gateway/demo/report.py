"""What the demo prints: the table of steps, where the recordings are and how to open them."""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mitmproxy import io
from mitmproxy.exceptions import FlowReadException

from nhi_gateway.demo.workload import Outcome


def table(outcomes: list[Outcome]) -> list[str]:
    rows = [("#", "step", "HTTP", "gateway", "upstream", "detail")]
    for n, o in enumerate(outcomes, 1):
        mark = "" if o.ok else "  <-- unexpected"
        rows.append((str(n), o.step.label, str(o.status if o.status is not None else "-"),
                     f"{o.action} ({o.basis})" if o.basis else o.action,
                     "reached" if o.forwarded else "not reached", o.detail + mark))
    fixed = len(rows[0]) - 1
    widths = [max(len(r[i]) for r in rows) for i in range(fixed)]
    longest = max(len(r[-1]) for r in rows)
    # Fit a terminal; a pipe or a CI log gets every character.
    room = longest
    if sys.stdout.isatty():
        room = max(40, shutil.get_terminal_size().columns - sum(widths) - 2 * (fixed + 1))
    lines = []
    for r in rows:
        detail = r[-1] if len(r[-1]) <= room else r[-1][: room - 1] + "…"
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:fixed], widths)) + "  " + detail)
    lines.insert(1, "  " + "-" * (sum(widths) + 2 * fixed + min(room, longest)))
    return lines


@dataclass(frozen=True)
class Recording:
    path: Path
    flows: int
    this_run: int


def recordings(root: Path, since: float) -> list[Recording]:
    """The .mitm files this run wrote to, with their flow counts: a file holds one app's flows of
    one day, so a second run on the same day appends to the first run's file."""
    found = []
    for path in sorted(root.rglob("*.mitm")):
        if path.stat().st_mtime < since:
            continue
        count = this_run = 0
        with path.open("rb") as f:
            try:
                for flow in io.FlowReader(f).stream():
                    count += 1
                    this_run += flow.timestamp_created >= since
            except FlowReadException:
                pass  # a torn last record: the flows before it still open
        found.append(Recording(path, count, this_run))
    return found


# A whole JWT (header.payload.signature): what a bearer token or a client assertion looks like.
_JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")


def credentials_on_disk(paths: list[Path], client_secret: str) -> list[str]:
    """What the demo promises is never written: the client secret and any whole token."""
    found = []
    for path in paths:
        data = path.read_bytes() if path.exists() else b""
        if client_secret.encode() in data:
            found.append(f"the client secret is readable in {path}")
        if _JWT.search(data):
            found.append(f"a whole token (JWT) is readable in {path}")
    return found


def where_to_look(found: list[Recording], root: Path, audit: Path, audit_lines_this_run: int,
                  prefer: str = "") -> list[str]:
    bin_dir = Path(sys.executable).parent
    lines = [f"Recordings (mitmproxy format, every flow, credentials redacted) under {root}:"]
    for r in found:
        earlier = f", {r.this_run} from this run" if r.this_run != r.flows else ""
        lines.append(f"  {r.path.relative_to(root)}  ({r.flows} flow{'s' if r.flows != 1 else ''}{earlier})")
    if not found:
        lines.append("  (none written in this run)")
    else:
        # The app's own file is the interesting one; anonymous.mitm holds the token requests.
        # ``prefer``: the workload's own file, not the approver's calls to the approval API.
        chosen = max(found, key=lambda r: (r.path.name != "anonymous.mitm",
                                           bool(prefer) and r.path.name.startswith(f"{prefer}--"), r.this_run))
        example = shlex.quote(str(chosen.path))
        lines += [
            # -n: no proxy listener of its own, which would clash with a gateway on 8080.
            "Open one in the browser, or print it:",
            f"  {shlex.quote(str(bin_dir / 'mitmweb'))} -n -r {example}",
            f"  {shlex.quote(str(bin_dir / 'mitmdump'))} -nr {example}",
        ]
    total = sum(1 for _ in audit.open("rb")) if audit.exists() else 0
    lines.append(f"Audit trail (hash-chained JSON lines): {audit}  "
                 f"({total} lines, {audit_lines_this_run} from this run)")
    return lines
