"""Each token source has its own trust (issue 13, item 1): a token is judged against the audiences
and issuers of the place it was presented in, so a token minted for one source is refused in the
other, and only a proxy source that says it carries the Graph token has it presented upstream.

The chain is built as the gateway builds it and driven as mitmproxy drives it (see tests/support/chain.py)."""

from __future__ import annotations

import pytest
from mitmproxy.test import tflow

from nhi_gateway.addons.identity import CONNECT_KEY, PRINCIPAL_KEY

from ..support.chain import (
    READER_APP,
    READER_OID,
    READER_RULES,
    TENANT,
    USERS,
    connect,
    exchange,
    graph_json,
    graph_request,
    refusal,
    running_gateway,
)
from ..support.policies import ALL_GRAPH_AUDIENCES, GRAPH_HOST, V1_ISSUER, V2_ISSUER, SourceTrust, policy_head

# ``authority`` is tests/unit/conftest.py's.
pytestmark = pytest.mark.usefixtures("no_exception_escapes_an_addon")

GATEWAY_APP = "7d4c2f1e-9b3a-4e58-a6c1-2f0e8d9b5a47"  # the gateway's own API registration
# A token for the gateway's own API: what the proxy source takes in the usual pair.
GATEWAY_API = SourceTrust(("api://nhi-gateway", GATEWAY_APP), (V2_ISSUER,))


def head(proxy: SourceTrust | None) -> str:
    """The bearer source trusts Graph's tokens (v1 and v2); ``proxy`` is the proxy source's trust."""
    return policy_head(TENANT, issuers=(V1_ISSUER, V2_ISSUER), audiences=ALL_GRAPH_AUDIENCES, proxy=proxy,
                       upstreams=[{"host": GRAPH_HOST, "token": "any"}])


# The usual pair: a token for the gateway's own API in the proxy credentials, Graph's in the bearer.
USUAL_PAIR = head(GATEWAY_API) + READER_RULES
BEARER_ONLY = head(None) + READER_RULES
GRAPH_IN_PROXY = head(SourceTrust(ALL_GRAPH_AUDIENCES, (V1_ISSUER,), graph_token=True)) + READER_RULES


@pytest.fixture
def mint(authority):
    def mint(kind: str, **kw) -> str:
        shapes = {
            "graph": dict(audience="https://graph.microsoft.com", version="1.0"),
            "graph-v2": dict(audience="https://graph.microsoft.com", version="2.0"),
            "gateway": dict(audience=GATEWAY_APP, version="2.0"),
            "gateway-uri": dict(audience="api://nhi-gateway", version="2.0"),
        }
        args = dict(tenant_id=TENANT, app_id=READER_APP, object_id=READER_OID, display_name="mcp-directory",
                    roles=("User.Read.All",), **shapes[kind])
        args.update(kw)
        return authority.mint_app_token(**args)

    return mint


@pytest.fixture
async def usual(tmp_path, authority):
    with running_gateway(tmp_path, authority, policy=USUAL_PAIR) as gw:
        yield gw.chain


async def test_the_usual_pair_passes_and_only_the_graph_token_goes_upstream(usual, mint):
    client = tflow.tclient_conn()
    proxy_token, graph_token = mint("gateway"), mint("graph")
    c = await connect(usual, client, token=proxy_token)
    assert c.response is None and c.metadata.get(CONNECT_KEY) == "admitted"
    f = graph_request(client, bearer=graph_token)
    sent = await exchange(usual, f, graph_json(USERS))
    assert sent is not None and f.response.status_code == 200
    assert sent.headers["Authorization"] == f"Bearer {graph_token}"
    assert proxy_token not in str(sent.headers) and "Proxy-Authorization" not in sent.headers


@pytest.mark.parametrize("kind,check", [("graph", "issuer"), ("graph-v2", "audience")])
async def test_a_graph_token_in_the_proxy_credentials_is_refused_407(usual, mint, kind, check):
    c = await connect(usual, tflow.tclient_conn(), token=mint(kind))
    assert refusal(c, 407)["check"] == check


@pytest.mark.parametrize("kind", ["gateway", "gateway-uri"])
async def test_a_token_for_the_gateway_s_api_as_the_bearer_is_refused_401(usual, mint, kind):
    client = tflow.tclient_conn()
    await connect(usual, client)
    f = graph_request(client, bearer=mint(kind))
    assert await exchange(usual, f) is None
    assert refusal(f, 401)["check"] == "audience"


async def test_a_token_for_the_gateway_s_api_is_never_presented_upstream(usual, mint):
    client = tflow.tclient_conn()
    proxy_token = mint("gateway")
    await connect(usual, client, token=proxy_token)
    f = graph_request(client)
    sent = await exchange(usual, f, graph_json(USERS))
    assert sent is not None  # token: any, and the proxy token names an allowed caller
    assert "Authorization" not in sent.headers
    assert proxy_token not in str(sent.headers)


async def test_a_source_the_policy_does_not_name_accepts_no_token(tmp_path, authority, mint):
    with running_gateway(tmp_path, authority, policy=BEARER_ONLY) as gw:
        c = await connect(gw.chain, tflow.tclient_conn(), token=mint("graph"))
        err = refusal(c, 407)
        assert err["check"] == "source" and "identity.proxy" in err["message"]


