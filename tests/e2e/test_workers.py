"""`nhi-gateway run --workers 2`: two gateway processes share the listening port, each writes its
own recordings and audit chain naming it, the supervisor restarts a worker that dies and stops
them all (each draining) on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import requests

from ..support import approvals
from .conftest import start_gateway, stop

GRAPH = "https://graph.microsoft.com"
WAIT = 30.0


def get(gw, token: str, n: int) -> requests.Response:
    # A new connection each time: the kernel spreads connections (not requests) over the workers.
    with requests.Session() as s:
        return s.get(f"{GRAPH}/v1.0/users?n={n}", headers={"Authorization": f"Bearer {token}", "Connection": "close"},
                     proxies={"https": gw.proxy()}, verify=gw.ca_cert, timeout=WAIT)


def gone(pid: int) -> bool:
    """The process has died and closed its sockets: a zombie until its parent reaps it counts, once
    every thread has exited (the leader turns zombie first; the sockets close with the last thread)."""
    try:
        status = open(f"/proc/{pid}/status").read()
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status and len(threads) <= 1


def audit_lines(gw) -> dict[int, list[dict]]:
    return {w: [json.loads(x) for x in (gw.recordings / f"audit.w{w}.jsonl").read_text().splitlines()]
            for w in (1, 2) if (gw.recordings / f"audit.w{w}.jsonl").exists()}


def test_two_workers_share_the_port_and_keep_their_own_records(tmp_path, lookalike, tokens):
    gw = start_gateway(tmp_path / "gw", lookalike, extra_args=["--workers", "2"])
    try:
        workers = {int(w): pid for w, pid in gw.info["workers"].items()}
        assert sorted(workers) == [1, 2] and gw.info["pid"] == gw.proc.pid
        token = tokens()
        assert all(get(gw, token, n).status_code == 200 for n in range(24))
        deadline = time.monotonic() + WAIT
        while sum(len(v) for v in audit_lines(gw).values()) < 24:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lines = audit_lines(gw)
        # 24 connections hashed over two listeners: both serve (all on one has odds of 2 in 16 million).
        assert len(lines[1]) > 0 and len(lines[2]) > 0
        assert all(line["worker"] == w for w, ls in lines.items() for line in ls)
        files = sorted(p.name for p in gw.recording_files() if "mcp-directory" in p.name)
        assert any(".w1." in f for f in files) and any(".w2." in f for f in files)
        listing = subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", "recordings", "list", "--recordings",
                                  str(gw.recordings)], capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
        [row] = [line.split() for line in listing.stdout.splitlines()[1:] if line.split()[1] == "mcp-directory"]
        assert row[3] == "24" and ".w1.mitm" in " ".join(row) and ".w2.mitm" in " ".join(row)  # one app, both workers
        verify = subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", "audit", "verify", "--recordings",
                                 str(gw.recordings)], capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0 and verify.stdout.count("chain intact") == 2, verify.stdout + verify.stderr

        # A worker that dies is started again; the port keeps answering meanwhile.
        subprocess.run(["kill", "-9", str(workers[2])], check=True)
        deadline = time.monotonic() + WAIT
        while gone(workers[2]) is False:  # its listening socket closes as it dies
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert all(get(gw, token, 100 + n).status_code == 200 for n in range(6))
        deadline = time.monotonic() + WAIT
        while "worker 2 (pid" not in gw.log.read_text():
            assert time.monotonic() < deadline, gw.log.read_text()[-2000:]
            time.sleep(0.1)
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(WAIT) == 0
    finally:
        stop(gw.proc)


def test_workers_refuse_a_policy_that_holds_requests_on_the_embedded_state(tmp_path, lookalike):
    policy = tmp_path / "approve.yaml"
    policy.write_text(approvals.policy_text(lookalike))
    run = subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", "run", "--policy", str(policy), "--listen",
                          "127.0.0.1:0", "--confdir", str(tmp_path / "c"), "--recordings", str(tmp_path / "r"),
                          "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--workers" in run.stderr and "approval" in run.stderr, run.stderr
