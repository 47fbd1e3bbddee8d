"""Recorded traffic as the policy tools read it back (``nhi-gateway policy explain|replay|suggest``,
``nhi-gateway permissions``): flows as the gateway's recorder writes them, each with the decision
it got, from two identities of the look-alike tenant (mcp-directory, ``MCP_PRINCIPAL``, and
rotation-bot, ``ROTATION_BOT``).

``recorded`` is one flow with the decision it got (or none); ``allowed`` and ``denied`` make that
decision as the policy step writes it; ``write_flows`` writes flows to a recording file.
``policy_cli`` runs ``nhi-gateway policy ARGS`` in this process, as the tests of the tools call it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from mitmproxy import io
from mitmproxy.test import tflow, tutils

from nhi_gateway.cli.main import main
from nhi_gateway.identity.principal import AuthMethod, Principal, TokenSource
from nhi_gateway.policy.decision import Action, Decision, Stage

from .policies import GRAPH_HOST, op

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
MCP = "5e0b1683-de22-5eac-9334-fb85a741f6ff"  # mcp-directory's application (client) id
OID = "0b1c2d3e-0000-4000-8000-000000000042"  # mcp-directory's service principal
USER = "3f2a1b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b"  # a user the traffic reads and deletes
APP_OBJECT = "b34e6fbe-e558-5361-ab5e-1089c54df4e8"  # the application rotation-bot adds a password to
ROTATION_BOT_APP = "a00780c4-4e70-52ba-ab0f-9b41ac40647f"

MCP_PRINCIPAL = Principal(TENANT, OID, MCP, "mcp-directory", auth_method=AuthMethod.CERTIFICATE,
                          token_sources=(TokenSource.BEARER,))
ROTATION_BOT = Principal(TENANT, "7bd2d17b-a2d0-5ab8-a878-8aa5264c31c2", ROTATION_BOT_APP, "rotation-bot",
                         roles=("Application.ReadWrite.OwnedBy",), auth_method=AuthMethod.CERTIFICATE,
                         token_sources=(TokenSource.BEARER,))
RECORDED_AT = datetime(2025, 7, 7, 9, 30, tzinfo=UTC)  # a Monday


def policy_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``nhi-gateway policy ARGV`` through the real entry point: its exit code, stdout and stderr."""
    code = main(["policy", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def recorded(method: str, target: str, decision: Decision | None, host: str = GRAPH_HOST):
    """A flow as the gateway's recorder writes it: the redacted request and the decision."""
    req = tutils.treq(method=method.encode(), scheme=b"https", host=host, port=443, authority=b"",
                      path=target.encode(), headers=((b"host", host.encode()),), content=b"")
    f = tflow.tflow(req=req, resp=True)
    f.request.timestamp_start = RECORDED_AT.timestamp()
    if decision is not None:
        f.metadata["nhi"] = decision.to_dict()
    return f


def allowed(method: str, target: str, who: Principal | None = MCP_PRINCIPAL, rule: str = "directory-read",
            host: str = GRAPH_HOST, at: datetime = RECORDED_AT, mask: str | None = "directory-pii", **extra):
    """A flow ``rule`` allowed for ``who`` at ``at``, masked with ``mask``; ``extra`` goes into the
    decision (an approval, a token grant)."""
    d = Decision(Action.ALLOW, Stage.POLICY, f"allowed by rule '{rule}'", rule_id=rule,
                 operation=str(op(method, target, host)), principal=who.to_dict() if who else None,
                 mask_profile=mask, extra=extra)
    f = recorded(method, target, d, host=host)
    f.request.timestamp_start = at.timestamp()
    return f


def denied(method: str, target: str, rule: str | None = None, who: Principal = MCP_PRINCIPAL):
    """A flow the policy refused for ``who``, by ``rule`` or because no rule allowed it."""
    d = Decision.deny(Stage.POLICY, 403, "Authorization_RequestDenied", "no", rule_id=rule,
                      operation=str(op(method, target)), principal=who.to_dict())
    return recorded(method, target, d)


def write_flows(path: Path, flows) -> Path:
    """``flows`` written to the recording file ``path`` with mitmproxy's FlowWriter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        writer = io.FlowWriter(f)
        for flow in flows:
            writer.add(flow)
    return path
