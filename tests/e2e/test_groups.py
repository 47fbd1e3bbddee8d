"""Group rules for service principals, end to end: the real gateway resolves mcp-directory's
transitive groups from the Graph look-alike with a credential of its own (nhi-gateway's), given
the way an operator gives it (environment and command line), and a policy rule on a group decides.

mcp-directory's service principal is a direct member of "NHI Directory Readers", which is itself
a member of "All Automation": a rule on All Automation allows it only if the lookup is transitive.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import uuid

import pytest
import requests

from ..support.e2e import GRAPH, audit_line, graph_credential, marker, reached_graph, use_proxy
from ..support.policies import ALL_GRAPH_AUDIENCES, V1_ISSUER, V2_ISSUER, policy_head
from .conftest import gateway_running, module_policy, start_gateway, stop

ATTACKER_HOST = "claims.attacker.example"


def policy_text(lookalike) -> str:
    groups = lookalike.info["groups"]
    mcp = lookalike.app("mcp-directory")["client_id"]
    head = policy_head(lookalike.tenant_id, issuers=(V1_ISSUER, V2_ISSUER), audiences=ALL_GRAPH_AUDIENCES,
                       upstreams=[{"host": "graph.microsoft.com", "token": "any"}])
    return head + f"""\
rules:
  - id: automation-reads-groups
    action: allow
    when: {{groups: [{groups["All Automation"]}]}}    # mcp-directory only transitively
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/groups/**"]
  - id: finance-reads-applications
    action: allow
    when: {{groups: [{groups["Finance"]}]}}           # mcp-directory is not in Finance
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/applications/**"]
  - id: mcp-reads-users
    action: allow
    when: {{app_ids: [{mcp}]}}                         # no group rule can affect these requests
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users/**"]
"""


class Listener:
    """A TCP listener that notes every connection: where a request the gateway must never make
    would arrive."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def attacker():
    listener = Listener()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def policy(tmp_path_factory, lookalike):
    return module_policy(tmp_path_factory, "groups", policy_text(lookalike))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, lookalike, policy, attacker):
    args, env = graph_credential(lookalike)
    # Were the gateway to follow an endpoint written in a token, this is where it would arrive.
    args += ["--resolve", f"{ATTACKER_HOST}=127.0.0.1:{attacker.port}"]
    with gateway_running(tmp_path_factory.mktemp("groups-gateway"), lookalike, policy=policy, extra_args=args,
                         env=env) as gw:
        yield gw


def get(gateway, monkeypatch, path: str, token: str) -> tuple[requests.Response, str]:
    use_proxy(monkeypatch, gateway)
    mark = marker()
    sep = "&" if "?" in path else "?"
    r = requests.get(f"{GRAPH}{path}{sep}m={mark}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return r, mark


def member_group_lookups(lookalike, object_id: str) -> list[dict]:
    return [line for line in lookalike.received()
            if line["method"] == "POST" and line["path"].lower() == f"/v1.0/serviceprincipals/{object_id}/getmembergroups"]


# --- decisions on groups -------------------------------------------------------------------------


def test_service_principal_in_the_group_transitively_is_allowed(gateway, lookalike, tokens, monkeypatch):
    groups = lookalike.info["groups"]
    r, mark = get(gateway, monkeypatch, "/v1.0/groups", tokens())
    assert r.status_code == 200, r.text
    assert reached_graph(lookalike, mark)
    line = audit_line(gateway, mark)
    assert line["decision"] == "allow" and line["rule"] == "automation-reads-groups"
    assert sorted(line["principal"]["groups"]) == sorted([groups["All Automation"], groups["NHI Directory Readers"]])
    # The gateway asked Graph itself, as nhi-gateway: its own token, never the caller's.
    assert member_group_lookups(lookalike, lookalike.app("mcp-directory")["object_id"])
    assert "issued a Graph token to nhi-gateway" in (lookalike.state_dir / "lookalike.log").read_text()


def test_a_rule_for_a_group_it_is_not_in_does_not_allow(gateway, lookalike, tokens, monkeypatch):
    r, mark = get(gateway, monkeypatch, "/v1.0/applications", tokens())
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "Authorization_RequestDenied"
    assert "no rule allows" in r.json()["error"]["message"]
    assert not reached_graph(lookalike, mark)


def test_membership_is_asked_once_and_reused(gateway, lookalike, tokens, monkeypatch):
    sp = lookalike.app("mcp-directory")["object_id"]
    get(gateway, monkeypatch, "/v1.0/groups", tokens())  # warm (or already warm)
    before = len(member_group_lookups(lookalike, sp))
    for _ in range(3):
        r, _ = get(gateway, monkeypatch, "/v1.0/groups", tokens())  # fresh tokens, same principal
        assert r.status_code == 200
    assert len(member_group_lookups(lookalike, sp)) == before


def test_overage_markers_on_an_app_only_token_are_refused_and_never_followed(
        gateway, lookalike, tokens, monkeypatch, attacker):
    """Entra writes overage markers for users only: on an app-only token they contradict it, so
    the token is refused (issue 13, item 3), and the endpoint it names is never called."""
    bait = uuid.uuid4().hex
    overage = {
        "_claim_names": {"groups": "src1", "wids": "src2"},
        "_claim_sources": {
            "src1": {"endpoint": f"https://{ATTACKER_HOST}/v1.0/users/{bait}/getMemberObjects"},
            "src2": {"endpoint": f"https://graph.microsoft.com/v1.0/{bait}/getMemberObjects"},
        },
    }
    r, mark = get(gateway, monkeypatch, "/v1.0/groups", tokens(extra_claims=overage))
    assert r.status_code == 401, r.text
    assert r.json()["error"]["innerError"]["nhi-gateway"]["check"] == "contradiction"
    assert not any(mark in line["path"] for line in lookalike.received())
    assert attacker.connections == 0
    assert not any(bait in line["path"] for line in lookalike.received())
    assert bait not in gateway.log.read_text()


def test_delegated_token_keeps_its_groups_claim(gateway, lookalike, tokens, monkeypatch):
    groups = lookalike.info["groups"]
    user = str(uuid.uuid4())  # not in the directory: a lookup would fail, so none may happen
    token = tokens(object_id=user, roles=(), groups=[groups["All Automation"]],
                   extra_claims={"idtyp": "user", "scp": "Group.Read.All", "sub": uuid.uuid4().hex})
    r, mark = get(gateway, monkeypatch, "/v1.0/groups", token)
    assert r.status_code == 200, r.text
    assert audit_line(gateway, mark)["principal"]["groups"] == [groups["All Automation"]]
    assert not any(user in line["path"] for line in lookalike.received())


def test_the_gateways_secret_stays_out_of_logs_recordings_and_audit(gateway, lookalike):
    secret = lookalike.app("nhi-gateway")["secret"]
    assert secret not in gateway.log.read_text()
    assert not any(secret.encode() in p.read_bytes() for p in gateway.recordings.rglob("*") if p.is_file())


# --- the credential, and when Graph cannot answer ---------------------------------------------------


def test_certificate_credential_from_the_command_line(tmp_path, lookalike, policy, tokens, monkeypatch):
    gw_app = lookalike.app("nhi-gateway")
    gw = start_gateway(tmp_path / "gw", lookalike, policy, extra_args=[
        "--graph-client-id", gw_app["client_id"], "--graph-tenant-id", lookalike.tenant_id,
        "--graph-certificate", gw_app["cert_path"], "--graph-certificate-key", gw_app["key_path"]])
    try:
        r, mark = get(gw, monkeypatch, "/v1.0/groups", tokens())
        assert r.status_code == 200, r.text
        assert audit_line(gw, mark)["rule"] == "automation-reads-groups"
    finally:
        stop(gw.proc)


def test_refused_credential_fails_closed_only_where_groups_decide(tmp_path, lookalike, policy, tokens, monkeypatch):
    wrong = "bad8Q~" + uuid.uuid4().hex
    args, env = graph_credential(lookalike, secret=wrong)
    gw = start_gateway(tmp_path / "gw", lookalike, policy, extra_args=args, env=env)
    try:
        r, mark = get(gw, monkeypatch, "/v1.0/groups", tokens())
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["innerError"]["nhi-gateway"]["check"] == "groups_unavailable"
        assert "AADSTS7000215" in error["message"]
        assert not reached_graph(lookalike, mark)

        # Requests that no group rule could decide are not held hostage by the lookup.
        r, mark = get(gw, monkeypatch, "/v1.0/users?$top=1", tokens())
        assert r.status_code == 200, r.text
        assert reached_graph(lookalike, mark)
        assert wrong not in gw.log.read_text()
    finally:
        stop(gw.proc)


def test_group_rules_without_a_credential_fail_closed(tmp_path, lookalike, policy, tokens, monkeypatch):
    gw = start_gateway(tmp_path / "gw", lookalike, policy)
    try:
        r, mark = get(gw, monkeypatch, "/v1.0/groups", tokens())
        assert r.status_code == 503
        assert "no Graph credential" in r.json()["error"]["message"]
        assert not reached_graph(lookalike, mark)
    finally:
        stop(gw.proc)


def test_a_half_configured_credential_stops_the_start(tmp_path, lookalike, policy):
    out = subprocess.run(
        [sys.executable, "-m", "nhi_gateway.cli.main", "run", "--policy", str(policy), "--listen", "127.0.0.1:0",
         "--confdir", str(tmp_path / "c"), "--graph-client-id", lookalike.app("nhi-gateway")["client_id"]],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("NHI_GRAPH_")},
    )
    assert out.returncode == 2
    assert "NHI_GRAPH_TENANT_ID" in out.stderr
