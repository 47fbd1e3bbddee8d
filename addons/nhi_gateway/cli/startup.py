"""What ``nhi-gateway run`` checks before it starts anything: every file and address it was given,
each problem said with the option, the path and what to do, never a bare ``[Errno 2]`` or a
traceback. Checked once here, so that the proxy never starts half-configured."""

from __future__ import annotations

import errno
import os
import socket
import ssl
from pathlib import Path


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def writable_directory(option: str, path: Path) -> str | None:
    if path.exists() and not path.is_dir():
        return f"{option} {path}: is a file, not a directory; give a directory the gateway may write"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"{option} {path}: cannot create it ({_why(e)}); give a directory the gateway may write"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{option} {path}: the gateway's user may not write there; give a directory it may write"
    return None


def file_in_writable_directory(option: str, path: Path) -> str | None:
    if path.is_dir():
        return f"{option} {path}: is a directory; give a file name"
    parent = path.parent
    if not parent.is_dir():
        return (f"{option} {path}: its directory {parent} does not exist; create it or give a path "
                "in an existing directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        return f"{option} {path}: the gateway's user may not write it"
    return None


def readable_ca_bundle(option: str, path: Path) -> str | None:
    if not path.is_file():
        return f"{option} {path}: no such file; give a PEM file of CA certificates"
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError:  # (an OSError too: first)
        return f"{option} {path}: not a PEM file of CA certificates"
    except OSError as e:
        return f"{option} {path}: cannot read it ({_why(e)})"
    return None


def readable_file(option: str, path: Path) -> str | None:
    if not path.is_file():
        return f"{option} {path}: no such file"
    if not os.access(path, os.R_OK):
        return f"{option} {path}: the gateway's user may not read it"
    return None


def free_address(option: str, host: str, port: int) -> str | None:
    """Whether ``host:port`` can be listened on now (port 0 always can)."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As asyncio's servers do: a port in TIME_WAIT is not "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (f"{option} {host}:{port}: the address is already in use; choose another port with "
                        f"{option} (or stop what listens there)")
            if e.errno == errno.EADDRNOTAVAIL:
                return f"{option} {host}:{port}: this machine has no such address"
            if e.errno == errno.EACCES:
                return f"{option} {host}:{port}: ports below 1024 need privileges; choose a port of 1024 or more"
            return f"{option} {host}:{port}: cannot listen there ({_why(e)})"
    return None


def run_problems(args) -> list[str]:
    """Everything wrong with ``run``'s options, each naming its option."""
    # A worker of --workers N binds ports its siblings hold (SO_REUSEPORT): its parent checked them.
    worker = getattr(args, "worker", None) is not None
    checks = [
        writable_directory("--confdir", args.confdir),
        writable_directory("--recordings", args.recordings),
        None if worker else free_address("--listen", *args.listen),
    ]
    if args.audit is not None:
        checks.append(file_in_writable_directory("--audit", args.audit))
    if args.approvals_db is not None:
        checks.append(file_in_writable_directory("--approvals-db", args.approvals_db))
    state = getattr(args, "state", None)
    if state is not None and args.approvals_db is not None:
        checks.append("--state and --approvals-db both say where approvals live: give one of them")
    elif state is not None and state.kind == "sqlite":
        checks.append(file_in_writable_directory("--state", Path(state.location)))
    if args.ready_file is not None:
        checks.append(file_in_writable_directory("--ready-file", args.ready_file))
    if args.upstream_ca is not None:
        checks.append(readable_ca_bundle("--upstream-ca", args.upstream_ca))
    if worker:
        pass
    elif args.approvals_listen is not None:
        checks.append(free_address("--approvals-listen", *args.approvals_listen))
    elif args.listen[1]:
        host, port = args.listen
        problem = free_address("--approvals-listen", host, port + 1)
        if problem:
            checks.append(problem.replace(": the address", " (the default: the --listen port + 1): the address"))
    for option in ("admin_tls_cert", "admin_tls_key"):
        if getattr(args, option, None) is not None:
            checks.append(readable_file("--" + option.replace("_", "-"), getattr(args, option)))
    return [c for c in checks if c]
