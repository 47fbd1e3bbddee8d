"""Token requests: telling a static client secret from a certificate or a federated credential,
whatever the client sends, and what the policy's ``client_secret_grants`` does with each."""

from __future__ import annotations

import base64
import gzip
import json
import time
from urllib.parse import parse_qsl, quote, urlencode

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tflow

from nhi_gateway.addons.authorization import Authorization
from nhi_gateway.policy.decision import REFUSED_KEY, decision_of
from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.lookalike.minting import mint_client_assertion
from nhi_gateway.lookalike.pki import SigningKey
from nhi_gateway.policy.operation import Operation
from nhi_gateway.policy.loader import PolicyStore, parse_policy
from nhi_gateway.policy.model import ClientSecretGrants
from nhi_gateway.identity.token_requests import (
    CLIENT_ASSERTION_TYPE,
    MAX_FIELDS,
    MAX_FORM_BYTES,
    GrantKind,
    TokenGrant,
    classify_token_request,
    is_token_endpoint,
    judge_grant,
    refusal_body,
)

from ..support.policies import GRAPH_HOST, LOGIN_UPSTREAM, policy_head

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
CLIENT = "5e0b1683-de22-5eac-9334-fb85a741f6ff"
OTHER_CLIENT = "11111111-2222-4333-8444-555555555555"
SECRET = "abc8Q~s3cr3tValueThatMustNeverBeStoredAnywhere1"
TOKEN_URL = f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token"
TOKEN_PATH = f"/{TENANT}/oauth2/v2.0/token"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
GITHUB = "https://token.actions.githubusercontent.com"

KEY = SigningKey.generate("mcp-directory")
CERT_ASSERTION = mint_client_assertion(KEY, client_id=CLIENT, audience=TOKEN_URL)


def _assertion(claims: dict, headers: dict | None = None) -> str:
    now = int(time.time())
    return jwt.encode({"iat": now, "exp": now + 300, **claims}, KEY.private_key, algorithm="RS256",
                      headers=headers)


def _raw_jwt(header: dict, claims: dict) -> str:
    """A JWT PyJWT would refuse to build (claims of the wrong type), with a made-up signature."""
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part(header)}.{part(claims)}.c2ln"


FEDERATED_ASSERTION = _assertion(
    {"iss": GITHUB, "sub": "repo:contoso/agent:ref:refs/heads/main", "aud": "api://AzureADTokenExchange"},
    {"kid": "github-key-1"},
)
# A managed identity used as a federated credential of an app: Entra issues the assertion.
MI_ASSERTION = _assertion(
    {"iss": f"https://login.microsoftonline.com/{TENANT}/v2.0", "sub": "0b1c2d3e-0000-4000-8000-0000000000aa",
     "aud": "api://AzureADTokenExchange"},
    {"kid": "entra-key"},
)


def form(**fields) -> bytes:
    return urlencode(fields).encode()


def secret_form(**more) -> bytes:
    return form(grant_type="client_credentials", client_id=CLIENT, client_secret=SECRET,
                scope="https://graph.microsoft.com/.default", **more)


def assertion_form(assertion: str = CERT_ASSERTION, **more) -> bytes:
    fields = {"grant_type": "client_credentials", "client_id": CLIENT, "client_assertion_type": CLIENT_ASSERTION_TYPE,
              "client_assertion": assertion, "scope": "https://graph.microsoft.com/.default"}
    fields.update(more)
    return form(**{k: v for k, v in fields.items() if v is not None})


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{quote(user, safe='')}:{quote(password, safe='')}".encode()).decode()


def grant(headers, body, **kw) -> TokenGrant:
    return classify_token_request(headers, body, path=TOKEN_PATH, **kw)


