"""Just-in-time approval through a running gateway: its policy, the workload and the people who
decide, the approval API and the ``nhi-gateway approvals`` command as an approver calls them, and a
held request in a thread of its own.

The identities come from the look-alike tenant: the workload is rotation-bot's application (each
test mints a service principal of its own, so grants of one test never cover another's requests);
the approvers are its users, with delegated tokens for the gateway's app registration. The
fixtures built on these (``authority``, ``workload``, ``adele``, ``api``) are in
``tests/e2e/conftest.py``.

Without a gateway, the unit tests of the approval store (SQLite and PostgreSQL alike) hold one
request: rotation-bot's addPassword (``open_request``), under the ``SETTINGS`` of rule
secret-rotation, decided by Adele (``ME``) or Alex (``ALEX_APPROVER``).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import requests

from nhi_gateway.approvals.store import Approvals, ApprovalSettings, Approver, ApproverList

from .e2e import GRAPH, marker
from .e2e import cli as nhi_gateway
from .policies import ALL_GRAPH_AUDIENCES, V1_ISSUER, V2_ISSUER, policy_head

# Users of the look-alike tenant (lookalike/directory.py: stable ids).
ADELE = ("0f573d36-fa84-5b0a-917c-50d218f4571b", "Adele Vance")  # named in the rules
MEGAN = ("03bc8a03-1dad-59dd-8239-0e5b03001054", "Megan Bowen")  # in Finance, named by group
ALEX = ("9d30a7d1-85d0-5d80-8734-f6a6cb79de21", "Alex Wilber")  # named by no rule of policy_text
SELF_LISTED = "6f1d2c3b-0000-4000-8000-00000000a11f"  # a workload the policy also names as approver
WAIT = 30.0  # the longest any test waits for the gateway to reach a state (never asserted)


def policy_text(lookalike, webhook: str | None = None) -> str:
    """Directory reads are allowed; rotation-bot's addPassword waits for Adele, SELF_LISTED or
    Finance (grants up to 1h, masked answers) and its addKey for Adele, for 2 seconds at most."""
    bot = lookalike.app("rotation-bot")["client_id"]
    finance = lookalike.info["groups"]["Finance"]
    api = lookalike.info["approvals_api"]  # the gateway's app registration in the look-alike tenant
    approvals = (f"approvals:\n  client_id: {api['client_id']}\n  app_id_uri: {api['app_id_uri']}\n"
                 f"  scope: {api['scope']}\n  require_auth_context: {api['auth_context']}\n")
    approvals += f"  webhook: {webhook}\n" if webhook else ""
    head = policy_head(lookalike.tenant_id, issuers=(V1_ISSUER, V2_ISSUER), audiences=ALL_GRAPH_AUDIENCES)
    return head + f"""\
{approvals}masking:
  profiles:
    secrets: {{fields: [secretText, hint]}}
