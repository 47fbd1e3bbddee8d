"""End-to-end harness: the real look-alike servers and the real gateway process, on loopback.

Clients are configured the way users configure them: HTTPS_PROXY and a CA bundle (see
``tests/support/e2e.py`` for what a test does as a client and reads back). A gateway whose
policy refuses by a rule the tests own (``REFUSING_RULE``): ``start_with_a_deny_rule``.

For the approval tests (``tests/support/approvals.py``): ``authority`` (the look-alike's own
keys), ``workload`` (a rotation-bot token for this test's own service principal, or the one
named), ``adele`` (her approver token) and ``api`` (the approval API of the module's ``gateway``
as Adele calls it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ..support.approvals import ADELE, API, person, workload_token
from ..support.policies import EXAMPLE_POLICY

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def module_policy(tmp_path_factory, name: str, text: str) -> Path:
    """``text`` written to ``NAME.yaml`` in a directory of its own: a module's policy, for the
    gateways it starts."""
    path = tmp_path_factory.mktemp(f"{name}-policy") / f"{name}.yaml"
    path.write_text(text)
    return path


def example_head() -> str:
    """The example policy up to its masking section: its identity and upstreams, for a module's
    own masking profiles and rules."""
    example = EXAMPLE_POLICY.read_text()
    return example[:example.index("\nmasking:")]


def wait_for_file(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {path}:\n{log.read_text()[-3000:]}")


def read_jsonl(path: Path) -> list[dict]:
    """The lines of a JSON-lines file a process writes (none before it has written one)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ReadyFile:
    """What a started process wrote to its ready file (``info``): its port and its CA."""

    info: dict

    @property
    def port(self) -> int:
        return self.info["port"]

    @property
    def ca_cert(self) -> str:
        return self.info["ca_cert"]


@dataclass
class Lookalike(ReadyFile):
    state_dir: Path
    info: dict
    proc: subprocess.Popen

    @property
    def tenant_id(self) -> str:
        return self.info["tenant_id"]

    def app(self, name: str) -> dict:
        apps = self.info["apps"]
        items = apps.values() if isinstance(apps, dict) else apps
        for app in items:
            if app.get("display_name") == name or app.get("name") == name:
                return app
        raise KeyError(name)

    def received(self) -> list[dict]:
        return read_jsonl(self.state_dir / "received.jsonl")

    def resolve_args(self) -> list[str]:
        out = []
        for host in ("graph.microsoft.com", "login.microsoftonline.com", "sts.windows.net"):
            out += ["--resolve", f"{host}=127.0.0.1:{self.port}"]
        return out

    def authority(self):
        from nhi_gateway.lookalike.minting import EntraAuthority

        return EntraAuthority.open(self.state_dir / "keys")


@pytest.fixture(scope="session")
def lookalike(tmp_path_factory) -> Lookalike:
    state = tmp_path_factory.mktemp("lookalike")
    log = state / "lookalike.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nhi_gateway.cli.main", "lookalike", "--state-dir", str(state), "--port", "0"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        info = wait_for_file(state / "lookalike.json", proc, log)
        yield Lookalike(state, info, proc)
    finally:
        stop(proc)


@dataclass
class RunningGateway(ReadyFile):
    workdir: Path
    info: dict
    proc: subprocess.Popen
    log: Path
    recordings: Path
    extra: dict = field(default_factory=dict)

    def proxy(self, token: str | None = None, name: str = "agent") -> str:
        if token:
            return f"http://{name}:{token}@127.0.0.1:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    def audit(self) -> list[dict]:
        return read_jsonl(self.recordings / "audit.jsonl")

    def recording_files(self) -> list[Path]:
        return sorted(self.recordings.rglob("*.mitm"))

    def client_env(self, token: str | None = None) -> dict:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.update(HTTPS_PROXY=self.proxy(token), https_proxy=self.proxy(token),
                   SSL_CERT_FILE=self.ca_cert, REQUESTS_CA_BUNDLE=self.ca_cert,
                   NO_PROXY="", no_proxy="")
        return env