# --- the classifier -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "kind", "client_id"),
    [
        # static secrets
        (FORM, secret_form(), GrantKind.CLIENT_SECRET, CLIENT),
        (FORM, secret_form().replace(b"client_secret=", b"CLIENT_SECRET="), GrantKind.CLIENT_SECRET, CLIENT),
        (FORM, secret_form().replace(b"client_secret=", b"client_secret+="), GrantKind.CLIENT_SECRET, CLIENT),
        (FORM, secret_form() + b"&client_secret=another", GrantKind.CLIENT_SECRET, CLIENT),  # duplicate
        (FORM, assertion_form() + b"&client_secret=" + SECRET.encode(), GrantKind.CLIENT_SECRET, CLIENT),
        (FORM, secret_form() + b"&client_id=" + OTHER_CLIENT.encode(), GrantKind.CLIENT_SECRET, ""),
        ({**FORM, "Authorization": basic(CLIENT, SECRET)},
         form(grant_type="client_credentials", scope="x/.default"), GrantKind.CLIENT_SECRET, CLIENT),
        ({**FORM, "authorization": basic(CLIENT, SECRET)}, assertion_form(), GrantKind.CLIENT_SECRET, CLIENT),
        ({"Authorization": "Basic !!not base64!!"}, b"", GrantKind.CLIENT_SECRET, ""),
        ({"Authorization": "basic " + base64.b64encode(b"no-colon").decode()}, b"", GrantKind.CLIENT_SECRET, ""),
        # Basic is recognised before the body is read: even an unreadable body cannot hide it
        ({"Authorization": basic(CLIENT, SECRET), "Content-Encoding": "gzip"}, b"\x1f\x8b",
         GrantKind.CLIENT_SECRET, CLIENT),
        # certificates
        (FORM, assertion_form(), GrantKind.CERTIFICATE, CLIENT),
        (FORM, assertion_form(client_id=None), GrantKind.CERTIFICATE, CLIENT),  # client_id from the assertion
        (FORM, assertion_form(client_id=CLIENT.upper()), GrantKind.CERTIFICATE, CLIENT.upper()),
        (FORM, assertion_form(client_secret=""), GrantKind.CERTIFICATE, CLIENT),  # a blank secret is none
        ({"content-type": "application/x-www-form-urlencoded; charset=utf-8"}, assertion_form(),
         GrantKind.CERTIFICATE, CLIENT),
        (FORM, assertion_form(_assertion({"iss": CLIENT, "sub": CLIENT}, {"x5t": KEY.x5t})),
         GrantKind.CERTIFICATE, CLIENT),
        (FORM, assertion_form(_assertion({"iss": CLIENT, "sub": CLIENT}, {"x5t#S256": KEY.x5t_s256})),
         GrantKind.CERTIFICATE, CLIENT),
        (FORM, assertion_form(mint_client_assertion(KEY, client_id=CLIENT, audience=TOKEN_URL, now=1)),
         GrantKind.CERTIFICATE, CLIENT),  # expired: Entra's business, not the classifier's
        # claims PyJWT trips over when validating (exp 1e400 is infinity): never validated here
        (FORM, assertion_form(_raw_jwt({"alg": "RS256", "x5t": KEY.x5t}, {"iss": CLIENT, "sub": CLIENT, "exp": 1e400,
                                                                          "nbf": [1], "aud": 5})),
         GrantKind.CERTIFICATE, CLIENT),
        # federated credentials
        (FORM, assertion_form(FEDERATED_ASSERTION), GrantKind.FEDERATED, CLIENT),
        (FORM, assertion_form(MI_ASSERTION), GrantKind.FEDERATED, CLIENT),
        (FORM, assertion_form(FEDERATED_ASSERTION, client_id=None), GrantKind.FEDERATED, ""),
    ],
)
def test_classify(headers, body, kind, client_id):
    g = grant(headers, body)
    assert (g.kind, g.client_id, g.tenant) == (kind, client_id, TENANT), g
    assert (g.problem == "") is (kind is not GrantKind.UNKNOWN)
    assert SECRET not in json.dumps(g.to_dict())
    assert "eyJ" not in json.dumps(g.to_dict())  # no assertion either


def test_a_federated_grant_names_its_issuer():
    assert grant(FORM, assertion_form(FEDERATED_ASSERTION)).issuer == GITHUB
    assert grant(FORM, assertion_form(FEDERATED_ASSERTION)).to_dict() == {
        "kind": "federated", "client_id": CLIENT, "tenant": TENANT, "issuer": GITHUB,
    }


HUGE = b"a=" + b"x" * (10 * 1024 * 1024)


