"""Every spelling of a Graph object is the same object, end to end (issue 18, item 1).

A rule denies adding secrets to mcp-directory's application, named by its object id, and another
denies reading Adele's user object. rotation-bot owns that application, so the Graph look-alike
would perform every addPassword the gateway lets through. Each spelling Graph accepts for the same
object (named keys in any case, appId, uniqueName, namespace-qualified actions, casts,
/directoryObjects, a UPN) is refused with the rule's name and never reaches Graph; the gateway
resolves alternate keys with its own Graph credential. Without that credential, requests such a
rule might decide are refused (503), never guessed at.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import requests

from ..support.e2e import GRAPH, graph_credential, marker, nhi, reached_graph
from ..support.policies import ALL_GRAPH_AUDIENCES, V1_ISSUER, V2_ISSUER, policy_head
from .conftest import gateway_running, module_policy

ADELE = "0f573d36-fa84-5b0a-917c-50d218f4571b"
ALEX = "9d30a7d1-85d0-5d80-8734-f6a6cb79de21"
UPN_ADELE = "AdeleV@nhilab.onmicrosoft.com"


def policy_text(lookalike) -> str:
    mcp, bot = lookalike.app("mcp-directory"), lookalike.app("rotation-bot")
    head = policy_head(lookalike.tenant_id, issuers=(V1_ISSUER, V2_ISSUER), audiences=ALL_GRAPH_AUDIENCES)
    return head + f"""\
