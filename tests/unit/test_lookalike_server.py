"""The look-alike Entra ID and Graph, run as the tests and the demo run them: a separate process on
port 0, reached over real HTTPS at the real names (SNI and Host), trusting only the test CA."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest

from nhi_gateway.lookalike.minting import EntraAuthority, mint_client_assertion, undo_graph_nonce
from nhi_gateway.lookalike.pki import SigningKey

GRAPH = "https://graph.microsoft.com"
LOGIN = "https://login.microsoftonline.com"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class LoopbackTransport(httpx.HTTPTransport):
    """Connect to the look-alike's port while keeping the real name in SNI and Host, which is
    what the gateway does when it maps graph.microsoft.com to loopback."""

    def __init__(self, port: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.port = port

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        name = request.url.host
        request.url = request.url.copy_with(host="127.0.0.1", port=self.port)
        request.extensions = {**request.extensions, "sni_hostname": name}
        return super().handle_request(request)


@pytest.fixture(scope="module")
def lookalike(tmp_path_factory):
    state = tmp_path_factory.mktemp("lookalike")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nhi_gateway.lookalike", "--state-dir", str(state), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    info_path = state / "lookalike.json"
    deadline = time.monotonic() + 30
    while not info_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"look-alike did not start: {proc.stdout.read().decode(errors='replace')}")
        time.sleep(0.05)
    info = json.loads(info_path.read_text())
    yield info
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def client(lookalike):
    tls = ssl.create_default_context(cafile=lookalike["ca_cert"])
    with httpx.Client(transport=LoopbackTransport(lookalike["port"], verify=tls), timeout=10) as c:
        yield c


def received(lookalike) -> list[dict]:
    return [json.loads(line) for line in Path(lookalike["received_log"]).read_text().splitlines()]


def get_token(client, lookalike, app="mcp-directory", **form) -> httpx.Response:
    data = {"grant_type": "client_credentials", "client_id": lookalike["apps"][app]["client_id"],
            "scope": "https://graph.microsoft.com/.default", **form}
    return client.post(lookalike["token_endpoint"], data=data)


def assertion_for(lookalike, app="mcp-directory", audience=None, key: SigningKey | None = None) -> str:
    a = lookalike["apps"][app]
    key = key or SigningKey.load(Path(a["key_path"]), Path(a["cert_path"]))
    return mint_client_assertion(key, client_id=a["client_id"], audience=audience or lookalike["token_endpoint"])


@pytest.fixture(scope="module")
def tokens(client, lookalike) -> dict[str, str]:
    """One Graph token per registered app, got by certificate, as a well-behaved workload would."""
    out = {}
    for app in lookalike["apps"]:
        r = get_token(client, lookalike, app, client_assertion_type=ASSERTION_TYPE,
                      client_assertion=assertion_for(lookalike, app))
        out[app] = r.json()["access_token"]
    return out


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- the state-dir contract -------------------------------------------------------------------


def test_state_file_names_everything_a_client_needs(lookalike):
    assert lookalike["port"] > 0
    assert Path(lookalike["ca_cert"]).read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert lookalike["authority_url"] == f"{LOGIN}/{lookalike['tenant_id']}"
    assert lookalike["graph_url"] == GRAPH
    mcp = lookalike["apps"]["mcp-directory"]
    assert mcp["roles"] == ["User.Read.All", "Group.Read.All"]
    assert lookalike["apps"]["rotation-bot"]["roles"] == ["Application.ReadWrite.OwnedBy"]
    assert len(mcp["secret"]) == 40 and Path(mcp["cert_path"]).exists() and Path(mcp["key_path"]).exists()


# --- login.microsoftonline.com -----------------------------------------------------------------


def test_discovery_and_keys_at_the_real_names(client, lookalike):
    tid = lookalike["tenant_id"]
    doc = client.get(f"{LOGIN}/{tid}/v2.0/.well-known/openid-configuration").json()
    assert doc["issuer"] == f"{LOGIN}/{tid}/v2.0"
    keys = client.get(doc["jwks_uri"]).json()["keys"]
    assert keys and all(k["issuer"] == f"{LOGIN}/{{tenantid}}/v2.0" and "alg" not in k for k in keys)

    v1 = client.get(f"{LOGIN}/{tid}/.well-known/openid-configuration").json()
    assert v1["issuer"] == f"https://sts.windows.net/{tid}/"
    assert all("issuer" not in k for k in client.get(v1["jwks_uri"]).json()["keys"])
    assert client.get(f"{LOGIN}/common/v2.0/.well-known/openid-configuration").json()["issuer"].endswith(
        "/{tenantid}/v2.0")


def test_unknown_tenant_is_aadsts90002(client):
    r = client.get(f"{LOGIN}/00000000-1111-2222-3333-444444444444/v2.0/.well-known/openid-configuration")
    assert r.status_code == 400 and r.json()["error_codes"] == [90002]


def test_token_with_client_secret(client, lookalike):
    r = get_token(client, lookalike, client_secret=lookalike["apps"]["mcp-directory"]["secret"])
    assert r.status_code == 200
    body = r.json()
    assert (body["token_type"], body["expires_in"], body["ext_expires_in"]) == ("Bearer", 3599, 3599)
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    mcp = lookalike["apps"]["mcp-directory"]
    assert claims["appidacr"] == "1" and claims["ver"] == "1.0"
    assert (claims["appid"], claims["oid"], claims["roles"]) == (mcp["client_id"], mcp["object_id"], mcp["roles"])
    assert claims["iss"] == f"https://sts.windows.net/{lookalike['tenant_id']}/"


def test_issued_token_verifies_against_published_keys_only_after_nonce_transform(client, lookalike, tokens):
    token = tokens["mcp-directory"]
    kid = jwt.get_unverified_header(token)["kid"]
    keys = jwt.PyJWKSet.from_dict(client.get(f"{LOGIN}/common/discovery/keys").json())
    key = keys[kid].key
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, key, algorithms=["RS256"], audience=GRAPH)
    assert jwt.decode(undo_graph_nonce(token), key, algorithms=["RS256"], audience=GRAPH)["appidacr"] == "2"


def test_token_with_http_basic_client_secret(client, lookalike):
    mcp = lookalike["apps"]["mcp-directory"]
    r = client.post(lookalike["token_endpoint"], auth=(mcp["client_id"], mcp["secret"]),
                    data={"grant_type": "client_credentials", "scope": "https://graph.microsoft.com/.default"})
    assert r.status_code == 200


def test_wrong_secret_is_aadsts7000215(client, lookalike):
    r = get_token(client, lookalike, client_secret="not-the-secret")
    assert r.status_code == 401
    body = r.json()
    assert body["error"] == "invalid_client" and body["error_codes"] == [7000215]
    assert body["error_description"].startswith("AADSTS7000215: Invalid client secret provided.")
    assert {"timestamp", "trace_id", "correlation_id", "error_uri"} <= set(body)


@pytest.mark.parametrize(
    ("make_form", "status", "code"),
    [
        (lambda la: {"client_assertion_type": ASSERTION_TYPE,
                     "client_assertion": assertion_for(la, key=SigningKey.generate())}, 401, 700027),
        (lambda la: {"client_assertion_type": ASSERTION_TYPE,
                     "client_assertion": assertion_for(la, audience="https://login.microsoftonline.com/x")}, 401, 50027),
        (lambda la: {"client_assertion_type": ASSERTION_TYPE,
                     "client_assertion": assertion_for(la, app="rotation-bot")}, 401, 700027),
        (lambda la: {}, 401, 7000218),
        (lambda la: {"client_secret": "x", "scope": "https://graph.microsoft.com/User.Read.All"}, 400, 1002012),
        (lambda la: {"client_secret": "x", "scope": "api://elsewhere/.default"}, 400, 500011),
        (lambda la: {"client_secret": "x", "client_id": "11111111-2222-3333-4444-555555555555"}, 400, 700016),
        (lambda la: {"client_secret": "x", "grant_type": "password"}, 400, 70003),
    ],
    ids=["unknown-cert", "wrong-aud", "other-apps-cert", "no-credential", "not-default-scope", "not-graph",
         "unknown-client", "wrong-grant"],
)
def test_token_endpoint_refusals(client, lookalike, make_form, status, code):
    r = get_token(client, lookalike, **make_form(lookalike))
    assert r.status_code == status, r.text
    assert r.json()["error_codes"] == [code]
    assert "access_token" not in r.json()


# --- graph.microsoft.com -------------------------------------------------------------------------


def test_graph_refuses_a_request_without_token(client, lookalike):
    r = client.get(f"{GRAPH}/v1.0/users", headers={"client-request-id": "no-token-probe"})
    assert r.status_code == 401
    error = r.json()["error"]
    assert error["code"] == "InvalidAuthenticationToken"
    assert error["innerError"]["client-request-id"] == "no-token-probe"
    assert "Bearer" in r.headers["www-authenticate"]
    entry = next(e for e in received(lookalike) if e["path"] == "/v1.0/users" and "client-request-id" in e["headers"])
    assert entry["host"] == "graph.microsoft.com" and entry["method"] == "GET" and entry["authorization"] is False


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t, la: undo_graph_nonce(t),  # the signed form is not what Graph accepts on the wire
        lambda t, la: EntraAuthority([SigningKey.generate()]).mint_app_token(
            tenant_id=la["tenant_id"], app_id="x", object_id="y"),  # unknown key
        lambda t, la: t[:-4] + ("AAAA" if not t.endswith("AAAA") else "BBBB"),
    ],
    ids=["nonce-already-hashed", "unpublished-key", "bad-signature"],
)
def test_graph_refuses_tokens_that_do_not_verify(client, lookalike, tokens, tamper):
    r = client.get(f"{GRAPH}/v1.0/users", headers=bearer(tamper(tokens["mcp-directory"], lookalike)))
    assert r.status_code == 401 and r.json()["error"]["code"] == "InvalidAuthenticationToken"


def test_users_default_projection_select_top_and_next_link(client, tokens):
    h = bearer(tokens["mcp-directory"])
    users = client.get(f"{GRAPH}/v1.0/users", headers=h).json()
    assert users["@odata.context"] == f"{GRAPH}/v1.0/$metadata#users"
    assert "employeeId" not in users["value"][0] and users["value"][0]["mobilePhone"]  # v1.0 default set
    beta = client.get(f"{GRAPH}/beta/users", headers=h).json()
    assert beta["value"][0]["identities"][0]["issuerAssignedId"]  # beta returns every property

    page = client.get(f"{GRAPH}/v1.0/users", headers=h, params={"$top": "2", "$select": "displayName,employeeId"}).json()
    assert page["@odata.context"].endswith("#users(displayName,employeeId)")
    assert [set(u) for u in page["value"]] == [{"displayName", "employeeId"}] * 2
    rest = client.get(page["@odata.nextLink"], headers=h).json()
    assert rest["value"] and rest["value"][0] not in page["value"]


def test_user_by_upn_and_by_id(client, tokens):
    h = bearer(tokens["mcp-directory"])
    adele = client.get(f"{GRAPH}/v1.0/users/adelev@nhilab.onmicrosoft.com", headers=h).json()
    assert adele["@odata.context"].endswith("#users/$entity")
    assert client.get(f"{GRAPH}/v1.0/users('{adele['id']}')", headers=h).json()["mail"] == adele["mail"]
    missing = client.get(f"{GRAPH}/v1.0/users/nobody@nhilab.onmicrosoft.com", headers=h)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "Request_ResourceNotFound"


def test_graph_gzips_when_asked(client, tokens):
    r = client.get(f"{GRAPH}/v1.0/users", headers={**bearer(tokens["mcp-directory"]), "Accept-Encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip"
    assert r.json()["value"]  # httpx decoded it: the body really is gzip


def test_graph_enforces_application_permissions(client, tokens):
    r = client.get(f"{GRAPH}/v1.0/users", headers=bearer(tokens["rotation-bot"]))
    assert r.status_code == 403 and r.json()["error"]["code"] == "Authorization_RequestDenied"


def test_key_credentials_only_with_select_on_a_single_application(client, lookalike, tokens):
    h = bearer(tokens["rotation-bot"])
    app_id = lookalike["apps"]["mcp-directory"]["application_object_id"]
    listed = client.get(f"{GRAPH}/v1.0/applications", headers=h).json()["value"]
    assert all(k["key"] is None for a in listed for k in a["keyCredentials"])
    one = client.get(f"{GRAPH}/v1.0/applications/{app_id}", headers=h, params={"$select": "keyCredentials"}).json()
    assert base64.b64decode(one["keyCredentials"][0]["key"])


def test_add_password_by_owner_and_the_new_secret_works(client, lookalike, tokens):
    app_id = lookalike["apps"]["mcp-directory"]["application_object_id"]
    url = f"{GRAPH}/v1.0/applications/{app_id}/addPassword"
    body = {"passwordCredential": {"displayName": "rotated"}}
    assert client.post(url, json=body, headers=bearer(tokens["mcp-directory"])).status_code == 403  # not an owner
    r = client.post(url, json=body, headers=bearer(tokens["rotation-bot"]))
    assert r.status_code == 200
    created = r.json()
    assert {"keyId", "displayName", "hint", "secretText", "startDateTime", "endDateTime"} <= set(created)
    assert created["hint"] == created["secretText"][:3]
    assert get_token(client, lookalike, client_secret=created["secretText"]).status_code == 200
    app = client.get(f"{GRAPH}/v1.0/applications/{app_id}", headers=bearer(tokens["rotation-bot"])).json()
    assert all(p["secretText"] is None for p in app["passwordCredentials"])  # shown once only


def test_get_member_groups_is_transitive(client, lookalike, tokens):
    sp = lookalike["apps"]["mcp-directory"]["object_id"]
    h = bearer(tokens["mcp-directory"])
    groups = client.get(f"{GRAPH}/v1.0/groups", headers=h).json()["value"]
    names = {g["id"]: g["displayName"] for g in groups}
    r = client.post(f"{GRAPH}/v1.0/servicePrincipals/{sp}/getMemberGroups", headers=h,
                    json={"securityEnabledOnly": True})
    assert sorted(names[g] for g in r.json()["value"]) == ["All Automation", "NHI Directory Readers"]


def test_batch_runs_each_inner_request(client, lookalike, tokens):
    requests = [
        {"id": "1", "method": "GET", "url": "/users?$top=1"},
        {"id": "2", "method": "GET", "url": "applications"},  # mcp-directory has no Application.* role
        {"id": "3", "method": "GET", "url": "/users/nobody@nhilab.onmicrosoft.com"},
    ]
    r = client.post(f"{GRAPH}/v1.0/$batch", json={"requests": requests}, headers=bearer(tokens["mcp-directory"]))
    assert r.status_code == 200
    by_id = {x["id"]: x for x in r.json()["responses"]}
    assert by_id["1"]["status"] == 200 and len(by_id["1"]["body"]["value"]) == 1
    assert by_id["2"]["status"] == 403 and by_id["2"]["body"]["error"]["code"] == "Authorization_RequestDenied"
    assert by_id["3"]["status"] == 404
    inner = [e for e in received(lookalike) if e.get("batch")]
    assert {e["path"] for e in inner} >= {"/v1.0/users?$top=1", "/v1.0/applications"}


def test_batch_over_twenty_is_refused(client, tokens):
    requests = [{"id": str(i), "method": "GET", "url": "/users"} for i in range(21)]
    r = client.post(f"{GRAPH}/v1.0/$batch", json={"requests": requests}, headers=bearer(tokens["mcp-directory"]))
    assert r.status_code == 400


def test_rotated_key_is_served_and_accepted_without_restart(client, lookalike):
    authority = EntraAuthority.open(Path(lookalike["signing_keys_dir"]))
    old = authority.signing_key
    new = authority.add_key()
    try:
        kids = [k["kid"] for k in client.get(f"{LOGIN}/common/discovery/v2.0/keys").json()["keys"]]
        assert kids == [old.kid, new.kid]
        mcp = lookalike["apps"]["mcp-directory"]
        token = authority.mint_app_token(tenant_id=lookalike["tenant_id"], app_id=mcp["client_id"],
                                         object_id=mcp["object_id"], roles=mcp["roles"])
        assert client.get(f"{GRAPH}/v1.0/users", headers=bearer(token)).status_code == 200
    finally:
        authority.retire_key(new.kid)
    assert client.get(f"{GRAPH}/v1.0/users", headers=bearer(token)).status_code == 401  # retired key


def test_received_log_holds_no_secret_values(client, lookalike, tokens):
    mcp = lookalike["apps"]["mcp-directory"]
    get_token(client, lookalike, client_secret=mcp["secret"])
    client.get(f"{GRAPH}/v1.0/users", headers=bearer(tokens["mcp-directory"]))
    text = Path(lookalike["received_log"]).read_text()
    entries = received(lookalike)
    assert any(e["path"].endswith("/oauth2/v2.0/token") and e["method"] == "POST" for e in entries)
    assert any(e["authorization"] for e in entries)
    for secret in (mcp["secret"], tokens["mcp-directory"], tokens["mcp-directory"].split(".")[2]):
        assert secret not in text


@pytest.mark.parametrize("scope", ["api://nhi-gateway/.default", "{gateway}/.default"])
def test_a_workload_gets_a_token_for_the_gateway_s_own_api(client, lookalike, scope):
    """The usual pair's other half: a v2 token whose aud is the gateway's client id (no nonce, no
    Graph audience), for the proxy credentials."""
    gateway = lookalike["apps"]["nhi-gateway"]["client_id"]
    r = get_token(client, lookalike, scope=scope.format(gateway=gateway), client_assertion_type=ASSERTION_TYPE,
                  client_assertion=assertion_for(lookalike))
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert "nonce" not in header
    assert claims["aud"] == gateway and claims["ver"] == "2.0"
    assert claims["iss"] == f"{LOGIN}/{lookalike['tenant_id']}/v2.0"
    assert claims["azp"] == lookalike["apps"]["mcp-directory"]["client_id"] and claims["azpacr"] == "2"
    assert claims["oid"] == lookalike["apps"]["mcp-directory"]["object_id"]
    # Graph refuses it: it is not a Graph token.
    assert client.get(f"{GRAPH}/v1.0/users", headers=bearer(token)).status_code == 401


def test_property_paths_and_their_raw_values(client, tokens):
    h = bearer(tokens["mcp-directory"])
    adele = "adelev@nhilab.onmicrosoft.com"
    r = client.get(f"{GRAPH}/v1.0/users/{adele}/mobilePhone", headers=h)
    assert r.status_code == 200 and r.json()["value"] == "+1 425 555 0109"
    assert r.json()["@odata.context"].endswith("/mobilePhone")
    assert client.get(f"{GRAPH}/v1.0/users/{adele}/businessPhones", headers=h).json()["value"] == ["+1 425 555 0101"]
    raw = client.get(f"{GRAPH}/v1.0/users/{adele}/mobilePhone/$value", headers=h)
    assert raw.status_code == 200 and raw.text == "+1 425 555 0109"
    assert raw.headers["content-type"].startswith("text/plain")


def test_users_filter_orderby_and_search_answer_as_an_oracle_would(client, tokens):
    h = bearer(tokens["mcp-directory"])

    def names(**params):
        r = client.get(f"{GRAPH}/v1.0/users", headers=h, params={"$select": "displayName", **params})
        assert r.status_code == 200, r.text
        return [u["displayName"] for u in r.json()["value"]]

    assert names(**{"$filter": "startswith(mail,'adel')"}) == ["Adele Vance"]
    assert names(**{"$filter": "mail eq 'AlexW@nhilab.onmicrosoft.com'"}) == ["Alex Wilber"]
    assert names(**{"$filter": "startswith(mobilePhone,'+1 4') and startswith(displayName,'M')"}) == ["Megan Bowen"]
    assert names(**{"$orderby": "mobilePhone desc"})[0] == "Lee Gu"  # +1 913 sorts last, first descending
    assert names(**{"$search": '"mail:megan"'}) == ["Megan Bowen"]


def test_answers_misbehave_on_request(client, tokens):
    h = {**bearer(tokens["mcp-directory"]), "X-LookAlike-Header": "X-Owner: someone@example.com"}
    r = client.get(f"{GRAPH}/v1.0/users", headers=[*h.items(), ("X-LookAlike-Content-Type", "text/plain"),
                                                 ("X-LookAlike-Content-Type", "application/json")])
    assert r.headers.get_list("content-type") == ["text/plain", "application/json"]
    assert r.headers["x-owner"] == "someone@example.com" and r.json()["value"]
    latin = client.get(f"{GRAPH}/v1.0/users", headers={**bearer(tokens["mcp-directory"]),
                                                       "X-LookAlike-Charset": "utf-16"})
    assert "charset=utf-16" in latin.headers["content-type"] and json.loads(latin.content.decode("utf-16"))["value"]


@pytest.mark.parametrize(("headers", "algorithm"), [
    (lambda k: {"x5t#S256": k.x5t_s256 + "=" * (-len(k.x5t_s256) % 4)}, "PS256"),  # MSAL async: padded
    (lambda k: {"x5t": k.x5t + "=" * (-len(k.x5t) % 4)}, "RS256"),  # MSAL sync: padded x5t
])
def test_msal_client_assertions_are_accepted_as_entra_accepts_them(client, lookalike, headers, algorithm):
    import uuid as _uuid

    a = lookalike["apps"]["mcp-directory"]
    key = SigningKey.load(Path(a["key_path"]), Path(a["cert_path"]))
    now = int(time.time())
    claims = {"aud": lookalike["token_endpoint"], "iss": a["client_id"], "sub": a["client_id"],
              "jti": str(_uuid.uuid4()), "nbf": now, "iat": now, "exp": now + 600}
    assertion = jwt.encode(claims, key.private_key, algorithm=algorithm, headers=headers(key))
    r = get_token(client, lookalike, client_assertion_type=ASSERTION_TYPE, client_assertion=assertion)
    assert r.status_code == 200, r.text


def test_instance_discovery_is_served(client, lookalike):
    r = client.get("https://login.microsoftonline.com/common/discovery/instance",
                   params={"api-version": "1.1", "authorization_endpoint":
                           f"https://login.microsoftonline.com/{lookalike['tenant_id']}/oauth2/v2.0/authorize"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenant_discovery_endpoint"].endswith("/v2.0/.well-known/openid-configuration")
    assert any("login.microsoftonline.com" in m["aliases"] for m in body["metadata"])


# --- the device code flow of the approval API (issue 17) -----------------------------------------


def test_the_device_code_flow_issues_an_approver_token_once_the_person_signed_in(client, lookalike):
    api, tenant = lookalike["approvals_api"], lookalike["tenant_id"]
    scope = f"{api['app_id_uri']}/{api['scope']}"
    claims = json.dumps({"access_token": {"acrs": {"essential": True, "value": api["auth_context"]}}})
    start = client.post(f"{LOGIN}/{tenant}/oauth2/v2.0/devicecode",
                        data={"client_id": api["client_id"], "scope": f"{scope} openid profile offline_access",
                              "claims": claims})
    assert start.status_code == 200, start.text
    flow = start.json()
    assert flow["verification_uri"] == "https://microsoft.com/devicelogin" and flow["user_code"] in flow["message"]
    grant = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "client_id": api["client_id"],
             "device_code": flow["device_code"]}
    pending = client.post(lookalike["token_endpoint"], data=grant)
    assert pending.status_code == 400 and pending.json()["error"] == "authorization_pending"

    signed = client.post(f"{LOGIN}/{tenant}/oauth2/deviceauth",
                         data={"otc": flow["user_code"], "user": f"AdeleV@{lookalike['tenant_domain']}", "mfa": "true"})
    assert signed.status_code == 200, signed.text
    answer = client.post(lookalike["token_endpoint"], data=grant)
    assert answer.status_code == 200, answer.text
    claims = jwt.decode(answer.json()["access_token"], options={"verify_signature": False})
    assert claims["aud"] == api["client_id"] and claims["scp"] == api["scope"] and claims["ver"] == "2.0"
    assert claims["acrs"] == [api["auth_context"]] and claims["idtyp"] == "user" and claims["azpacr"] == "0"
    assert claims["name"] == "Adele Vance" and claims["sub"] != claims["oid"]
    again = client.post(lookalike["token_endpoint"], data=grant)  # a device code is spent once
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


@pytest.mark.parametrize("form, error", [
    ({"client_id": "04b07795-8ddb-461a-bbee-02f9e1bf7b46"}, "unauthorized_client"),  # not the API's client
    ({"scope": "https://graph.microsoft.com/.default"}, "invalid_scope"),
    ({"claims": "{not json"}, "invalid_request"),
])
def test_the_device_code_flow_refuses_what_entra_refuses(client, lookalike, form, error):
    api = lookalike["approvals_api"]
    data = {"client_id": api["client_id"], "scope": f"{api['app_id_uri']}/{api['scope']} openid", **form}
    r = client.post(f"{LOGIN}/{lookalike['tenant_id']}/oauth2/v2.0/devicecode", data=data)
    assert r.status_code == 400 and r.json()["error"] == error, r.text
# --- every spelling Graph accepts for one object (issue 18, item 1) ----------------------------------

def test_an_application_is_found_by_every_key_graph_accepts(client, lookalike, tokens):
    """The look-alike answers the alternate-key forms as Graph does, so the gateway's end-to-end
    tests show a refused spelling would really have been performed."""
    h = bearer(tokens["nhi-gateway"])
    app = lookalike["apps"]["mcp-directory"]
    oid, appid = app["application_object_id"], app["client_id"]
    for path in (f"applications/{oid}", f"applications('{oid}')", f"applications(id='{oid}')",
                 f"applications(Id='{oid}')", f"applications(appId='{appid}')",
                 "applications(uniqueName='MCP-Directory')", f"applications/{oid}/microsoft.graph.application",
                 f"directoryObjects/{oid}/microsoft.graph.application"):
        r = client.get(f"{GRAPH}/v1.0/{path}", headers=h, params={"$select": "id"})
        assert r.status_code == 200 and r.json()["id"] == oid, (path, r.text)
    typed = client.get(f"{GRAPH}/v1.0/directoryObjects/{oid}", headers=h, params={"$select": "id"}).json()
    assert typed["@odata.type"] == "#microsoft.graph.application"
    assert client.get(f"{GRAPH}/v1.0/directoryObjects/{oid}/microsoft.graph.user", headers=h).status_code == 404
    assert client.get(f"{GRAPH}/v1.0/applications(displayName='x')", headers=h).status_code == 400


def test_add_password_is_performed_under_every_spelling(client, lookalike, tokens):
    app = lookalike["apps"]["mcp-directory"]
    oid, appid = app["application_object_id"], app["client_id"]
    body = {"passwordCredential": {"displayName": "spelling"}}
    for path in (f"applications(appId='{appid}')/addPassword", "applications(uniqueName='mcp-directory')/addPassword",
                 f"applications(Id='{oid}')/microsoft.graph.addPassword",
                 f"directoryObjects/{oid}/microsoft.graph.application/addPassword",
                 f"applications/{oid}/microsoft.graph.application/addPassword"):
        r = client.post(f"{GRAPH}/v1.0/{path}", json=body, headers=bearer(tokens["rotation-bot"]))
        assert r.status_code == 200 and r.json()["secretText"], (path, r.text)


def test_a_user_is_found_by_upn_key_and_as_a_directory_object(client, tokens):
    h = bearer(tokens["nhi-gateway"])
    adele = client.get(f"{GRAPH}/v1.0/users/AdeleV@nhilab.onmicrosoft.com", headers=h).json()
    for path in ("users(userPrincipalName='adelev@nhilab.onmicrosoft.com')", f"users(Id='{adele['id']}')",
                 f"directoryObjects/{adele['id']}/microsoft.graph.user"):
        r = client.get(f"{GRAPH}/v1.0/{path}", headers=h)
        assert r.status_code == 200 and r.json()["id"] == adele["id"], (path, r.text)
    r = client.get(f"{GRAPH}/v1.0/directoryObjects/{adele['id']}", headers=h)
    assert r.json()["@odata.type"] == "#microsoft.graph.user"