@pytest.mark.parametrize(
    ("headers", "body", "problem"),
    [
        (FORM, b"", "no client credential"),
        (FORM, form(grant_type="client_credentials", client_id=CLIENT), "no client credential"),
        (FORM, form(grant_type="password", username="svc@contoso.com", password="x"), "no client credential"),
        (FORM, assertion_form(client_assertion_type="urn:ietf:params:oauth:client-assertion-type:saml2-bearer"),
         "client_assertion_type is not"),
        (FORM, assertion_form(client_assertion_type=None), "client_assertion_type is not"),
        (FORM, assertion_form(client_assertion=""), "no client credential"),
        # a parameter given twice: which one would Entra read?
        (FORM, assertion_form() + b"&client_assertion=" + FEDERATED_ASSERTION.encode(), "'client_assertion' is given more"),
        (FORM, assertion_form() + b"&CLIENT_ID=" + OTHER_CLIENT.encode(), "'client_id' is given more"),
        (FORM, assertion_form() + b"&client_assertion_type=" + CLIENT_ASSERTION_TYPE.encode(),
         "'client_assertion_type' is given more"),
        # assertions that are not what they claim
        (FORM, assertion_form("not-a-jwt"), "not a JWT"),
        (FORM, assertion_form("eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0"), "not a JWT"),
        (FORM, assertion_form("eyJ.eyJ.x.y.z"), "not a JWT"),  # JWE-shaped
        (FORM, assertion_form(CERT_ASSERTION[:40]), "not a JWT"),
        (FORM, assertion_form(_assertion({"iss": CLIENT}, {"x5t": KEY.x5t})), "no iss or sub"),
        (FORM, assertion_form(_raw_jwt({"alg": "RS256", "x5t": KEY.x5t}, {"iss": CLIENT, "sub": 7})), "no iss or sub"),
        (FORM, assertion_form(_raw_jwt({"alg": "RS256", "x5t": KEY.x5t}, {"iss": [CLIENT], "sub": CLIENT})),
         "no iss or sub"),
        (FORM, assertion_form(_raw_jwt({"alg": "RS256"}, ["not", "an", "object"])), "not a JWT"),
        (FORM, assertion_form(_assertion({"iss": CLIENT, "sub": CLIENT})), "names no certificate"),
        (FORM, assertion_form(_assertion({"iss": CLIENT, "sub": CLIENT}, {"x5t": ""})), "names no certificate"),
        (FORM, assertion_form(_assertion({"iss": CLIENT, "sub": CLIENT}, {"x5t": 5})), "names no certificate"),
        (FORM, assertion_form(_assertion({"iss": OTHER_CLIENT, "sub": OTHER_CLIENT}, {"x5t": KEY.x5t})),
         "names another client"),
        (FORM, assertion_form(_assertion({"iss": "github", "sub": "repo:x"})), "neither the client nor an https"),
        (FORM, assertion_form(client_id=CLIENT + " \x01"), "names another client"),
        # bodies the classifier will not guess at
        ({"Content-Type": "application/json"}, json.dumps({"client_assertion": CERT_ASSERTION}).encode(),
         "not application/x-www-form-urlencoded"),
        ({"Content-Type": "multipart/form-data; boundary=x"}, b"--x\r\n", "not application/x-www-form-urlencoded"),
        ({}, assertion_form(), "not application/x-www-form-urlencoded"),
        ({**FORM, "Content-Encoding": "gzip"}, gzip.compress(assertion_form()), "compressed"),
        ({**FORM, "Content-Encoding": "br"}, b"\x00", "compressed"),
        (FORM, HUGE, "larger than"),
        (FORM, b"x" * (MAX_FORM_BYTES + 1), "larger than"),
        (FORM, b"&".join(b"p%d=1" % i for i in range(MAX_FIELDS + 1)), f"more than {MAX_FIELDS} parameters"),
        (FORM, b"client_secret=\xff\xfe", "not valid UTF-8"),
        (FORM, b"client_secret=%ff%fe", "not valid UTF-8"),
        (FORM, "client_id=x", "not bytes"),
    ],
)
def test_what_cannot_be_read_is_unknown(headers, body, problem):
    g = grant(headers, body)
    assert g.kind is GrantKind.UNKNOWN, g
    assert problem in g.problem, g


