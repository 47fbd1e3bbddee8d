"""The membership addon: it gives the verified principal its groups when a group rule could decide
the request, refuses (503) such requests when the groups cannot be learned, and leaves every
other request alone, even while Graph is down."""

from __future__ import annotations

import inspect
import json

import pytest
from mitmproxy.test import taddons, tflow, tutils

from nhi_gateway.addons.authorization import Authorization
from nhi_gateway.policy.decision import decision_of
from nhi_gateway.addons.identity import PRINCIPAL_KEY
from nhi_gateway.addons.membership import Membership
from nhi_gateway.identity.groups import GroupResolver
from nhi_gateway.policy.loader import PolicyStore, parse_policy
from nhi_gateway.identity.principal import Principal

from ..support.groups import GROUP_RULES_HEAD, CALLER_APP, GROUP_A, GROUP_B, SECRET, SP, TENANT, FakeGraph, app_principal, credential

USER = "0b1c2d3e-0000-4000-8000-0000000000f1"

POLICY = GROUP_RULES_HEAD + f"""\
  - id: finance-reads-applications
    action: allow
    when: {{groups: [{GROUP_B}]}}
    operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/applications/**"]}}]
  - id: users-by-app
    action: allow
    when: {{app_ids: [{CALLER_APP}]}}
    operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/users/**"]}}]
"""


def graph_flow(path: str, principal: Principal | None, method: str = "GET"):
    f = tflow.tflow(req=tutils.treq(method=method.encode(), scheme=b"https", host="graph.microsoft.com", port=443,
                                    path=path.encode(), authority=b"graph.microsoft.com",
                                    headers=((b"host", b"graph.microsoft.com"),)))
    if principal is not None:
        f.metadata[PRINCIPAL_KEY] = principal
    return f


def chain(graph: FakeGraph | None):
    policies = PolicyStore(parse_policy(POLICY))
    resolver = None
    if graph is not None:
        resolver = GroupResolver(credential(), graph)
    return Membership(policies, resolver), Authorization(policies)


async def run(addons, f) -> None:
    with taddons.context(*addons):
        for addon in addons:
            result = addon.request(f)
            if inspect.isawaitable(result):
                await result


def refusal(f) -> dict:
    assert f.response is not None
    return json.loads(f.response.content)["error"]


async def test_a_service_principal_in_the_group_is_allowed_by_the_group_rule():
    graph = FakeGraph({SP: [GROUP_A]})
    f = graph_flow("/v1.0/groups", app_principal())
    await run(chain(graph), f)
    assert f.response is None
    assert decision_of(f).rule_id == "readers-read-groups"
    assert f.metadata[PRINCIPAL_KEY].groups == (GROUP_A,)
    assert decision_of(f).principal["groups"] == [GROUP_A]  # the audit line names the groups


async def test_not_in_the_group_means_no_rule_allows():
    graph = FakeGraph({SP: [GROUP_A]})
    f = graph_flow("/v1.0/applications", app_principal())
    await run(chain(graph), f)
    assert f.response.status_code == 403
    assert decision_of(f).rule_id is None


@pytest.mark.parametrize("path", ["/v1.0/groups", "/v1.0/applications/x", "/v1.0/$batch"])
async def test_graph_down_refuses_requests_a_group_rule_could_decide(path):
    graph = FakeGraph()
    graph.raise_on = "graph"
    f = graph_flow(path, app_principal(), method="POST" if "$batch" in path else "GET")
    await run(chain(graph), f)
    assert f.response.status_code == 503
    error = refusal(f)
    assert error["innerError"]["nhi-gateway"]["check"] == "groups_unavailable"
    assert "group membership" in error["message"] and "cannot reach graph.microsoft.com" in error["message"]
    assert SECRET not in f.response.text


async def test_graph_down_does_not_block_requests_no_group_rule_could_decide():
    graph = FakeGraph()
    graph.raise_on = "graph"
    f = graph_flow("/v1.0/users", app_principal())
    await run(chain(graph), f)
    assert f.response is None and decision_of(f).rule_id == "users-by-app"
    assert graph.calls == []


async def test_without_a_graph_credential_group_decisions_fail_closed():
    f = graph_flow("/v1.0/groups", app_principal())
    await run(chain(None), f)
    assert f.response.status_code == 503
    assert "no Graph credential" in refusal(f)["message"]

    other = graph_flow("/v1.0/users", app_principal())
    await run(chain(None), other)
    assert other.response is None


async def test_a_delegated_token_keeps_its_groups_claim():
    graph = FakeGraph()
    graph.raise_on = "graph"  # would fail if asked
    user = Principal(tenant_id=TENANT, object_id=USER, app_id=CALLER_APP, scopes=("User.Read",), app_only=False,
                     groups=(GROUP_A,))
    f = graph_flow("/v1.0/groups", user)
    await run(chain(graph), f)
    assert f.response is None and decision_of(f).rule_id == "readers-read-groups"
    assert graph.calls == []


async def test_an_anonymous_request_is_left_to_the_rules():
    graph = FakeGraph()
    f = graph_flow("/v1.0/groups", None)
    await run(chain(graph), f)
    assert f.response.status_code == 403 and graph.calls == []


async def test_an_exception_in_the_lookup_refuses_the_flow():
    membership, _ = chain(FakeGraph())
    membership.resolver.with_groups = None  # TypeError when called: a bug, not a lookup failure
    f = graph_flow("/v1.0/groups", app_principal())
    with taddons.context(membership):
        await membership.request(f)
    assert f.response.status_code == 500  # fail_closed: refused, never forwarded


async def test_with_two_tokens_groups_are_resolved_for_each_and_a_group_deny_sees_the_weak_one():
    """A group rule that could decide the request for only one of the presented tokens (here: a
    deny on client secrets in GROUP_B, and the secret is the proxy token's) still makes the gateway
    learn the groups, once, and every token is judged with them (issue 13, item 2)."""
    from dataclasses import replace

    from nhi_gateway.identity.principal import AuthMethod, TokenSource

    policy = POLICY.replace("rules:\n", f"""rules:
  - id: no-secrets-in-finance
    action: deny
    when: {{groups: [{GROUP_B}], auth_methods: [client_secret]}}
    operations: [{{host: graph.microsoft.com, methods: ["*"], paths: ["/**"]}}]
""")
    assert "no-secrets-in-finance" in policy
    graph = FakeGraph({SP: [GROUP_A, GROUP_B]})
    policies = PolicyStore(parse_policy(policy))
    resolver = GroupResolver(credential(), graph)
    proxy = app_principal(auth_method=AuthMethod.CLIENT_SECRET, token_sources=(TokenSource.PROXY,))
    bearer = app_principal(auth_method=AuthMethod.CERTIFICATE, token_sources=(TokenSource.BEARER,))
    both = replace(bearer, token_sources=(TokenSource.BEARER, TokenSource.PROXY), presented=(proxy, bearer))
    f = graph_flow("/v1.0/users/x", both)
    await run((Membership(policies, resolver), Authorization(policies)), f)
    assert f.response is not None and f.response.status_code == 403
    assert decision_of(f).rule_id == "no-secrets-in-finance"
    assert refusal(f)["message"].startswith("the proxy token (client_secret)")
    assert [p.groups for p in f.metadata[PRINCIPAL_KEY].every_token()] == [(GROUP_A, GROUP_B)] * 2
    assert sum("getMemberGroups" in u for u in graph.urls()) == 1
