"""``nhi-gateway permissions``: per identity, the Graph permissions its tokens carry, the
operations it performed, the least privileged permissions that cover them, and the excess.

Reads recordings (files or directories) or the audit trail, as ``policy suggest`` does, and
Microsoft's Graph permissions reference shipped with the package
(:mod:`nhi_gateway.policy.permissions`). Exit status: 0, or 2 for usage and input errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

from nhi_gateway.cli.policy import EXIT_USAGE, UsageError, read_observations, time_window


def register(sub) -> None:
    p = sub.add_parser(
        "permissions", help="Graph permissions each identity holds, needs for what it did, and holds in excess",
        description="Per identity: the application permissions its tokens carry (roles), the operations it "
                    "performed, the least privileged Graph permissions that cover them (Microsoft's reference) "
                    "and the excess.",
    )
    p.add_argument("recordings", nargs="*", type=Path, metavar="RECORDING",
                   help=".mitm files or directories of them (or give --audit)")
    p.add_argument("--audit", type=Path, metavar="FILE", help="read the audit trail instead of recordings")
    p.add_argument("--principal", metavar="NAME", help="only this identity: display name, app id or object id")
    p.add_argument("--since", metavar="TIME", help="from this time (inclusive)")
    p.add_argument("--until", metavar="TIME", help="to this time (exclusive)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    p.set_defaults(handler=cmd_permissions)


def cmd_permissions(args, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from nhi_gateway.policy.observed import ObservationFilter
    from nhi_gateway.policy.permissions import advise

    out, err = out or sys.stdout, err or sys.stderr
    try:
        since, until = time_window(args)
        observations, sources = read_observations(args.recordings, args.audit)
    except UsageError as e:
        print(f"nhi-gateway permissions: {e}", file=err)
        return EXIT_USAGE
    # What it performed: requests the gateway let through (refused ones needed nothing).
    advice = advise(ObservationFilter(args.principal, since, until).apply(observations))
    if args.json:
        json.dump({"source": sources, "identities": [a.to_dict() for a in advice]}, out, indent=2)
        out.write("\n")
        return 0
    if not advice:
        print(f"no Graph requests by an identity in {sources}", file=out)
        return 0
    for a in advice:
        print(f"{a.name}  app {a.key}  ({'application' if a.scheme == 'Application' else 'delegated'} "
              f"permissions)", file=out)
        print(f"  {a.summary()}", file=out)
        if a.excess:
            print(f"  excess (held, never needed): {', '.join(p.describe() for p in a.excess)}", file=out)
        rows = [("operation", "requests", "least privileged", "covered by held")]
        for o in a.operations:
            least = " or ".join(p.describe() for p in o.least) if o.known else "not in Microsoft's reference"
            rows.append((o.operation, str(o.count), least, ", ".join(o.covered_by) or ("-" if o.known else "?")))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3], file=out)
        for o in a.uncovered:
            print(f"  note: {o.operation} is not allowed by any permission it holds (Graph would refuse it)",
                  file=out)
        print("  (by path and method: $select of properties beyond the basic ones can need more)", file=out)
        print(file=out)
    return 0