rules:
  - id: mcp-keeps-its-secrets
    action: deny
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/applications/{mcp['application_object_id']}/addPassword"]
  - id: adele-is-private
    action: deny
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users/{ADELE}/**"]
  - id: rotation
    action: allow
    when: {{app_ids: [{bot['client_id']}]}}
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/applications/{{id}}/addPassword"]
  - id: reads
    action: allow
    when: {{app_ids: [{mcp['client_id']}]}}
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users/**", "/directoryObjects/**"]
"""


@pytest.fixture(scope="module")
def policy(tmp_path_factory, lookalike):
    return module_policy(tmp_path_factory, "objects", policy_text(lookalike))


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, lookalike, policy):
    args, env = graph_credential(lookalike)
    with gateway_running(tmp_path_factory.mktemp("objects-gateway"), lookalike, policy=policy, extra_args=args,
                         env=env) as gw:
        yield gw


@pytest.fixture(scope="module")
def uncredentialled(tmp_path_factory, lookalike, policy):
    with gateway_running(tmp_path_factory.mktemp("objects-no-credential"), lookalike, policy=policy) as gw:
        yield gw


@pytest.fixture(scope="module")
def bot(tokens, lookalike) -> str:
    app = lookalike.app("rotation-bot")
    return tokens(app_id=app["client_id"], object_id=app["object_id"], display_name="rotation-bot",
                  roles=("Application.ReadWrite.OwnedBy",))


def send(gateway, method: str, path: str, token: str) -> tuple[requests.Response, str]:
    mark = marker()
    sep = "&" if "?" in path else "?"
    body = {"passwordCredential": {"displayName": "spelling"}} if method == "POST" else None
    r = requests.request(method, f"{GRAPH}{path}{sep}m={mark}", json=body, headers={"Authorization": f"Bearer {token}"},
                         proxies={"https": gateway.proxy()}, verify=gateway.ca_cert, timeout=30)
    return r, mark


def secrets_of(lookalike, app: str) -> int:
    """How many secrets the look-alike's application holds: it grows only if addPassword ran."""
    clients = json.loads((lookalike.state_dir / "directory" / "clients.json").read_text())
    return len(clients[app]["passwords"])


def add_password_spellings(lookalike) -> list[str]:
    app = lookalike.app("mcp-directory")
    oid, appid = app["application_object_id"], app["client_id"]
    return [
        f"/v1.0/applications(id='{oid}')/addPassword",
        f"/v1.0/applications(Id='{oid}')/addPassword",
        f"/v1.0/applications('{oid}')/addPassword",
        f"/v1.0/applications(appId='{appid}')/addPassword",
        f"/v1.0/applications(appId='{appid.upper()}')/addPassword",
        "/v1.0/applications(uniqueName='mcp-directory')/addPassword",
        f"/v1.0/applications/{oid}/microsoft.graph.addPassword",
        f"/v1.0/applications/{oid}/microsoft.graph.application/addPassword",
        f"/v1.0/directoryObjects/{oid}/microsoft.graph.application/addPassword",
        f"/beta/applications(appId='{appid}')/microsoft.graph.addPassword",
    ]


def test_every_spelling_of_add_password_on_the_protected_application_is_refused(gateway, lookalike, bot):
    before = secrets_of(lookalike, "mcp-directory")
    for path in add_password_spellings(lookalike):
        r, mark = send(gateway, "POST", path, bot)
        assert r.status_code == 403, (path, r.text[:300])
        assert nhi(r)["rule"] == "mcp-keeps-its-secrets", (path, r.text[:300])
        assert not reached_graph(lookalike, mark), path
    assert secrets_of(lookalike, "mcp-directory") == before
    # The gateway asked Graph which object the alternate keys name, with its own credential.
    lookups = [line for line in lookalike.received() if line["method"] == "GET" and "$select=id" in line["path"]]
    assert any("appId=" in line["path"] for line in lookups) and any("uniqueName=" in line["path"] for line in lookups)


def test_an_alternate_key_of_another_object_is_judged_as_that_object(gateway, lookalike, bot):
    """Resolution is not refusal: rotation-bot's own application, named by appId, is allowed by the
    rotation rule and reaches Graph (which answers for itself)."""
    own = lookalike.app("rotation-bot")["client_id"]
    r, mark = send(gateway, "POST", f"/v1.0/applications(appId='{own}')/addPassword", bot)
    assert reached_graph(lookalike, mark), r.text[:300]
    line = next(a for a in gateway.audit() if mark in a["url"])
    assert line["decision"] == "allow" and line["rule"] == "rotation"


@pytest.mark.parametrize("path", [
    f"/v1.0/users/{UPN_ADELE}", "/v1.0/users('adelev@nhilab.onmicrosoft.com')",
    f"/v1.0/users(userPrincipalName='{UPN_ADELE}')", f"/v1.0/users(Id='{ADELE}')",
    f"/v1.0/users/{UPN_ADELE}/memberOf", f"/v1.0/directoryObjects/{ADELE}",
    f"/v1.0/directoryObjects/{ADELE}/microsoft.graph.user", f"/beta/directoryObjects('{ADELE}')",
])
def test_every_spelling_of_the_private_user_is_refused(gateway, lookalike, tokens, path):
    r, mark = send(gateway, "GET", path, tokens())
    assert r.status_code == 403, r.text[:300]
    assert nhi(r)["rule"] == "adele-is-private"
    assert not reached_graph(lookalike, mark)


@pytest.mark.parametrize("path", ["/v1.0/users/AlexW@nhilab.onmicrosoft.com", f"/v1.0/directoryObjects/{ALEX}"])
def test_other_users_in_the_same_spellings_are_read(gateway, lookalike, tokens, path):
    r, mark = send(gateway, "GET", path, tokens())
    assert r.status_code == 200, r.text[:300]
    assert r.json()["id"] == ALEX and reached_graph(lookalike, mark)


def test_without_a_graph_credential_alternate_keys_are_refused_not_guessed(uncredentialled, lookalike, bot, tokens):
    before = secrets_of(lookalike, "mcp-directory")
    appid = lookalike.app("mcp-directory")["client_id"]
    for path, token in ((f"/v1.0/applications(appId='{appid}')/addPassword", bot),
                        ("/v1.0/applications(uniqueName='mcp-directory')/addPassword", bot),
                        (f"/v1.0/users/{UPN_ADELE}", tokens()), (f"/v1.0/directoryObjects/{ADELE}", tokens())):
        method = "POST" if "addPassword" in path else "GET"
        r, mark = send(uncredentialled, method, path, token)
        assert r.status_code == 503, (path, r.text[:300])
        assert nhi(r)["check"] == "object_unresolved"
        assert "no Graph credential" in r.json()["error"]["message"]
        assert not reached_graph(lookalike, mark)
    assert secrets_of(lookalike, "mcp-directory") == before
    # Spellings by id need no lookup: the rule decides them as ever.
    oid = lookalike.app("mcp-directory")["application_object_id"]
    r, mark = send(uncredentialled, "POST", f"/v1.0/applications(Id='{oid}')/microsoft.graph.addPassword", bot)
    assert r.status_code == 403 and nhi(r)["rule"] == "mcp-keeps-its-secrets"
    assert not reached_graph(lookalike, mark)


def test_lint_warns_when_the_deployment_cannot_resolve_literal_objects(policy):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("NHI_GRAPH_")}
    out = subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", "policy", "lint", str(policy)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "rule 'mcp-keeps-its-secrets' names an object by id" in out.stdout
    assert "rule 'adele-is-private' names an object by id" in out.stdout


def test_a_batch_cannot_hide_an_alternate_key(gateway, lookalike, bot):
    """Inside a $batch, the inner requests' keys are resolved too; one naming the protected
    application by appId refuses the whole batch, and nothing of it reaches Graph."""
    before = secrets_of(lookalike, "mcp-directory")
    appid = lookalike.app("mcp-directory")["client_id"]
    own = lookalike.app("rotation-bot")["client_id"]
    mark = uuid.uuid4().hex[:12]
    body = {"requests": [
        {"id": "1", "method": "POST", "url": f"/applications(appId='{own}')/addPassword",
         "body": {"passwordCredential": {"displayName": "fine"}}, "headers": {"Content-Type": "application/json"}},
        {"id": "2", "method": "POST", "url": f"/applications(appId='{appid}')/microsoft.graph.addPassword",
         "body": {"passwordCredential": {"displayName": "hidden"}}, "headers": {"Content-Type": "application/json"}},
    ]}
    r = requests.post(f"{GRAPH}/v1.0/$batch?m={mark}", json=body, headers={"Authorization": f"Bearer {bot}"},
                      proxies={"https": gateway.proxy()}, verify=gateway.ca_cert, timeout=30)
    assert r.status_code == 403, r.text[:300]
    assert nhi(r)["rule"] == "mcp-keeps-its-secrets"
    assert not reached_graph(lookalike, mark)
    assert not any(line.get("batch") and "hidden" in json.dumps(line) for line in lookalike.received())
    assert secrets_of(lookalike, "mcp-directory") == before