def test_multiple_content_types_are_unknown():
    headers = http.Headers([(b"content-type", b"application/x-www-form-urlencoded"), (b"content-type", b"text/plain")])
    assert grant(headers, assertion_form()).kind is GrantKind.UNKNOWN


def test_mitmproxy_headers_are_read_like_a_dict():
    headers = http.Headers(content_type="application/x-www-form-urlencoded", authorization=basic(CLIENT, SECRET))
    assert grant(headers, b"").kind is GrantKind.CLIENT_SECRET
    headers = http.Headers(content_type="application/x-www-form-urlencoded")
    assert grant(headers, assertion_form()).kind is GrantKind.CERTIFICATE


@pytest.mark.parametrize(
    ("query", "kind"),
    [
        ([("client_secret", SECRET)], GrantKind.CLIENT_SECRET),  # a secret in the URL is still a secret
        ([("m", "marker")], GrantKind.CERTIFICATE),
        ([("client_assertion", CERT_ASSERTION)], GrantKind.UNKNOWN),  # given twice, body and URL
    ],
)
def test_query_parameters_count_like_body_parameters(query, kind):
    assert grant(FORM, assertion_form(), query=query).kind is kind


@pytest.mark.parametrize(
    ("path", "tenant"),
    [
        (TOKEN_PATH, TENANT),
        ("/contoso.onmicrosoft.com/oauth2/v2.0/token", "contoso.onmicrosoft.com"),
        ("/common/oauth2/token", "common"),
        ("/oauth2/token", ""),
        ("", ""),
    ],
)
def test_the_tenant_comes_from_the_path(path, tenant):
    assert classify_token_request(FORM, assertion_form(), path=path).tenant == tenant


def test_hostile_client_ids_do_not_reach_the_audit():
    for bad in ("a\nb", "x" * 300, "é", ""):
        assert grant(FORM, secret_form().replace(CLIENT.encode(), quote(bad).encode())).client_id == ""


def test_an_exception_inside_the_classifier_is_unknown(monkeypatch):
    import nhi_gateway.identity.token_requests as module

    monkeypatch.setattr(module, "parse_qsl", lambda *a, **k: 1 / 0)
    g = grant(FORM, assertion_form())
    assert (g.kind, g.tenant) == (GrantKind.UNKNOWN, TENANT)
    assert "ZeroDivisionError" in g.problem


_hostile_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(
    headers=st.dictionaries(
        st.sampled_from(["Content-Type", "content-type", "Authorization", "Content-Encoding", "X"]),
        _hostile_text,
        max_size=4,
    ),
    body=st.one_of(
        st.binary(max_size=300),
        st.lists(
            st.tuples(
                st.sampled_from(["client_id", "client_secret", "client_assertion", "client_assertion_type",
                                 "CLIENT_SECRET", "grant_type", "", "="]),
                st.one_of(_hostile_text, st.sampled_from([CERT_ASSERTION, FEDERATED_ASSERTION, CLIENT,
                                                          CLIENT_ASSERTION_TYPE, "eyJ.eyJ.", "e30.e30."])),
            ),
            max_size=6,
        ).map(lambda fields: urlencode(fields).encode()),
    ),
    path=_hostile_text,
)
def test_no_input_raises(headers, body, path):
    g = classify_token_request(headers, body, path=path)
    assert isinstance(g, TokenGrant) and g.kind in GrantKind
    json.dumps(g.to_dict())
    # A secret parameter is never missed: it is a client_secret grant, or the body was unreadable.
    if g.kind is not GrantKind.UNKNOWN:
        fields = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        if any(k.strip().casefold() == "client_secret" and v.strip() for k, v in fields):
            assert g.kind is GrantKind.CLIENT_SECRET


