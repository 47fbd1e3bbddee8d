"""Every spelling of a Graph object is the same object (issue 18, item 1): a rule that names an
object by its id decides the requests that name it by an alternate key (appId, uniqueName, a UPN)
or as a directoryObject, once the gateway has resolved which object that is; when it cannot, such
requests are refused, and requests no such rule could decide are never held up."""

from __future__ import annotations

import pytest

from nhi_gateway.identity.principal import Principal
from nhi_gateway.policy.decision import Action
from nhi_gateway.policy.loader import parse_policy
from nhi_gateway.policy.objects import (
    ObjectKey,
    ObjectLookupFailed,
    ObjectNotFound,
    ObjectResolver,
    decide,
    deciding_rules,
    literal_object_rules,
    object_key,
)
from nhi_gateway.policy.operation import Operation

from ..support import policies
from ..support.policies import V1_ISSUER, policy_head

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
BOT = "7d3e2c1b-0000-4000-8000-00000000b07a"
PROTECTED = "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f"  # an application object no one may add secrets to
PROTECTED_APP_ID = "5e0b1683-de22-5eac-9334-fb85a741f6ff"
OTHER = "0a0b0c0d-0000-4000-8000-0000000000aa"
ADELE = "0f573d36-fa84-5b0a-917c-50d218f4571b"
ALEX = "9d30a7d1-85d0-5d80-8734-f6a6cb79de21"

POLICY = parse_policy(policy_head(TENANT, issuers=(V1_ISSUER,)) + f"""\
rules:
  - id: protected-app-keeps-its-secrets
    action: deny
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/applications/{PROTECTED}/addPassword"]
  - id: adele-is-private
    action: deny
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users/{ADELE}/**"]
  - id: alex-by-upn
    action: allow
    operations:
      - host: graph.microsoft.com
        methods: [PATCH]
        paths: ["/users/alexw@nhilab.onmicrosoft.com"]
  - id: rotation
    action: allow
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/applications/{{id}}/addPassword"]
  - id: reads
    action: allow
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users/**", "/directoryObjects/**", "/servicePrincipals/**"]
""", "objects.yaml")

CALLER = Principal(tenant_id=TENANT, object_id=BOT, app_id=BOT)


def op(target: str, method: str = "GET") -> Operation:
    return policies.op(method, target)


def verdict(target: str, method: str = "GET", resolutions=None):
    d = decide(POLICY, CALLER, op(target, method), resolutions)
    return d.action, d.rule_id, d.status, d.check


@pytest.mark.parametrize(("target", "key", "resolved"), [
    (f"/v1.0/applications(appId='{PROTECTED_APP_ID}')/addPassword", ("applications", "appid", PROTECTED_APP_ID),
     ["applications", PROTECTED]),
    ("/v1.0/applications(uniqueName='Protected')/microsoft.graph.addPassword", ("applications", "uniquename", "protected"),
     ["applications", PROTECTED]),
    (f"/beta/directoryObjects/{PROTECTED}/addPassword", ("directoryobjects", "id", PROTECTED),
     ["applications", PROTECTED]),
])
def test_an_alternate_key_of_a_protected_object_is_denied_by_its_rule(target, key, resolved):
    o = op(target, "POST")
    assert object_key(o) == ObjectKey(*key)
    # Not resolved: refused (fail closed), naming the rule that could decide it.
    action, rule, status, check = verdict(target, "POST")
    assert (action, status, check) == (Action.DENY, 503, "object_unresolved")
    assert "protected-app-keeps-its-secrets" in decide(POLICY, CALLER, o).reason
    # Resolved to the protected object: its rule decides.
    assert verdict(target, "POST", {ObjectKey(*key).cache_key: resolved}) == (
        Action.DENY, "protected-app-keeps-its-secrets", 403, "")
    # Resolved to another object: the rule that fits that object decides.
    assert verdict(target, "POST", {ObjectKey(*key).cache_key: [resolved[0], OTHER]})[:2] == (Action.ALLOW, "rotation")


