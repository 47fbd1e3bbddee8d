"""The ``nhi-gateway`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from nhi_gateway.cli import policy as policy_cli
from nhi_gateway.cli import permissions as permissions_cli
from nhi_gateway.cli import approvals as approvals_cli
from nhi_gateway.cli import records as records_cli
from nhi_gateway.addons.upstream_timeout import DEFAULT_UPSTREAM_TIMEOUT
from nhi_gateway.addons.stopping import DEFAULT_DRAIN_TIMEOUT
from nhi_gateway.addons.admin_tls import AdminTLSError
from nhi_gateway.cli.startup import run_problems
from nhi_gateway.proxy import logs
from nhi_gateway.proxy.egress import parse_resolve
from nhi_gateway.identity.groups import DEFAULT_TTL, CredentialError, credential_from_settings
from nhi_gateway.identity.signing_keys import DEFAULT_UNKNOWN_KID_INTERVAL
from nhi_gateway.policy.loader import PolicyError
from nhi_gateway.recording.audit import AuditCopy
from nhi_gateway.recording.files import DEFAULT_FSYNC_INTERVAL, DEFAULT_MAX_BYTES, parse_size
from nhi_gateway.approvals.state import StateBackend, parse_state


def _state(value: str) -> StateBackend:
    try:
        return parse_state(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT")
    return (host.strip("[]") or "127.0.0.1", int(port))


def _size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run the gateway as a forward proxy (clients set HTTPS_PROXY)")
    p.add_argument("--policy", required=True, type=Path, help="the YAML policy file")
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 8080), metavar="HOST:PORT",
                   help="where clients connect (default 127.0.0.1:8080; port 0 picks a free one)")
    p.add_argument("--confdir", type=Path, default=Path.home() / ".nhi-gateway",
                   help="where the gateway's CA lives (created on first start)")
    p.add_argument("--recordings", type=Path, default=Path("recordings"),
                   help="directory for flow recordings and the audit trail")
    p.add_argument("--audit", type=Path, default=None, help="audit file (default RECORDINGS/audit.jsonl)")
    p.add_argument("--audit-copy", action="append", default=[], metavar="stdout|syslog[:ADDRESS]",
                   help="also send each audit line, as written, to standard output or syslog (a path, or "
                        "HOST:PORT over UDP) for a SIEM; repeatable. The audit file stays the record")
    p.add_argument("--recordings-max-bytes", type=_size, default=DEFAULT_MAX_BYTES, metavar="SIZE",
                   help="start APP--OID.N.mitm when a recording would grow past this (default 64m)")
    p.add_argument("--recordings-rotate", choices=("daily", "hourly"), default="daily",
                   help="one file per app and UTC day (default), or per app and hour")
    p.add_argument("--recordings-fsync", type=float, default=DEFAULT_FSYNC_INTERVAL, metavar="SECONDS",
                   help="fsync each recording at most this often (default 1; 0: after every flow). "
                        "Every flow reaches the OS before its response, so a killed gateway loses none")
    p.add_argument("--log-format", choices=logs.FORMATS, default="text",
                   help="text (default) or json: one object per line, for log shippers")
    p.add_argument("--log-level", choices=logs.LEVELS, default="info",
                   help="info (default) logs refusals and changes; debug adds one line per allowed request")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="N gateway processes sharing the listening ports (SO_REUSEPORT), each with its own "
                        "recording process, recordings (.wN) and audit chain (audit.wN.jsonl); default 1")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set by --workers for each child
    p.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT, metavar="SECONDS",
                   help="on SIGTERM, how long requests in flight may take to finish before the gateway "
                        f"stops anyway (default {DEFAULT_DRAIN_TIMEOUT:g}); SIGHUP reloads the policy")
    p.add_argument("--upstream-timeout", type=float, default=DEFAULT_UPSTREAM_TIMEOUT, metavar="SECONDS",
                   help=f"how long an upstream has to answer a request before the client gets 502 "
                        f"(default {DEFAULT_UPSTREAM_TIMEOUT:g})")
    p.add_argument("--unknown-kid-refresh", type=float, default=DEFAULT_UNKNOWN_KID_INTERVAL, metavar="SECONDS",
                   help="when a token names a signing key (kid) the cached set lacks, refetch the issuer's "
                        "keys at most this often (default %(default)g: Microsoft's 5 minutes, so a flood of "
                        "made-up kids cannot turn the gateway against Entra). Lower it to pick up an "
                        "emergency rollover sooner; 0 refetches for every unknown kid")
    p.add_argument("--resolve", action="append", default=[], metavar="HOST=ADDR:PORT",
                   help="send HOST to ADDR:PORT, keeping URL, Host and SNI (like curl --resolve)")
    p.add_argument("--upstream-ca", type=Path, default=None,
                   help="CA bundle for upstream TLS and key fetches (default: the system's)")
    p.add_argument("--admin-tls-cert", type=Path, default=None, metavar="PEM",
                   help="certificate (chain) the admin listener (approval API, /healthz, /readyz, /metrics) "
                        "serves over TLS; plain HTTP is then refused there")
    p.add_argument("--admin-tls-key", type=Path, default=None, metavar="PEM", help="its private key")
    p.add_argument("--admin-insecure", action="store_true",
                   help="allow a non-loopback --approvals-listen without TLS (behind a TLS-terminating proxy)")
    p.add_argument("--approvals-listen", type=_listen, default=None, metavar="HOST:PORT",
                   help="where the approval API listens (default: 127.0.0.1 at the proxy's port + 1; "
                        "a free port when --listen has port 0). Keep it on loopback: it speaks plain HTTP")
    p.add_argument("--approvals-db", type=Path, default=None, metavar="PATH",
                   help="approval requests and grants, kept across restarts (default RECORDINGS/approvals.sqlite3)")
    p.add_argument("--state", type=_state, default=None, metavar="URL",
                   help="where approvals, grants and their history live: sqlite:///PATH (embedded, the default: "
                        "--approvals-db) or postgresql://USER@HOST:PORT/DATABASE, shared by every replica that "
                        "names it (keep the password out of the URL: use PGPASSWORD or ~/.pgpass)")
    p.add_argument("--ready-file", type=Path, default=None,
                   help="write listen address and CA path here as JSON once listening")
    g = p.add_argument_group(
        "group membership",
        "the gateway's own app registration, used to resolve callers' groups through Graph "
        "(service principals carry none in their tokens). Each option falls back to its environment "
        "variable; the client secret is read only from NHI_GRAPH_CLIENT_SECRET, never from the "
        "command line. Prefer a certificate.",
    )
    g.add_argument("--graph-client-id", metavar="GUID", help="the gateway's client id (NHI_GRAPH_CLIENT_ID)")
    g.add_argument("--graph-tenant-id", metavar="GUID", help="its tenant (NHI_GRAPH_TENANT_ID)")
    g.add_argument("--graph-certificate", type=Path, metavar="PEM",
                   help="certificate for client assertions, may hold the key too (NHI_GRAPH_CERTIFICATE)")
    g.add_argument("--graph-certificate-key", type=Path, metavar="PEM",
                   help="its private key, if in another file (NHI_GRAPH_CERTIFICATE_KEY)")
    g.add_argument("--groups-ttl", type=int, default=DEFAULT_TTL, metavar="SECONDS",
                   help=f"how long a resolved membership is reused (default {DEFAULT_TTL})")
    p.add_argument("-v", "--verbose", action="store_true")


def cmd_run(args) -> int:
    from nhi_gateway.proxy.gateway import GatewayConfig, serve

    # Everything the gateway creates (its CA key, recordings, audit trail, approvals database and
    # their directories) holds secrets or who-did-what: private to the gateway's user.
    os.umask(0o077)
    if args.workers < 1:
        print("nhi-gateway: --workers must be 1 or more", file=sys.stderr)
        return 2
    problems = run_problems(args)
    if problems:
        print("nhi-gateway: cannot start:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 2
    # One handler for every line, the gateway's and mitmproxy's: ISO 8601 times, levels, scrubbed.
    logs.configure(args.log_format, "debug" if args.verbose else args.log_level)

    try:
        resolve = parse_resolve(args.resolve)
    except ValueError as e:
        print(f"nhi-gateway: {e}", file=sys.stderr)
        return 2
    try:
        graph_credential = credential_from_settings(
            client_id=args.graph_client_id, tenant_id=args.graph_tenant_id,
            certificate=args.graph_certificate, certificate_key=args.graph_certificate_key,
            environ=os.environ,
        )
    except CredentialError as e:
        print(f"nhi-gateway: {e}", file=sys.stderr)
        return 2
    if args.recordings_fsync < 0:
        print("nhi-gateway: --recordings-fsync must be 0 or more seconds", file=sys.stderr)
        return 2
    if not args.drain_timeout >= 0:
        print("nhi-gateway: --drain-timeout must be 0 seconds or more", file=sys.stderr)
        return 2
    if not args.upstream_timeout > 0:
        print("nhi-gateway: --upstream-timeout must be more than 0 seconds", file=sys.stderr)
        return 2
    if not args.unknown_kid_refresh >= 0:
        print("nhi-gateway: --unknown-kid-refresh must be 0 or more seconds", file=sys.stderr)
        return 2
    if args.groups_ttl < 0:
        print("nhi-gateway: --groups-ttl must be 0 or more seconds", file=sys.stderr)
        return 2
    if args.workers > 1:
        return run_workers(args)
    if args.worker is not None:
        from nhi_gateway.proxy.workers import share_listening_ports

        share_listening_ports()
    config = GatewayConfig(
        policy_path=args.policy,
        listen_host=args.listen[0],
        listen_port=args.listen[1],
        confdir=args.confdir,
        recordings=args.recordings,
        audit_path=args.audit,
        resolve=resolve,
        upstream_ca=args.upstream_ca,
        ready_file=args.ready_file,
        approvals_listen=args.approvals_listen,
        approvals_db=args.approvals_db,
        state=args.state,
        graph_credential=graph_credential,
        groups_ttl=args.groups_ttl,
        recordings_max_bytes=args.recordings_max_bytes,
        recordings_hourly=args.recordings_rotate == "hourly",
        recordings_fsync=args.recordings_fsync,
        upstream_timeout=args.upstream_timeout,
        unknown_kid_refresh=args.unknown_kid_refresh,
        drain_timeout=args.drain_timeout,
        own_log_handler=True,
        admin_tls_cert=args.admin_tls_cert,
        admin_tls_key=args.admin_tls_key,
        admin_insecure=args.admin_insecure,
        audit_copies=tuple(args.audit_copy),
        worker=args.worker,
    )
    for target in args.audit_copy:
        try:
            AuditCopy(target)
        except (ValueError, OSError) as e:
            print(f"nhi-gateway: {e}", file=sys.stderr)
            return 2
    if (args.admin_tls_cert is None) != (args.admin_tls_key is None):
        print("nhi-gateway: --admin-tls-cert and --admin-tls-key go together", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except AdminTLSError as e:
        print(f"nhi-gateway: {e}", file=sys.stderr)
        return 2
    except PolicyError as e:
        print(f"nhi-gateway: the policy cannot be loaded, so the gateway does not start:\n  {e}",
              file=sys.stderr)
        return 2
    except OSError as e:
        print(f"nhi-gateway: {e}", file=sys.stderr)
        return 1
    return 0


def run_workers(args) -> int:
    """``--workers N``: this process supervises N gateway processes (see proxy/workers.py)."""
    from nhi_gateway.policy.decision import Action
    from nhi_gateway.policy.loader import load_policy
    from nhi_gateway.proxy.workers import Supervisor

    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        print(f"nhi-gateway: the policy cannot be loaded, so the gateway does not start:\n  {e}", file=sys.stderr)
        return 2
    shared = args.state is not None and args.state.shared  # PostgreSQL wakes a held request on any worker
    if any(rule.action is Action.APPROVE for rule in policy.rules) and not shared:
        print("nhi-gateway: --workers: the policy holds requests for approval, and the embedded SQLite state "
              "cannot wake a request held by one worker when the decision comes through another; run one "
              "worker (--workers 1), or keep approvals in PostgreSQL (--state postgresql://...)", file=sys.stderr)
        return 2
    argv = list(args.argv)
    for i, word in enumerate(argv):
        if word == "--workers":
            del argv[i:i + 2]
            break
        if word.startswith("--workers="):
            del argv[i]
            break
    return Supervisor(argv, args.workers, args.listen, args.approvals_listen, args.ready_file).run()


def _add_lookalike(sub) -> None:
    p = sub.add_parser(
        "lookalike", help="serve the loopback look-alikes of Entra ID and Microsoft Graph, or mint a token",
        usage="nhi-gateway lookalike [serve] --state-dir DIR [--host H] [--port N]\n"
              "       nhi-gateway lookalike token --state-dir DIR (--user NAME [--no-mfa] | --app NAME)",
        description="serve: one HTTPS port answering as login.microsoftonline.com (discovery, JWKS, token "
                    "endpoint, device code sign-in) and graph.microsoft.com (a seeded tenant); point the gateway "
                    "at it with --resolve HOST=127.0.0.1:PORT for login.microsoftonline.com, sts.windows.net and "
                    "graph.microsoft.com, and --upstream-ca DIR/pki/ca.pem. It writes DIR/lookalike.json "
                    "(port, tenant, apps, the approval API's registration) once it listens. token: print a token "
                    "minted with the same keys, for trying the gateway by hand.")
    p.add_argument("action", nargs="?", choices=("serve", "token"), default="serve",
                   help="serve (the default) or token")
    p.add_argument("--state-dir", type=Path, required=True,
                   help="keys, certificates, client secrets and lookalike.json (created on first start)")
    p.add_argument("--host", default="127.0.0.1", help="serve: the address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="serve: the port (default 0: a free one)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--user", metavar="NAME",
                     help="token: a person's approver token for the approval API (e.g. adele, AdeleV, a UPN)")
    who.add_argument("--app", metavar="NAME", help="token: a workload's Graph token (e.g. mcp-directory, rotation-bot)")
    p.add_argument("--no-mfa", action="store_true",
                   help="token --user: as after a sign-in without MFA (no authentication context)")


def cmd_lookalike(args) -> int:
    if args.action == "token":
        from nhi_gateway.lookalike.handtokens import UnknownName, app_token, approver_token

        if not (args.user or args.app):
            print("nhi-gateway: lookalike token needs --user NAME or --app NAME", file=sys.stderr)
            return 2
        try:
            print(approver_token(args.state_dir, args.user, mfa=not args.no_mfa) if args.user
                  else app_token(args.state_dir, args.app))
        except (UnknownName, OSError) as e:
            print(f"nhi-gateway: {e}", file=sys.stderr)
            return 2
        return 0
    from nhi_gateway.lookalike.server import run

    run(args.state_dir, args.host, args.port)
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on embedded defaults")
    p.add_argument("--workdir", type=Path, default=Path("demo-output"),
                   help="where the demo keeps its state, recordings and logs")


def cmd_demo(args) -> int:
    from nhi_gateway.demo import run_demo

    return run_demo(args.workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nhi-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_demo(sub)
    _add_lookalike(sub)
    records_cli.register(sub)  # recordings list|open, audit [verify]: each sets its own handler
    approvals_cli.register(sub)  # approvals list|approve|deny|revoke, through the approval API
    policy_cli.register(sub)  # policy lint|explain|replay|suggest|schema: each sets its own handler
    permissions_cli.register(sub)  # permissions: held, needed and excess Graph permissions
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if extra and getattr(args, "words", None) is not None and not any(e.startswith("-") for e in extra):
        # `audit verify --expect-head X FILE`: argparse gives a list positional only the words
        # before the first option; the FILE after it belongs to it too.
        args.words += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command != "run":  # mitmproxy installs its own log handler for the proxy
        logging.basicConfig(
            level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    handler = getattr(args, "handler", None) or {"run": cmd_run, "demo": cmd_demo, "lookalike": cmd_lookalike}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
