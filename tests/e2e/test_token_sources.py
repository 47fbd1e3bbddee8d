"""Token sources through the real gateway (issue 13, items 1 and 2): each source has its own trust,
and every presented token is judged in full. The workload gets its two tokens the way a real one
does, from the (look-alike) token endpoint through the gateway: one for the gateway's own API
(the proxy credentials) and one for Graph (Authorization: Bearer), by certificate or by secret.
Every refusal is checked at the client and at Graph, which must never have seen the request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from nhi_gateway.lookalike.minting import mint_client_assertion
from nhi_gateway.lookalike.pki import SigningKey

from ..support.e2e import GRAPH, LOGIN, marker, proxy_basic, raw_connect, reached_graph
from ..support.policies import (
    ALL_GRAPH_AUDIENCES,
    GRAPH_HOST,
    LOGIN_UPSTREAM,
    TOKEN_ENDPOINT_RULE,
    V1_ISSUER,
    V2_ISSUER,
    SourceTrust,
    policy_head,
)
from .conftest import gateway_running, start_gateway

ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def usual_pair_policy(lookalike) -> str:
    """The Graph token in the bearer (v1 only), a token for the gateway's own API in the proxy
    credentials (v2)."""
    mcp, gateway_app = lookalike.app("mcp-directory")["client_id"], lookalike.app("nhi-gateway")["client_id"]
    head = policy_head(lookalike.tenant_id, audiences=ALL_GRAPH_AUDIENCES, issuers=(V1_ISSUER,),
                       proxy=SourceTrust(("api://nhi-gateway", gateway_app), (V2_ISSUER,)),
                       upstreams=[{"host": GRAPH_HOST, "token": "any"}, LOGIN_UPSTREAM], client_secret_grants="allow")
    return head + "rules:\n" + TOKEN_ENDPOINT_RULE + f"""\
  - id: directory-read-with-certificates
    action: allow
    when: {{app_ids: [{mcp}], auth_methods: [certificate]}}
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users", "/groups"]
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, lookalike):
    workdir = tmp_path_factory.mktemp("token-sources")
    policy = workdir / "policy.yaml"
    policy.write_text(usual_pair_policy(lookalike))
    with gateway_running(workdir / "gw", lookalike, policy=policy) as gw:
        yield gw


def get_token(gateway, lookalike, scope: str, how: str = "certificate") -> str:
    """client_credentials through the gateway, as the workload sends it."""
    a = lookalike.app("mcp-directory")
    data = {"grant_type": "client_credentials", "client_id": a["client_id"], "scope": scope}
    if how == "secret":
        data["client_secret"] = a["secret"]
    else:
        key = SigningKey.load(Path(a["key_path"]), Path(a["cert_path"]))
        data |= {"client_assertion_type": ASSERTION, "client_assertion": mint_client_assertion(
            key, client_id=a["client_id"], audience=f"{LOGIN}/{lookalike.tenant_id}/oauth2/v2.0/token")}
    r = requests.post(f"{LOGIN}/{lookalike.tenant_id}/oauth2/v2.0/token", data=data,
                      proxies={"https": gateway.proxy()}, verify=gateway.ca_cert, timeout=20)
    assert r.status_code == 200, r.text
    return r.json()["access_token"]


@pytest.fixture(scope="module")
def pair(gateway, lookalike) -> dict[str, str]:
    return {
        "gateway": get_token(gateway, lookalike, "api://nhi-gateway/.default"),
        "graph": get_token(gateway, lookalike, "https://graph.microsoft.com/.default"),
        "gateway-secret": get_token(gateway, lookalike, "api://nhi-gateway/.default", "secret"),
        "graph-secret": get_token(gateway, lookalike, "https://graph.microsoft.com/.default", "secret"),
    }


def call(gateway, proxy_token: str | None, bearer: str | None, mark: str) -> requests.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return requests.get(f"{GRAPH}/v1.0/users?m={mark}", headers=headers,
                        proxies={"https": gateway.proxy(proxy_token)}, verify=gateway.ca_cert, timeout=30)


def check_of(r: requests.Response) -> str:
    return r.json()["error"]["innerError"]["nhi-gateway"]["check"]


# --- item 1: each token source has its own trust ------------------------------------------------


