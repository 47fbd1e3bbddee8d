"""``nhi-gateway demo``: the look-alike Entra ID and Graph, the gateway, and an MCP server that an
agent drives through it, all on loopback and in a few seconds; then one request that waits for a
person's approval, from the request to the approver's command to the answer (:mod:`.approval`).

The demo starts two services as child processes, runs the workload, prints what the gateway
decided for each request, where the recordings and the audit trail are, and exits 0 only when
every request had the outcome the example policy promises and no credential reached the disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import nhi_gateway

from nhi_gateway.policy.loader import PolicyError
from nhi_gateway.demo import report
from nhi_gateway.demo.approval import policy_with_approval, run_approval
from nhi_gateway.demo.services import Service, ServiceFailed, log_tail, start_gateway, start_lookalike
from nhi_gateway.demo.workload import SESSION_TIMEOUT, Outcome, run_workload, steps

APP = "mcp-directory"  # the look-alike's client app that policies/example.yaml lets read the directory


def example_policy() -> Path:
    return Path(nhi_gateway.__file__).resolve().parents[2] / "policies" / "example.yaml"


@dataclass(frozen=True)
class Stack:
    """What the running services told us about themselves."""

    entra: dict  # lookalike.json
    app: dict  # the client app's entry in it: client_id, secret, application_object_id, ...
    gateway: dict  # the gateway's ready file: host, port, ca_cert, pid

    @property
    def proxy(self) -> str:
        return f"http://{self.gateway['host']}:{self.gateway['port']}"

    def workload_env(self) -> dict[str, str]:
        """How an agent starts an MCP server behind the gateway: the proxy, the gateway's CA,
        and the app's credentials under the names Azure's SDKs read."""
        ca = self.gateway["ca_cert"]
        return {
            "HTTPS_PROXY": self.proxy,
            "SSL_CERT_FILE": ca,
            "REQUESTS_CA_BUNDLE": ca,
            "AZURE_TENANT_ID": self.entra["tenant_id"],
            "AZURE_CLIENT_ID": self.app["client_id"],
            "AZURE_CLIENT_SECRET": self.app["secret"],
        }


def _app(entra: dict, name: str) -> dict:
    apps = entra.get("apps") or {}
    if isinstance(apps, dict):
        if name in apps:
            return apps[name]
        apps = list(apps.values())
    for app in apps:
        if name in (app.get("name"), app.get("display_name")):
            return app
    raise ServiceFailed(f"the look-alike registers no client app named {name!r}")


def _start(workdir: Path, policy: Path, services: list[Service]) -> Stack:
    lookalike = start_lookalike(workdir / "lookalike", workdir / "lookalike.log")
    services.append(lookalike)
    entra = lookalike.wait_ready(workdir / "lookalike" / "lookalike.json")
    gateway = start_gateway(policy=policy, workdir=workdir, lookalike_port=entra["port"],
                            upstream_ca=entra["ca_cert"], log=workdir / "gateway.log")
    services.append(gateway)
    return Stack(entra, _app(entra, APP), gateway.wait_ready(workdir / "gateway.json"))


def _innermost(e: BaseException) -> BaseException:
    # anyio's task groups wrap the interesting exception in one or more ExceptionGroups.
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def _count_lines(path: Path) -> int:
    return sum(1 for _ in path.open("rb")) if path.exists() else 0


def run_demo(workdir: Path) -> int:
    started, started_wall = time.monotonic(), time.time()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    example = example_policy()
    if not example.exists():
        print(f"nhi-gateway demo: the example policy is missing: {example}\n"
              "Run the demo from a checkout of the repository (scripts/demo).")
        return 2
    try:
        policy = policy_with_approval(example, workdir / "policy.yaml")
    except (ValueError, PolicyError) as e:
        print(f"nhi-gateway demo: {e}")
        return 2
    recordings = workdir / "recordings"
    audit = recordings / "audit.jsonl"
    audit_lines_before = _count_lines(audit)
    mcp_log = workdir / "mcp-server.log"
    services: list[Service] = []
    print(f"nhi-gateway demo (state, logs and recordings in {workdir})", flush=True)
    try:
        stack = _start(workdir, policy, services)
        print(f"  look-alike Entra ID + Graph  127.0.0.1:{stack.entra['port']}  tenant {stack.entra['tenant_id']}\n"
              f"  gateway                      {stack.gateway['host']}:{stack.gateway['port']}  policy {policy}\n"
              f"                               (the example policy, and rule secret-rotation for the approval step)\n"
              f"  MCP server {APP} (stdio)  HTTPS_PROXY={stack.proxy}  SSL_CERT_FILE={stack.gateway['ca_cert']}\n",
              flush=True)
        with mcp_log.open("w") as errlog:
            outcomes = run_workload(stack.workload_env(), steps(stack.app["application_object_id"]),
                                    audit, Path(stack.entra["received_log"]), errlog)
        outcomes.append(run_approval(stack.entra, stack.gateway, audit, Path(stack.entra["received_log"])))
        for service in services:
            if gone := service.exited():
                print(f"nhi-gateway demo: during the demo, {gone}\n")
    except ServiceFailed as e:
        print(f"nhi-gateway demo: {e}")
        return 1
    except KeyboardInterrupt:
        print("nhi-gateway demo: interrupted; stopping the services")
        return 130
    except Exception as e:  # the MCP session: a server that crashed or did not answer
        cause = _innermost(e)
        what = f"no answer within {SESSION_TIMEOUT:.0f} s" if isinstance(cause, TimeoutError) else repr(cause)
        print(f"nhi-gateway demo: the MCP workload failed: {what}\n"
              f"  MCP server log ({mcp_log}) ends with:\n{log_tail(mcp_log, 15)}")
        for service in services:
            print(f"  {service.name} ({'exited' if service.exited() else 'running'}), "
                  f"log {service.log} ends with:\n{service.log_tail(15)}")
        return 1
    finally:
        for service in reversed(services):
            service.stop()

    for line in report.table(outcomes):
        print(line)
    print()
    found = report.recordings(recordings, started_wall)
    for line in report.where_to_look(found, recordings, audit, _count_lines(audit) - audit_lines_before, APP):
        print(line)
    leaks = report.credentials_on_disk([r.path for r in found] + [audit], stack.app["secret"])
    return _verdict(outcomes, leaks, time.monotonic() - started)


def _verdict(outcomes: list[Outcome], leaks: list[str], elapsed: float) -> int:
    print()
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        for problem in o.problems:
            print(f"  differs: {o.step.label}: {problem}")
    for leak in leaks:
        print(f"  differs: {leak}")
    if failed or leaks:
        print(f"Demo FAILED: {len(failed)} of {len(outcomes)} steps differ from what the policy promises"
              + (", and credentials reached the disk" if leaks else "") + f" ({elapsed:.1f} s).")
        return 1
    print(f"All {len(outcomes)} steps had the expected outcome ({elapsed:.1f} s).")
    return 0