def start_gateway(workdir: Path, lookalike: Lookalike, policy: Path = EXAMPLE_POLICY,
                  extra_args: list[str] = (), env: dict[str, str] | None = None,
                  command: list[str] | None = None) -> RunningGateway:
    """``env`` is added to this process's environment (e.g. the gateway's NHI_GRAPH_* credential).
    ``command`` replaces ``python -m nhi_gateway.cli.main`` (e.g. a test's wrapper that injects a fault)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "gateway.json"
    ready.unlink(missing_ok=True)
    log = workdir / "gateway.log"
    recordings = workdir / "recordings"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "nhi_gateway.cli.main"]), "run", "--policy", str(policy),
             "--listen", "127.0.0.1:0", "--confdir", str(workdir / "confdir"),
             "--recordings", str(recordings), "--upstream-ca", lookalike.ca_cert,
             "--ready-file", str(ready), *lookalike.resolve_args(), *extra_args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env} if env else None,
        )
    info = wait_for_file(ready, proc, log)
    return RunningGateway(workdir, info, proc, log, recordings)


@contextmanager
def gateway_running(workdir: Path, lookalike: Lookalike, **kwargs) -> Iterator[RunningGateway]:
    """``start_gateway(workdir, lookalike, **kwargs)``, stopped when the block ends: a fixture's
    ``with gateway_running(...) as gw: yield gw``."""
    gw = start_gateway(workdir, lookalike, **kwargs)
    try:
        yield gw
    finally:
        stop(gw.proc)


REFUSING_RULE = "recordings-refuse-user-deletes"


def policy_with_a_deny_rule(directory: Path) -> Path:
    """The example policy plus one deny rule the tests own (``REFUSING_RULE``: DELETE of a user),
    so a refusal by a named rule does not depend on how the example's own rules evolve."""
    text = EXAMPLE_POLICY.read_text().rstrip("\n") + f"""

  - id: {REFUSING_RULE}
    description: the recordings tests' own refusal
    action: deny
    operations:
      - host: graph.microsoft.com
        methods: [DELETE]
        paths: ["/users/{{id}}"]
"""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "policy.yaml"
    path.write_text(text)
    return path


def start_with_a_deny_rule(workdir: Path, lookalike: Lookalike, extra_args=()) -> RunningGateway:
    """``start_gateway`` with :func:`policy_with_a_deny_rule` written to ``workdir``."""
    return start_gateway(workdir, lookalike, policy=policy_with_a_deny_rule(workdir), extra_args=list(extra_args))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, lookalike) -> RunningGateway:
    with gateway_running(tmp_path_factory.mktemp("gateway"), lookalike) as gw:
        yield gw


@pytest.fixture(scope="session")
def tokens(lookalike):
    """Mint tokens in Entra's shapes with the look-alike authority's own keys."""
    authority = lookalike.authority()
    app = lookalike.app("mcp-directory")

    def mint(**overrides) -> str:
        args = dict(
            tenant_id=lookalike.tenant_id,
            app_id=app["client_id"],
            object_id=app["object_id"],
            display_name="mcp-directory",
            roles=tuple(app.get("roles", ())),
        )
        args.update(overrides)
        return authority.mint_app_token(**args)

    return mint


# --- approvals -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def authority(lookalike):
    return lookalike.authority()


@pytest.fixture
def workload(lookalike, authority):
    """``workload()``: a token of rotation-bot's application for this test's own service principal
    (the same one on each call); ``workload(object_id)`` for another."""
    oid = str(uuid.uuid4())

    def mint(object_id: str = oid) -> str:
        return workload_token(lookalike, authority, object_id)

    return mint


@pytest.fixture(scope="module")
def adele(lookalike, authority) -> str:
    return person(lookalike, authority, ADELE)


@pytest.fixture
def api(gateway, adele) -> API:
    return API(gateway, adele)