rules:
  - id: directory-read
    action: allow
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users/**"]
  - id: secret-rotation
    action: approve
    when: {{app_ids: [{bot}]}}
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/applications/{{id}}/addPassword"]
    mask: secrets
    approval:
      approvers:
        users: [{ADELE[0]}, {SELF_LISTED}]
        groups: [{finance}]
      timeout: 2m
      max_grant: 1h
  - id: key-rotation
    action: approve
    when: {{app_ids: [{bot}]}}
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/applications/{{id}}/addKey"]
    approval:
      approvers: {{users: [{ADELE[0]}]}}
      timeout: 2s
"""


def policy_file(directory: Path, lookalike, webhook: str | None = None) -> Path:
    """:func:`policy_text` written to ``directory/policy.yaml``."""
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / "policy.yaml"
    policy.write_text(policy_text(lookalike, webhook))
    return policy


def workload_token(lookalike, authority, object_id: str | None = None) -> str:
    """A token of rotation-bot's application, for the service principal ``object_id`` (a new one
    unless given)."""
    return authority.mint_app_token(
        tenant_id=lookalike.tenant_id, app_id=lookalike.app("rotation-bot")["client_id"],
        object_id=object_id or str(uuid.uuid4()), display_name="rotation-bot", roles=("Application.ReadWrite.All",))


def person(lookalike, authority, who: tuple[str, str], groups: list[str] | None = None, **changes) -> str:
    """A person's approver token, as `nhi-gateway approvals login` gets it after an MFA sign-in:
    v2, for the gateway's app registration, with its scope and authentication context."""
    oid, name = who
    alias = name.split()[0] + name.split()[1][0]
    api = lookalike.info["approvals_api"]
    args = dict(tenant_id=lookalike.tenant_id, object_id=oid, client_id=api["client_id"],
                audience=api["client_id"], scopes=[api["scope"]], name=name,
                upn=f"{alias}@{lookalike.info['tenant_domain']}", amr=["pwd", "mfa"], acrs=[api["auth_context"]],
                groups=groups)
    return authority.mint_user_token(**(args | changes))


class API:
    """The approval API as an approver's script calls it: its own token, no proxy."""

    def __init__(self, gateway, token: str) -> None:
        self.url = gateway.info["approvals_api"]
        self.client = httpx.Client(base_url=self.url, trust_env=False, timeout=30,
                                   headers={"Authorization": f"Bearer {token}"})

    def get(self, path: str, **params) -> httpx.Response:
        return self.client.get(path, params=params)

    def approve(self, approval_id: str, **body) -> httpx.Response:
        return self.client.post(f"/approvals/{approval_id}/approve", json=body)

    def deny(self, approval_id: str, reason: str = "") -> httpx.Response:
        return self.client.post(f"/approvals/{approval_id}/deny", json={"reason": reason})

    def revoke(self, grant_id: str) -> httpx.Response:
        return self.client.delete(f"/grants/{grant_id}")

    def approvals(self, state: str = "pending") -> list[dict]:
        r = self.get("/approvals", **({"state": "all"} if state == "all" else {}))
        assert r.status_code == 200, r.text
        return r.json()["approvals"]

    def wait_for(self, mark: str, state: str = "pending", count: int = 1) -> list[dict]:
        """The approval requests whose URL carries ``mark``, once ``count`` are in ``state``."""
        deadline = time.monotonic() + WAIT
        while True:
            found = [a for a in self.approvals("all") if mark in a["url"] and a["state"] == state]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def grants(self, state: str = "active") -> list[dict]:
        r = self.get("/grants", **({"state": "all"} if state == "all" else {}))
        assert r.status_code == 200, r.text
        return r.json()["grants"]


class Call:
    """One client request in a thread of its own: held requests block their caller, not the test.

    Through ``gateway`` (its proxy URL and CA) when given, else as this process's environment
    says (``use_proxy``)."""

    def __init__(self, method: str, url: str, token: str, body: dict | None = None, timeout: float = 120,
                 gateway=None) -> None:
        self.response: requests.Response | None = None
        self.error: BaseException | None = None
        via = {} if gateway is None else {"proxies": {"https": gateway.proxy(), "http": gateway.proxy()},
                                          "verify": gateway.ca_cert}

        def run() -> None:
            try:
                self.response = requests.request(method, url, json=body, timeout=timeout,
                                                 headers={"Authorization": f"Bearer {token}"}, **via)
            except BaseException as e:  # noqa: BLE001 - reported by result()
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float = WAIT * 2) -> requests.Response:
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        assert self.response is not None, "the request is still held"
        return self.response


def add_password(lookalike, token: str, mark: str, app: str = "mcp-directory", name: str = "rotated",
                 gateway=None) -> Call:
    """rotation-bot's risky request: a new client secret for ``app`` (held by the policy)."""
    app_id = lookalike.app(app)["application_object_id"]
    return Call("POST", f"{GRAPH}/v1.0/applications/{app_id}/addPassword?m={mark}", token,
                {"passwordCredential": {"displayName": name}}, gateway=gateway)


def hold(lookalike, api: API, token: str) -> tuple[str, Call, dict]:
    """rotation-bot's addPassword, with a marker of its own, once the gateway holds it: the
    marker, the waiting call, and the approval request as ``api`` lists it."""
    mark = marker()
    call = add_password(lookalike, token, mark)
    [held] = api.wait_for(mark)
    return mark, call, held


def audit_of(gateway, flow_id: str) -> list[dict]:
    return [a for a in gateway.audit() if a.get("flow_id") == flow_id]


def held_flow(gateway, approval_id: str) -> str:
    """The flow id an approval request was opened for, from its audit line."""
    for line in gateway.audit():
        if line.get("event") == "approval_requested" and (line.get("approval") or {}).get("id") == approval_id:
            return line["flow_id"]
    raise AssertionError(f"no audit line opened {approval_id}")


def outcome_lines(gateway, approval_id: str) -> list[dict]:
    """The audit lines of what became of the held flow (not the approval events on the way)."""
    return [line for line in audit_of(gateway, held_flow(gateway, approval_id)) if not line.get("event")]


def audited_outcome(gateway, approval_id: str) -> dict:
    """The one outcome line of a held flow, waited for: a cancelled flow's is written only when
    its connection is torn down."""
    deadline = time.monotonic() + WAIT
    while not outcome_lines(gateway, approval_id):
        assert time.monotonic() < deadline, "the cancelled flow was never audited"
        time.sleep(0.05)
    [final] = outcome_lines(gateway, approval_id)
    return final


def cli(gateway, token: str, *args: str) -> subprocess.CompletedProcess:
    """``nhi-gateway approvals ARGS`` as an approver runs it: their token and the API in the environment."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(NHI_APPROVER_TOKEN=token, NHI_APPROVALS_API=gateway.info["approvals_api"],
               PYTHON_KEYRING_BACKEND="keyring.backends.fail.Keyring")  # never the tester's own keyring
    return nhi_gateway("approvals", *args, env=env, timeout=60)


# --- the approval store, without a gateway ----------------------------------------------------------

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"  # the look-alike tenant
BOT_APP = "a00780c4-4e70-52ba-ab0f-9b41ac40647f"  # rotation-bot's application
BOT = "7bd2d17b-a2d0-5ab8-a878-8aa5264c31c2"  # its service principal: the workload whose request is held
BOT_PRINCIPAL = {"tenant_id": TENANT, "object_id": BOT, "app_id": BOT_APP, "display_name": "rotation-bot"}
TARGET = "/v1.0/applications/b34e6fbe-e558-5361-ab5e-1089c54df4e8/addPassword"
OPERATION = "POST graph.microsoft.com /v1.0/applications/b34e6fbe-e558-5361-ab5e-1089c54df4e8/addpassword"
ME = Approver(TENANT, *ADELE)  # the approver a test decides as
ALEX_APPROVER = Approver(TENANT, *ALEX)  # another one, deciding at the same time
# rotation-bot is named as an approver too, so that a test sees it still cannot approve its own request.
SETTINGS = ApprovalSettings("secret-rotation", ApproverList(frozenset({ADELE[0], ALEX[0], BOT}), frozenset()),
                            120, 3600)


HELD = {"principal": BOT_PRINCIPAL, "operation": OPERATION, "method": "POST",
        "url": "https://graph.microsoft.com" + TARGET, "digest": "sha256:00", "flow_id": "f1"}


def open_request(approvals: Approvals, settings: ApprovalSettings = SETTINGS):
    """rotation-bot's addPassword, held for a decision under ``settings``."""
    return approvals.open(settings=settings, **HELD)