async def test_a_proxy_source_that_says_it_carries_the_graph_token_presents_it(tmp_path, authority, mint):
    with running_gateway(tmp_path, authority, policy=GRAPH_IN_PROXY) as gw:
        client = tflow.tclient_conn()
        token = mint("graph")
        await connect(gw.chain, client, token=token)
        f = graph_request(client)
        sent = await exchange(gw.chain, f, graph_json(USERS))
        assert sent is not None and sent.headers["Authorization"] == f"Bearer {token}"
        assert f.metadata[PRINCIPAL_KEY].object_id == READER_OID
        # Still its own trust: a token for the gateway's API is not a Graph token.
        c = await connect(gw.chain, tflow.tclient_conn(), token=mint("gateway"))
        assert refusal(c, 407)["check"] == "issuer"


# --- every presented token is judged in full (issue 13, item 2) -----------------------------------

STRICT = head(GATEWAY_API) + f"""\
masking:
  profiles:
    pii: {{fields: [mail]}}
    other: {{fields: [displayName]}}
rules:
  - id: certificates-only
    action: allow
    when: {{app_ids: [{READER_APP}], auth_methods: [certificate], app_only: true}}
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users"]
    mask: pii
  - id: no-managed-identity-deletes
    action: deny
    when: {{managed_identities: ["/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/bad"]}}
    operations:
      - host: graph.microsoft.com
        methods: ["*"]
        paths: ["/**"]
  - id: groups-by-role
    action: allow
    when: {{roles: [Group.Read.All]}}
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/groups"]
    mask: other
  - id: groups-by-app
    action: allow
    when: {{app_ids: [{READER_APP}]}}
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/groups"]
    mask: pii
"""

MI_BAD = "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/bad"


@pytest.fixture
async def strict(tmp_path, authority):
    with running_gateway(tmp_path, authority, policy=STRICT) as gw:
        yield gw.chain


async def both(chain, proxy_token: str, bearer_token: str, path: str = "/v1.0/users"):
    client = tflow.tclient_conn()
    c = await connect(chain, client, token=proxy_token)
    assert c.response is None, c.response and c.response.content
    f = graph_request(client, bearer=bearer_token, path=path)
    sent = await exchange(chain, f, graph_json(USERS))
    return f, sent


@pytest.mark.parametrize("weak_proxy,weak_bearer", [
    ({"acr": "1"}, {}), ({}, {"acr": "1"}),  # a client secret next to a certificate
    ({"acr": "0"}, {}), ({}, {"acr": "0"}),  # a public client
    ({"extra_claims": {"scp": "User.Read", "idtyp": "user"}}, {}),  # delegated next to app-only
    ({}, {"extra_claims": {"scp": "User.Read", "idtyp": "user"}}),
], ids=["secret proxy", "secret bearer", "public proxy", "public bearer", "delegated proxy", "delegated bearer"])
async def test_a_weak_token_next_to_a_strong_one_is_refused(strict, mint, weak_proxy, weak_bearer):
    f, sent = await both(strict, mint("gateway", **weak_proxy), mint("graph", **weak_bearer))
    assert sent is None, "a weak token must not ride on a strong one"
    err = refusal(f, 403)
    weak = "proxy" if weak_proxy else "bearer"
    assert err["message"].startswith(f"the {weak} token"), err["message"]


async def test_two_strong_tokens_pass_and_the_decision_names_both(strict, mint):
    f, sent = await both(strict, mint("gateway"), mint("graph"))
    assert sent is not None and f.response.status_code == 200
    from nhi_gateway.policy.decision import decision_of

    who = decision_of(f).principal
    assert [(t["source"], t["auth_method"]) for t in who["tokens"]] == [("proxy", "certificate"),
                                                                        ("bearer", "certificate")]
    assert {t["object_id"] for t in who["tokens"]} == {READER_OID}


async def test_a_deny_rule_that_matches_either_token_refuses(strict, mint):
    f, sent = await both(strict, mint("gateway", extra_claims={"xms_mirid": MI_BAD}), mint("graph"))
    assert sent is None
    assert refusal(f, 403)["rule"] == "no-managed-identity-deletes"


async def test_a_role_only_one_token_holds_does_not_count_for_both(strict, mint):
    """groups-by-role allows the bearer (Graph roles), not the proxy token (the gateway's API has
    none); groups-by-app allows both. Both tokens must be allowed: by groups-by-app, the one rule
    that covers both, so its mask applies; two rules that mask differently would be refused."""
    f, sent = await both(strict, mint("gateway", roles=()), mint("graph", roles=("Group.Read.All",)), "/v1.0/groups")
    assert sent is None
    err = refusal(f, 403)
    assert err["check"] == "tokens" and "mask" in err["message"]


async def test_one_token_keeps_its_single_decision(strict, mint):
    client = tflow.tclient_conn()
    await connect(strict, client)
    f = graph_request(client, bearer=mint("graph", acr="1"))
    assert await exchange(strict, f) is None
    assert refusal(f, 403)["message"].startswith("no rule allows")