@pytest.mark.parametrize("target", [
    "/v1.0/users/AdeleV@nhilab.onmicrosoft.com", "/v1.0/users('adelev@nhilab.onmicrosoft.com')",
    "/v1.0/users(userPrincipalName='AdeleV@nhilab.onmicrosoft.com')/memberOf",
    f"/v1.0/directoryObjects/{ADELE}",
])
def test_a_user_named_by_upn_or_as_a_directory_object_is_that_user(target):
    key = object_key(op(target))
    assert verdict(target)[3] == "object_unresolved"
    assert verdict(target, resolutions={key.cache_key: ["users", ADELE]})[:2] == (Action.DENY, "adele-is-private")
    assert verdict(target, resolutions={key.cache_key: ["users", ALEX]})[:2] == (Action.ALLOW, "reads")


@pytest.mark.parametrize("target", [f"/v1.0/users/{ADELE}", f"/v1.0/users(Id='{ADELE}')",
                                    f"/v1.0/directoryObjects/{ADELE}/microsoft.graph.user"])
def test_spellings_by_id_need_no_resolution(target):
    assert object_key(op(target)) is None
    assert verdict(target)[:2] == (Action.DENY, "adele-is-private")


@pytest.mark.parametrize("target", [f"/v1.0/servicePrincipals(appId='{PROTECTED_APP_ID}')",
                                    "/v1.0/users/delta", "/v1.0/users/$count"])
def test_requests_no_literal_rule_could_decide_are_never_held_up(target):
    o = op(target)
    key = object_key(o)
    assert key is None or deciding_rules(POLICY, CALLER, o, key) == []
    assert verdict(target)[0] is Action.ALLOW


def test_lint_finds_the_rules_on_literal_objects():
    assert {r.id for r, _ in literal_object_rules(POLICY)} == {"protected-app-keeps-its-secrets", "adele-is-private", "alex-by-upn"}


class FakeGraph:
    graph_url = "https://graph.microsoft.com"

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.urls: list[str] = []
        self.dropped: list[str] = []

    async def access_token(self) -> str:
        return "token"

    def drop_token(self, token: str) -> None:
        self.dropped.append(token)

    async def get_json(self, url: str, token: str):
        self.urls.append(url)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_the_resolver_asks_graph_once_and_caches():
    graph = FakeGraph((200, {"id": PROTECTED.upper()}))
    resolver = ObjectResolver(graph)
    key = ObjectKey("applications", "appid", PROTECTED_APP_ID)
    assert await resolver.resolve(key) == ("applications", PROTECTED)
    assert await resolver.resolve(key) == ("applications", PROTECTED)
    assert graph.urls == [f"https://graph.microsoft.com/v1.0/applications(appId='{PROTECTED_APP_ID}')?$select=id"]


async def test_the_resolver_learns_the_type_of_a_directory_object():
    graph = FakeGraph((200, {"@odata.type": "#microsoft.graph.user", "id": ADELE}))
    assert await ObjectResolver(graph).resolve(ObjectKey("directoryobjects", "id", ADELE)) == ("users", ADELE)
    assert graph.urls == [f"https://graph.microsoft.com/v1.0/directoryObjects/{ADELE}?$select=id"]


async def test_a_revoked_token_is_renewed_once():
    graph = FakeGraph((401, None), (200, {"id": ADELE}))
    assert await ObjectResolver(graph).resolve(ObjectKey("users", "userprincipalname", "a@b.example")) == (
        "users", ADELE)
    assert graph.dropped == ["token"]


@pytest.mark.parametrize(("answer", "error"), [
    ((404, {"error": {"code": "Request_ResourceNotFound"}}), ObjectNotFound),
    ((500, None), ObjectLookupFailed),
    ((200, {"id": "not-a-guid"}), ObjectLookupFailed),
    (OSError("connection refused"), ObjectLookupFailed),
])
async def test_a_key_graph_cannot_resolve_fails_closed(answer, error):
    with pytest.raises(error):
        await ObjectResolver(FakeGraph(answer)).resolve(ObjectKey("applications", "appid", PROTECTED_APP_ID))


async def test_an_undocumented_key_is_never_guessed_at():
    with pytest.raises(ObjectNotFound):
        await ObjectResolver(FakeGraph()).resolve(ObjectKey("applications", "displayname", "x"))