# --- which requests are token requests ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "host", "target", "expected"),
    [
        ("POST", "login.microsoftonline.com", TOKEN_PATH, True),
        ("POST", "login.microsoftonline.com", f"/{TENANT}/OAuth2/V2.0/Token/", True),
        ("POST", "login.microsoftonline.com", "/common/oauth2/token", True),  # v1 takes secrets too
        ("POST", "login.microsoftonline.com", f"{TOKEN_PATH}?m=1", True),
        ("POST", "LOGIN.microsoftonline.com.", TOKEN_PATH, True),
        ("POST", "login.microsoftonline.us", TOKEN_PATH, True),
        ("POST", "login.windows.net", TOKEN_PATH, True),
        ("GET", "login.microsoftonline.com", TOKEN_PATH, False),
        ("POST", "login.microsoftonline.com", f"/{TENANT}/oauth2/v2.0/devicecode", False),
        ("POST", "login.microsoftonline.com", f"/{TENANT}/oauth2/v2.0/token/x", False),
        ("POST", "graph.microsoft.com", "/v1.0/oauth2/token", False),
        ("POST", "evil.example", TOKEN_PATH, False),
    ],
)
def test_is_token_endpoint(method, host, target, expected):
    assert is_token_endpoint(Operation.from_request(method, "https", host, 443, target)) is expected


# --- what the policy does with each grant ---------------------------------------------------------

ALLOWED = Decision(action=Action.ALLOW, stage=Stage.POLICY, reason="allowed by rule 'token-endpoint'",
                   rule_id="token-endpoint", operation=f"POST login.microsoftonline.com {TOKEN_PATH}")
GRANTS = {
    GrantKind.CLIENT_SECRET: TokenGrant(GrantKind.CLIENT_SECRET, CLIENT, TENANT),
    GrantKind.CERTIFICATE: TokenGrant(GrantKind.CERTIFICATE, CLIENT, TENANT),
    GrantKind.FEDERATED: TokenGrant(GrantKind.FEDERATED, CLIENT, TENANT, issuer=GITHUB),
    GrantKind.UNKNOWN: TokenGrant(GrantKind.UNKNOWN, CLIENT, TENANT, problem="the body is compressed"),
}


@pytest.mark.parametrize(
    ("setting", "kind", "allowed", "flags"),
    [
        (ClientSecretGrants.ALLOW, GrantKind.CLIENT_SECRET, True, None),
        (ClientSecretGrants.ALLOW, GrantKind.UNKNOWN, True, None),
        (ClientSecretGrants.ALLOW, GrantKind.CERTIFICATE, True, None),
        (ClientSecretGrants.FLAG, GrantKind.CLIENT_SECRET, True, ["client_secret_grant"]),
        (ClientSecretGrants.FLAG, GrantKind.UNKNOWN, True, ["unclassified_grant"]),
        (ClientSecretGrants.FLAG, GrantKind.CERTIFICATE, True, None),
        (ClientSecretGrants.FLAG, GrantKind.FEDERATED, True, None),
        (ClientSecretGrants.REFUSE, GrantKind.CLIENT_SECRET, False, None),
        (ClientSecretGrants.REFUSE, GrantKind.UNKNOWN, False, None),  # fail closed
        (ClientSecretGrants.REFUSE, GrantKind.CERTIFICATE, True, None),
        (ClientSecretGrants.REFUSE, GrantKind.FEDERATED, True, None),
    ],
)
def test_judge_grant(setting, kind, allowed, flags):
    d = judge_grant(setting, ALLOWED, GRANTS[kind])
    assert d.allowed is allowed
    assert d.extra.get("flags") == flags
    assert d.extra["grant"] == GRANTS[kind].to_dict()
    assert d.operation == ALLOWED.operation
    if allowed:
        assert (d.rule_id, d.reason) == ("token-endpoint", ALLOWED.reason)
    else:
        assert (d.status, d.code, d.stage, d.rule_id) == (403, "unauthorized_client", Stage.POLICY, None)
        assert d.check == {GrantKind.CLIENT_SECRET: "client_secret_grant", GrantKind.UNKNOWN: "unclassified_grant"}[kind]
        assert "identity.client_secret_grants: refuse" in d.reason


def test_flags_add_to_flags_already_there():
    d = judge_grant(ClientSecretGrants.FLAG, ALLOWED.but(extra={"flags": ["other"]}), GRANTS[GrantKind.CLIENT_SECRET])
    assert d.extra["flags"] == ["other", "client_secret_grant"]


