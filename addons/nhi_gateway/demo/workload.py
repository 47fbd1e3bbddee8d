"""What the demo's agent does, and what it expects the gateway to have decided.

The agent is an MCP client session driving :mod:`nhi_gateway.demo.mcp_server` over stdio, as
agents run MCP servers. After each tool call the audit lines that call produced are read back,
so the table shows the gateway's own decision (rule or failed check) for allowed requests too,
and the look-alike's log of received requests shows whether anything reached Entra or Graph:
a refused request must not have.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from nhi_gateway.masking.masks import MASK

MCP_SERVER = Path(__file__).with_name("mcp_server.py")
CALL_TIMEOUT = 30.0  # seconds per tool call
SESSION_TIMEOUT = 60.0


@dataclass(frozen=True)
class Step:
    label: str
    tool: str
    status: int  # the HTTP status the gateway's answer must have
    action: str  # allow or deny
    arguments: dict = field(default_factory=dict)
    masked: bool = False  # the answer must show masked fields


@dataclass
class Outcome:
    step: Step
    status: int | None
    action: str  # allow, deny, or "?" when the gateway recorded no decision
    basis: str  # "rule directory-read", "check signature"
    forwarded: bool  # the look-alike Entra/Graph received a request during this step
    detail: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def steps(application_object_id: str) -> list[Step]:
    return [
        Step("get a token (client credentials)", "get_token", 200, "allow"),
        Step("list users, token in Authorization", "list_users", 200, "allow", {"top": 5}, masked=True),
        Step("list users, token in proxy credentials", "list_users_with_proxy_credentials", 200, "allow",
             {"top": 5}, masked=True),
        Step("add a client secret to an app", "add_app_password", 403, "deny",
             {"application_id": application_object_id}),
        Step("list users with a tampered token", "list_users_with_bad_token", 401, "deny", {"top": 5}),
    ]


# --- reading back what the gateway and the look-alike wrote ----------------------------------


class JsonLinesCursor:
    """Reads the JSON lines appended to a file since the last call (audit trail, received log)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new_records(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        records = []
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records


def request_record(records: list[dict]) -> dict | None:
    """The audit record of the step's own request: the last one that is not a CONNECT."""
    requests = [r for r in records if r.get("method") != "CONNECT"]
    return (requests or records or [None])[-1]


def from_workload(received: dict) -> bool:
    """A request the workload made, not one of the gateway's own metadata and key fetches (which
    reach the same look-alike, for the same host names)."""
    host, path = received.get("host", ""), received.get("path", "")
    if host.startswith("graph.microsoft.com"):
        return True
    return received.get("method") == "POST" and path.split("?")[0].endswith("/token")


# --- judging -------------------------------------------------------------------------------


def _masked_names(users: list) -> list[str]:
    names: list[str] = []
    for user in users:
        if isinstance(user, dict):
            for key, value in user.items():
                if value == MASK and key not in names:
                    names.append(key)
    return names


def _refusal(body: object) -> tuple[str, dict]:
    """(``code: message``, the gateway's innerError part) of a Graph-style error body."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", {}
    inner = error.get("innerError") or {}
    gateway = inner.get("nhi-gateway") if isinstance(inner, dict) else None
    return f"{error.get('code', '')}: {error.get('message', '')}", gateway if isinstance(gateway, dict) else {}


def _basis(rule: object, check: object, stage: object) -> str:
    if rule:
        return f"rule {rule}"
    if check:
        return f"check {check}"
    return f"{stage} stage" if stage else ""


def judge(step: Step, answer: dict, record: dict | None, received: list[dict]) -> Outcome:
    status = answer.get("status")
    body = answer.get("body")
    refusal, inner = _refusal(body)
    action = str(record.get("decision", "?")) if record else "?"
    if record:
        basis = _basis(record.get("rule"), record.get("check"), record.get("stage"))
    else:
        basis = _basis(inner.get("rule"), inner.get("check"), inner.get("stage"))

    problems: list[str] = []
    if answer.get("error"):
        detail = answer["error"]
    elif step.tool == "get_token" and status == 200:
        claims = answer.get("claims") or {}
        detail = (f"token {answer.get('fingerprint')} for {claims.get('app_displayname')}, "
                  f"roles {', '.join(claims.get('roles') or []) or 'none'}")
    elif refusal:
        detail = refusal
    elif isinstance(body, dict) and isinstance(body.get("error_description"), str):
        # Entra's own error shape (token endpoint): the AADSTS line says what was wrong.
        detail = f"{body.get('error')}: {body['error_description'].splitlines()[0]}"
    elif isinstance(body, dict) and isinstance(body.get("value"), list):
        users = body["value"]
        masked = _masked_names(users)
        masked.sort(key=lambda name: name != "mail")  # the one everybody recognises goes first
        shown = ", ".join(masked[:4]) + (f" +{len(masked) - 4} more" if len(masked) > 4 else "")
        detail = f"{len(users)} users; " + (f"{shown}: {MASK}" if masked else "nothing masked")
        if step.masked and users and not masked:
            problems.append(f"expected fields shown as {MASK!r}, the answer has none")
        first = users[0] if users and isinstance(users[0], dict) else {}
        if step.masked and "@" in str(first.get("mail", "")):
            problems.append(f"mail is readable in the answer: {first['mail']!r}")
    else:
        detail = json.dumps(body)[:200] if body is not None else "no body"

    if status != step.status:
        problems.append(f"expected HTTP {step.status}, got {status}")
    if record is None:
        problems.append("the gateway wrote no audit line for this request")
    elif action != step.action:
        problems.append(f"expected the gateway to {step.action}, it decided {action} ({basis})")
    if step.masked and status == 200 and not (isinstance(body, dict) and isinstance(body.get("value"), list)):
        problems.append("expected a Graph collection ({'value': [...]}) in the answer")
    forwarded = bool(received)
    if step.action == "deny" and forwarded:
        seen = ", ".join(f"{r.get('method')} {r.get('host')}{r.get('path')}" for r in received)
        problems.append(f"refused, yet the upstream received: {seen}")
    return Outcome(step, status, action, basis, forwarded, detail, problems)


# --- driving the MCP server ----------------------------------------------------------------


def _tool_answer(result) -> dict:
    if result.structured_content and isinstance(result.structured_content, dict):
        answer = dict(result.structured_content)
    else:
        text = "".join(getattr(block, "text", "") for block in result.content)
        try:
            answer = json.loads(text)
        except ValueError:
            answer = {"status": None, "error": text.strip()[:300] or "the tool returned nothing"}
    if result.is_error and "error" not in answer:
        answer["error"] = "the tool failed"
    return answer if isinstance(answer, dict) else {"status": None, "error": str(answer)[:300]}


async def _drive(server: StdioServerParameters, plan: list[Step], audit: Path, received: Path,
                 errlog: TextIO) -> list[Outcome]:
    outcomes = []
    with anyio.fail_after(SESSION_TIMEOUT):
        async with stdio_client(server, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                audit_lines, upstream_lines = JsonLinesCursor(audit), JsonLinesCursor(received)
                for step in plan:
                    result = await session.call_tool(step.tool, step.arguments, read_timeout_seconds=CALL_TIMEOUT)
                    upstream = [r for r in upstream_lines.new_records() if from_workload(r)]
                    record = request_record(audit_lines.new_records())
                    outcomes.append(judge(step, _tool_answer(result), record, upstream))
    return outcomes


def run_workload(env: dict[str, str], plan: list[Step], audit: Path, received: Path,
                 errlog: TextIO) -> list[Outcome]:
    """Start the MCP server with ``env`` (merged over a minimal inherited environment: PATH, HOME,
    ...; the caller's own proxy settings are not passed on) and run ``plan`` through it."""
    # By file, as MCP clients are configured ("command": "python", "args": ["server.py"]).
    server = StdioServerParameters(command=sys.executable, args=[str(MCP_SERVER)], env=env)
    return anyio.run(_drive, server, plan, audit, received, errlog)