def test_the_usual_pair_reaches_graph_with_the_graph_token_only(gateway, lookalike, pair):
    mark = marker()
    r = call(gateway, pair["gateway"], pair["graph"], mark)
    assert r.status_code == 200, r.text[:300]  # Graph itself verified the bearer it received: Graph's
    seen = [e for e in lookalike.received() if mark in e["path"]]
    assert len(seen) == 1 and seen[0]["authorization"] and "proxy-authorization" not in seen[0]["headers"]


def test_a_graph_token_in_the_proxy_credentials_is_refused_407(gateway, lookalike, pair):
    status, body, s = raw_connect(gateway, "graph.microsoft.com", proxy_basic(pair["graph"]))
    s.close()
    assert status == 407, body[:300]
    assert json.loads(body)["error"]["innerError"]["nhi-gateway"]["check"] in ("issuer", "audience")
    mark = marker()
    with pytest.raises(requests.exceptions.ProxyError):
        call(gateway, pair["graph"], pair["graph"], mark)
    assert not reached_graph(lookalike, mark)


def test_a_token_for_the_gateway_s_api_as_the_bearer_is_refused_401(gateway, lookalike, pair):
    mark = marker()
    r = call(gateway, None, pair["gateway"], mark)
    assert r.status_code == 401, r.text[:300]
    assert check_of(r) in ("issuer", "audience")
    assert not reached_graph(lookalike, mark)


def test_a_token_for_the_gateway_s_api_never_leaves_the_gateway(gateway, lookalike, pair):
    """Without graph_token: true the proxy token is not presented upstream: Graph sees no token
    (and refuses), never the gateway's."""
    mark = marker()
    r = call(gateway, pair["gateway"], None, mark)
    assert r.status_code == 401  # Graph's answer: no token
    seen = [e for e in lookalike.received() if mark in e["path"]]
    assert len(seen) == 1 and not seen[0]["authorization"]


def test_a_policy_in_the_old_form_does_not_start_and_says_how_to_write_it(tmp_path, lookalike):
    old = f"""\
version: 1
identity:
  tenants: [{lookalike.tenant_id}]
  client_secret_grants: allow
  audiences: [{", ".join(ALL_GRAPH_AUDIENCES)}]
  issuers: ['https://sts.windows.net/{{tenantid}}/']
upstreams: []
"""
    path = tmp_path / "old.yaml"
    path.write_text(old)
    with pytest.raises(RuntimeError) as e:
        start_gateway(tmp_path / "gw", lookalike, policy=path)
    assert "per token source" in str(e.value) and "bearer:" in str(e.value)


# --- item 2: every presented token is judged in full ----------------------------------------------


@pytest.mark.parametrize("proxy_kind,bearer_kind,weak", [
    ("gateway-secret", "graph", "proxy"),
    ("gateway", "graph-secret", "bearer"),
])
def test_a_weak_token_next_to_a_strong_one_is_refused(gateway, lookalike, pair, proxy_kind, bearer_kind, weak):
    mark = marker()
    r = call(gateway, pair[proxy_kind], pair[bearer_kind], mark)
    assert r.status_code == 403, r.text[:300]
    assert r.json()["error"]["message"].startswith(f"the {weak} token (client_secret)")
    assert not reached_graph(lookalike, mark)
    line = next(a for a in gateway.audit() if mark in a["url"])
    assert [(t["source"], t["auth_method"]) for t in line["principal"]["tokens"]] == [
        ("proxy", "certificate" if weak == "bearer" else "client_secret"),
        ("bearer", "certificate" if weak == "proxy" else "client_secret")]


def test_the_audit_line_names_both_tokens_principals_and_auth_methods(gateway, pair):
    mark = marker()
    assert call(gateway, pair["gateway"], pair["graph"], mark).status_code == 200
    line = next(a for a in gateway.audit() if mark in a["url"])
    assert line["decision"] == "allow"
    tokens = line["principal"]["tokens"]
    assert [(t["source"], t["auth_method"], t["token_version"]) for t in tokens] == [
        ("proxy", "certificate", "2.0"), ("bearer", "certificate", "1.0")]
    assert len({t["object_id"] for t in tokens}) == 1 and all(t["display_name"] == "mcp-directory" for t in tokens)
    assert pair["graph"] not in json.dumps(line) and pair["gateway"] not in json.dumps(line)