def test_the_refusal_says_what_to_do_in_oauth_terms():
    d = judge_grant(ClientSecretGrants.REFUSE, ALLOWED, GRANTS[GrantKind.CLIENT_SECRET])
    body = json.loads(refusal_body(d, "flow-1"))
    assert body["error"] == "unauthorized_client"
    description = body["error_description"]
    assert "static client secret grant is refused" in description
    assert "certificate" in description and "federated credential" in description
    assert body["nhi-gateway"] == {"request-id": "flow-1", "stage": "policy", "check": "client_secret_grant",
                                   "grant": "client_secret"}


# --- the addon: a token request through Authorization -----------------------------------------------

POLICY = policy_head(TENANT, upstreams=(GRAPH_HOST, LOGIN_UPSTREAM), client_secret_grants="SETTING") + """\
rules:
  - id: token-endpoint
    action: allow
    when: {anonymous: true}
    operations:
      - {host: login.microsoftonline.com, methods: [POST], paths: ["/{tenant}/oauth2/v2.0/token"]}
      - {host: login.microsoftonline.com, methods: [GET], paths: ["/{tenant}/v2.0/.well-known/openid-configuration"]}
"""


def authorize(setting: str, body: bytes, headers: dict | None = None, url: str = TOKEN_URL,
              method: str = "POST") -> http.HTTPFlow:
    addon = Authorization(PolicyStore(parse_policy(POLICY.replace("SETTING", setting), "p.yaml")))
    flow = tflow.tflow(req=http.Request.make(method, url, body, headers if headers is not None else FORM))
    addon.request(flow)
    return flow


def test_addon_refuses_a_secret_grant_before_it_goes_anywhere():
    flow = authorize("refuse", secret_form())
    assert flow.metadata[REFUSED_KEY] and flow.response.status_code == 403
    assert flow.response.headers["content-type"] == "application/json"
    body = json.loads(flow.response.content)
    assert body["error"] == "unauthorized_client"
    assert body["nhi-gateway"]["check"] == "client_secret_grant"
    d = decision_of(flow)
    assert (d.allowed, d.check, d.extra["grant"]["kind"]) == (False, "client_secret_grant", "client_secret")
    assert SECRET.encode() not in flow.response.content
    assert SECRET not in json.dumps(flow.metadata["nhi"])


def test_addon_flags_a_secret_grant_and_lets_it_through():
    flow = authorize("flag", secret_form())
    assert flow.response is None
    d = decision_of(flow)
    assert (d.allowed, d.rule_id, d.extra["flags"]) == (True, "token-endpoint", ["client_secret_grant"])
    assert d.extra["grant"] == {"kind": "client_secret", "client_id": CLIENT, "tenant": TENANT}


def test_addon_flags_basic_auth_too():
    flow = authorize("flag", form(grant_type="client_credentials", scope="x/.default"),
                     {**FORM, "Authorization": basic(CLIENT, SECRET)})
    assert decision_of(flow).extra["flags"] == ["client_secret_grant"]


@pytest.mark.parametrize("assertion", [CERT_ASSERTION, FEDERATED_ASSERTION])
def test_addon_lets_certificates_and_federated_credentials_through_under_refuse(assertion):
    flow = authorize("refuse", assertion_form(assertion))
    assert flow.response is None
    d = decision_of(flow)
    assert d.allowed and "flags" not in d.extra


def test_addon_never_inflates_a_compressed_body():
    flow = authorize("refuse", gzip.compress(assertion_form()), {**FORM, "Content-Encoding": "gzip"})
    assert flow.response.status_code == 403
    assert decision_of(flow).check == "unclassified_grant"
    assert "compressed" in json.loads(flow.response.content)["error_description"]


def test_addon_judges_the_rules_first():
    flow = authorize("refuse", secret_form(), url=TOKEN_URL.replace("/v2.0/token", "/token"))  # v1: no rule
    d = decision_of(flow)
    assert (d.status, d.code, d.check) == (403, "Authorization_RequestDenied", "")
    assert "grant" not in d.extra
    assert json.loads(flow.response.content)["error"]["code"] == "Authorization_RequestDenied"


def test_addon_leaves_other_login_requests_alone():
    url = f"https://login.microsoftonline.com/{TENANT}/v2.0/.well-known/openid-configuration"
    flow = authorize("refuse", b"", {}, url=url, method="GET")
    assert flow.response is None and "grant" not in decision_of(flow).extra
