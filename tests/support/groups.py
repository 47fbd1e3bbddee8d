"""The gateway's own view of group membership, without Graph: a fake token endpoint and
getMemberGroups (``FakeGraph``), the gateway's credential, and the calling app's principal.

The caller ``SP`` (an instance of ``CALLER_APP``) is in ``GROUP_A`` and ``GROUP_B``; the gateway signs
in as ``GATEWAY_APP`` with the client secret ``SECRET``.
"""

from __future__ import annotations

import asyncio
import textwrap

import httpx

from nhi_gateway.identity.groups import GraphCredential
from nhi_gateway.identity.principal import Principal

from .policies import policy_head

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
GATEWAY_APP = "9d7c1f00-0000-4000-8000-0000000000aa"
CALLER_APP = "5e0b1683-de22-5eac-9334-fb85a741f6ff"
SP = "0b1c2d3e-0000-4000-8000-000000000042"
GROUP_A = "aaaaaaaa-0000-4000-8000-00000000000a"
GROUP_B = "bbbbbbbb-0000-4000-8000-00000000000b"
SECRET = "abc8Q~not-a-real-secret-but-shaped-like-1"

# The start of a policy with group rules: members of GROUP_A read groups. A module appends its
# further rules (each ``  - id: ...``).
GROUP_RULES_HEAD = policy_head(TENANT) + textwrap.dedent(f"""\
    rules:
      - id: readers-read-groups
        action: allow
        when: {{groups: [{GROUP_A}]}}
        operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/groups/**"]}}]
    """)


class FakeGraph:
    """The token endpoint and getMemberGroups, answering from ``groups``; records every call."""

    def __init__(self, groups: dict[str, list[str]] | None = None) -> None:
        self.groups = groups if groups is not None else {SP: [GROUP_A.upper(), GROUP_B]}
        self.calls: list[dict] = []
        self.gate: asyncio.Event | None = None
        self.token_answer: tuple[int, object] | None = None  # override
        self.graph_answers: list[tuple[int, object]] = []  # consumed first, then the directory
        self.raise_on: str | None = None  # "token" or "graph": the network fails
        self.issued = 0

    async def post_json(self, url, *, form=None, json_body=None, headers=None):
        self.calls.append({"url": url, "form": form, "json": json_body, "headers": dict(headers or {})})
        if self.gate is not None:
            await self.gate.wait()
        kind = "token" if url.endswith("/oauth2/v2.0/token") else "graph"
        if self.raise_on == kind:
            raise httpx.ConnectError("connection refused")
        if kind == "token":
            if self.token_answer is not None:
                return self.token_answer
            self.issued += 1
            return 200, {"token_type": "Bearer", "expires_in": 3599, "access_token": f"gateway-token-{self.issued}"}
        if self.graph_answers:
            return self.graph_answers.pop(0)
        oid = url.split("/")[-2]
        if oid not in self.groups:
            return 404, {"error": {"code": "Request_ResourceNotFound", "message": f"Resource '{oid}' does not exist"}}
        return 200, {"value": self.groups[oid]}

    def urls(self, kind: str | None = None) -> list[str]:
        urls = [c["url"] for c in self.calls]
        if kind == "token":
            return [u for u in urls if u.endswith("/token")]
        if kind == "graph":
            return [u for u in urls if not u.endswith("/token")]
        return urls


def credential(**kw) -> GraphCredential:
    """The gateway's Graph credential (a client secret unless ``kw`` says otherwise)."""
    return GraphCredential(**{"tenant_id": TENANT, "client_id": GATEWAY_APP, "client_secret": SECRET, **kw})


def app_principal(oid: str = SP, tenant: str = TENANT, **kw) -> Principal:
    """The calling app's verified principal (``groups`` not yet known unless given)."""
    return Principal(tenant_id=tenant, object_id=oid, app_id=CALLER_APP, display_name="mcp-directory", **kw)