def test_a_rule_naming_the_object_by_its_alternate_key_still_applies_once_resolved():
    target = "/v1.0/users/AlexW@nhilab.onmicrosoft.com"
    key = object_key(op(target, "PATCH"))
    assert verdict(target, "PATCH", {key.cache_key: ["users", ALEX]})[:2] == (Action.ALLOW, "alex-by-upn")
    # ... and a deny rule on the object's id wins over it.
    adele = {key.cache_key: ["users", ADELE]}
    assert verdict(target, "PATCH", adele)[:2] == (Action.ALLOW, "alex-by-upn")  # adele-is-private is GET only
    assert verdict("/v1.0/users/AlexW@nhilab.onmicrosoft.com", "GET", adele)[:2] == (Action.DENY, "adele-is-private")


def test_me_is_the_signed_in_user():
    """A delegated token's /me is that user: the rules on the user's id decide it, with no lookup."""
    adele = Principal(tenant_id=TENANT, object_id=ADELE, app_id=BOT, scopes=("User.Read",), app_only=False)
    alex = Principal(tenant_id=TENANT, object_id=ALEX, app_id=BOT, scopes=("User.Read",), app_only=False)
    me = op("/v1.0/me/memberOf")
    assert decide(POLICY, adele, me).rule_id == "adele-is-private"
    assert (decide(POLICY, alex, me).action, decide(POLICY, alex, me).rule_id) == (Action.ALLOW, "reads")
    assert decide(POLICY, CALLER, me).rule_id is None  # app-only: /me is nobody (Graph refuses it)


# --- the property: whatever names the object, the decision is the object's ----------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# The look-alike directory of this test: alternate keys -> (entity set, object id).
DIRECTORY = {
    ("applications", "appid", PROTECTED_APP_ID): ("applications", PROTECTED),
    ("applications", "uniquename", "protected"): ("applications", PROTECTED),
    ("applications", "appid", "1a2b3c4d-0000-4000-8000-0000000000a1"): ("applications", OTHER),
    ("directoryobjects", "id", PROTECTED): ("applications", PROTECTED),
    ("directoryobjects", "id", OTHER): ("applications", OTHER),
}
SPELLINGS = {
    PROTECTED: [f"applications/{PROTECTED}", f"applications('{PROTECTED}')", f"applications(id='{PROTECTED}')",
                f"applications(ID='{PROTECTED.upper()}')", f"applications(appId='{PROTECTED_APP_ID}')",
                f"applications(APPID='{PROTECTED_APP_ID.upper()}')", "applications(uniqueName='Protected')",
                f"directoryObjects/{PROTECTED}/microsoft.graph.application", f"directoryObjects/{PROTECTED}",
                f"applications/{PROTECTED}/microsoft.graph.application",
                f"directoryObjects/microsoft.graph.application/{PROTECTED}"],
    OTHER: [f"applications/{OTHER}", f"applications(Id='{OTHER}')",
            "applications(appId='1a2b3c4d-0000-4000-8000-0000000000a1')", f"directoryObjects/{OTHER}"],
}
ACTIONS = ["addPassword", "microsoft.graph.addPassword", "Microsoft.Graph.AddPassword"]


def resolve(o: Operation) -> dict:
    key = object_key(o)
    if key is None:
        return {}
    found = DIRECTORY.get((key.entity_set, key.name, key.value))
    return {key.cache_key: list(found)} if found else {}


@settings(max_examples=300)
@given(st.sampled_from(sorted(SPELLINGS)), st.data())
def test_every_spelling_of_one_object_gets_the_objects_decision(object_id, data):
    spelling = data.draw(st.sampled_from(SPELLINGS[object_id]))
    action = data.draw(st.sampled_from(ACTIONS))
    version = data.draw(st.sampled_from(["v1.0", "beta", "V1.0"]))
    o = op(f"/{version}/{spelling}/{action}", "POST")
    canonical = op(f"/{version}/applications/{object_id}/addPassword", "POST")
    got = decide(POLICY, CALLER, o, resolve(o))
    want = decide(POLICY, CALLER, canonical)
    assert (got.action, got.rule_id, got.status) == (want.action, want.rule_id, want.status), o
