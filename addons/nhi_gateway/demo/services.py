"""The demo's two background services, each a child process: the look-alike of Entra ID and
Microsoft Graph, and the gateway. Both announce readiness by writing a JSON file atomically."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 20.0  # seconds; both start in one or two on a laptop
STOP_TIMEOUT = 5.0
# The names the workload calls, all served by the one look-alike on loopback.
ENTRA_GRAPH_HOSTS = ("graph.microsoft.com", "login.microsoftonline.com", "sts.windows.net")


class ServiceFailed(RuntimeError):
    """A service did not start; the message ends with the tail of its log."""


def log_tail(log: Path, lines: int = 25) -> str:
    """The end of a log, indented, to print under the message that names it."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (log is empty)"


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 25) -> str:
        return log_tail(self.log, lines)

    def exited(self) -> str | None:
        """Why the service is gone (with its log), or None while it runs."""
        if self.process.poll() is None:
            return None
        return (f"the {self.name} exited with status {self.process.returncode}; "
                f"its log ({self.log}) ends with:\n{self.log_tail()}")

    def wait_ready(self, ready_file: Path, timeout: float = START_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceFailed(
                    f"the {self.name} exited with status {self.process.returncode} before it was ready; "
                    f"its log ({self.log}) ends with:\n{self.log_tail()}")
            if ready_file.exists():
                try:
                    return json.loads(ready_file.read_text())
                except ValueError:
                    pass  # written atomically, so this is a stray file from someone else: keep waiting
            time.sleep(0.05)
        raise ServiceFailed(
            f"the {self.name} was not ready after {timeout:.0f} s (no {ready_file}); "
            f"its log ({self.log}) ends with:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _spawn(name: str, args: list[str], log: Path) -> Service:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        # A session of its own: Ctrl-C reaches the demo, which then stops the services in order.
        process = subprocess.Popen(
            [sys.executable, "-m", "nhi_gateway.cli.main", *args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return Service(name, process, log)


def start_lookalike(state_dir: Path, log: Path) -> Service:
    state_dir.mkdir(parents=True, exist_ok=True)
    # The state directory is kept between runs (keys, secrets); its ready file is not.
    (state_dir / "lookalike.json").unlink(missing_ok=True)
    return _spawn("look-alike of Entra ID and Graph",
                  ["lookalike", "--state-dir", str(state_dir), "--port", "0"], log)


def start_gateway(*, policy: Path, workdir: Path, lookalike_port: int, upstream_ca: str, log: Path) -> Service:
    ready = workdir / "gateway.json"
    ready.unlink(missing_ok=True)
    args = [
        "run", "--policy", str(policy), "--listen", "127.0.0.1:0",
        "--confdir", str(workdir / "confdir"), "--recordings", str(workdir / "recordings"),
        "--upstream-ca", upstream_ca, "--ready-file", str(ready),
    ]
    for host in ENTRA_GRAPH_HOSTS:
        args += ["--resolve", f"{host}=127.0.0.1:{lookalike_port}"]
    return _spawn("gateway", args, log)
