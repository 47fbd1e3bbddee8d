"""The Entra token endpoint through the real gateway: static client secrets are flagged or refused
by ``identity.client_secret_grants``, certificates and federated credentials go through, and a rule
can require the identity to have authenticated with a certificate (``auth_methods``).

Clients are ``requests`` with HTTPS_PROXY and the gateway's CA, posting the form MSAL posts. Every
refusal is checked at the client and at the look-alike: a refused request never reaches Entra.
"""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
import requests

from nhi_gateway.lookalike.minting import mint_client_assertion
from nhi_gateway.lookalike.pki import SigningKey
from nhi_gateway.identity.token_requests import CLIENT_ASSERTION_TYPE

from ..support.e2e import GRAPH, LOGIN, audit_line, marker, reached, use_proxy
from ..support.e2e import recorded_flow as recorded
from .conftest import EXAMPLE_POLICY, gateway_running
SCOPE = "https://graph.microsoft.com/.default"
MCP_DIRECTORY_RULE = "      app_ids: [5e0b1683-de22-5eac-9334-fb85a741f6ff]   # mcp-directory\n"


@pytest.fixture(scope="module")
def strict(tmp_path_factory, lookalike):
    """The example policy, with secret grants refused and directory reads for certificates only."""
    text = EXAMPLE_POLICY.read_text()
    for old, new in (("  client_secret_grants: flag\n", "  client_secret_grants: refuse\n"),
                     (MCP_DIRECTORY_RULE, MCP_DIRECTORY_RULE + "      auth_methods: [certificate]\n")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    workdir = tmp_path_factory.mktemp("strict-gateway")
    policy = workdir / "policy.yaml"
    policy.write_text(text)
    with gateway_running(workdir, lookalike, policy=policy) as gw:
        yield gw


def token_url(lookalike, mark: str) -> str:
    # The marker rides in the query: Entra's token endpoint ignores it, the look-alike logs it.
    return f"{LOGIN}/{lookalike.tenant_id}/oauth2/v2.0/token?m={mark}"


def request_token(lookalike, mark: str, how: str, app: str = "mcp-directory") -> requests.Response:
    """client_credentials as an app sends it: secret in the body, secret as HTTP Basic, or a
    client assertion (certificate, or a federated token from an external issuer)."""
    a = lookalike.app(app)
    data = {"grant_type": "client_credentials", "scope": SCOPE}
    auth = None
    if how == "secret":
        data |= {"client_id": a["client_id"], "client_secret": a["secret"]}
    elif how == "basic":
        auth = (a["client_id"], a["secret"])
    elif how == "certificate":
        key = SigningKey.load(Path(a["key_path"]), Path(a["cert_path"]))
        audience = f"{LOGIN}/{lookalike.tenant_id}/oauth2/v2.0/token"
        data |= {"client_id": a["client_id"], "client_assertion_type": CLIENT_ASSERTION_TYPE,
                 "client_assertion": mint_client_assertion(key, client_id=a["client_id"], audience=audience)}
    elif how == "federated":
        now = int(time.time())
        external = jwt.encode(
            {"iss": "https://token.actions.githubusercontent.com", "sub": "repo:contoso/agent:ref:refs/heads/main",
             "aud": "api://AzureADTokenExchange", "iat": now, "exp": now + 300},
            SigningKey.generate("github").private_key, algorithm="RS256", headers={"kid": "github-1"})
        data |= {"client_id": a["client_id"], "client_assertion_type": CLIENT_ASSERTION_TYPE,
                 "client_assertion": external}
    return requests.post(token_url(lookalike, mark), data=data, auth=auth, timeout=20)


def token_through(gateway, lookalike, monkeypatch, how: str) -> tuple[str, requests.Response]:
    """:func:`request_token` from a client configured for ``gateway`` (HTTPS_PROXY), with a new
    marker: the marker and the answer."""
    use_proxy(monkeypatch, gateway)
    mark = marker()
    return mark, request_token(lookalike, mark, how)


def acr_of(access_token: str) -> str:
    return jwt.decode(access_token, options={"verify_signature": False})["appidacr"]


def everything_kept(gateway) -> bytes:
    return (b"".join(f.read_bytes() for f in gateway.recording_files())
            + (gateway.recordings / "audit.jsonl").read_bytes() + gateway.log.read_bytes())


# --- client_secret_grants: flag (the example policy) ----------------------------------------------


@pytest.mark.parametrize("how", ["secret", "basic"])
def test_a_secret_grant_is_flagged_and_forwarded(gateway, lookalike, monkeypatch, how):
    mark, r = token_through(gateway, lookalike, monkeypatch, how)
    assert r.status_code == 200, r.text
    assert acr_of(r.json()["access_token"]) == "1"
    assert reached(lookalike, mark)

    line = audit_line(gateway, mark)
    assert (line["decision"], line["rule"], line["status"]) == ("allow", "token-endpoint", 200)
    decision = recorded(gateway, mark).metadata["nhi"]
    assert decision["extra"]["flags"] == ["client_secret_grant"]
    assert decision["extra"]["grant"] == {"kind": "client_secret", "client_id": lookalike.app("mcp-directory")["client_id"],
                                          "tenant": lookalike.tenant_id}
    assert lookalike.app("mcp-directory")["secret"].encode() not in everything_kept(gateway)


def test_the_audit_line_of_a_secret_grant_shows_the_flag(gateway, lookalike, monkeypatch):
    mark, r = token_through(gateway, lookalike, monkeypatch, "secret")
    assert r.status_code == 200
    assert audit_line(gateway, mark)["flags"] == ["client_secret_grant"]


def test_a_certificate_grant_is_not_flagged(gateway, lookalike, monkeypatch):
    mark, r = token_through(gateway, lookalike, monkeypatch, "certificate")
    assert r.status_code == 200, r.text
    assert acr_of(r.json()["access_token"]) == "2"
    decision = recorded(gateway, mark).metadata["nhi"]
    assert "flags" not in decision["extra"]
    assert decision["extra"]["grant"]["kind"] == "certificate"
    assert audit_line(gateway, mark).get("flags") in (None, [])


# --- client_secret_grants: refuse ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["secret", "basic"])
def test_a_secret_grant_is_refused_and_never_reaches_entra(strict, lookalike, monkeypatch, how):
    mark, r = token_through(strict, lookalike, monkeypatch, how)
    assert r.status_code == 403, r.text
    assert r.headers["Content-Type"] == "application/json"
    body = r.json()
    assert body["error"] == "unauthorized_client"
    assert "static client secret grant is refused" in body["error_description"]
    assert "certificate" in body["error_description"] and "federated credential" in body["error_description"]
    assert body["nhi-gateway"]["check"] == "client_secret_grant"
    assert not reached(lookalike, mark)

    line = audit_line(strict, mark)
    assert (line["decision"], line["check"], line["status"]) == ("deny", "client_secret_grant", 403)
    assert lookalike.app("mcp-directory")["secret"].encode() not in everything_kept(strict)


def test_a_certificate_grant_goes_through(strict, lookalike, monkeypatch):
    mark, r = token_through(strict, lookalike, monkeypatch, "certificate")
    assert r.status_code == 200, r.text
    assert acr_of(r.json()["access_token"]) == "2"
    assert reached(lookalike, mark)
    assert audit_line(strict, mark)["decision"] == "allow"


def test_a_federated_grant_goes_through_to_entra(strict, lookalike, monkeypatch):
    """The look-alike has no federated credentials, so Entra's answer is its own refusal: what
    matters is that the gateway forwarded the request instead of refusing it."""
    mark, r = token_through(strict, lookalike, monkeypatch, "federated")
    assert reached(lookalike, mark)
    assert r.status_code == 401 and r.json()["error"] == "invalid_client", r.text
    assert recorded(strict, mark).metadata["nhi"]["extra"]["grant"]["issuer"] == (
        "https://token.actions.githubusercontent.com")


# --- a rule that requires a certificate (auth_methods) ------------------------------------------------


def test_a_rule_requiring_a_certificate_refuses_a_secret_obtained_token(gateway, strict, lookalike, monkeypatch):
    use_proxy(monkeypatch, gateway)  # only the lenient gateway hands out secret-obtained tokens
    secret_token = request_token(lookalike, marker(), "secret").json()["access_token"]
    assert acr_of(secret_token) == "1"

    use_proxy(monkeypatch, strict)
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users?m={mark}", headers={"Authorization": f"Bearer {secret_token}"}, timeout=20)
    assert r.status_code == 403, r.text
    assert "no rule allows" in r.json()["error"]["message"]
    assert not reached(lookalike, mark)
    line = audit_line(strict, mark)
    assert (line["decision"], line["principal"]["auth_method"]) == ("deny", "client_secret")


def test_a_rule_requiring_a_certificate_allows_a_certificate_obtained_token(strict, lookalike, monkeypatch):
    use_proxy(monkeypatch, strict)
    cert_token = request_token(lookalike, marker(), "certificate").json()["access_token"]
    assert acr_of(cert_token) == "2"

    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users?m={mark}", headers={"Authorization": f"Bearer {cert_token}"}, timeout=20)
    assert r.status_code == 200, r.text
    assert r.json()["value"]
    assert reached(lookalike, mark)
    line = audit_line(strict, mark)
    assert (line["decision"], line["rule"], line["principal"]["auth_method"]) == ("allow", "directory-read", "certificate")


# --- renewing through the gateway ----------------------------------------------------------------


def test_expired_proxy_credentials_still_reach_the_token_endpoint_to_renew_and_are_flagged(gateway, lookalike,
                                                                                          tokens, monkeypatch):
    """A long-running client whose HTTPS_PROXY holds a token that has expired must be able to ask
    for a new one: the token endpoint needs no token, so the expired one is left aside there (and
    said so in the audit line), never a 407 without a reason. Anywhere else it is still refused."""
    expired = tokens(now=int(time.time()) - 7200)
    for k, v in gateway.client_env(expired).items():
        if k.lower().endswith("proxy") or k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
            monkeypatch.setenv(k, v)
    mark = marker()
    key = SigningKey.load(Path(lookalike.app("mcp-directory")["key_path"]), Path(lookalike.app("mcp-directory")["cert_path"]))
    a = lookalike.app("mcp-directory")
    r = requests.post(token_url(lookalike, mark), timeout=20, data={
        "grant_type": "client_credentials", "scope": SCOPE, "client_id": a["client_id"],
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
        "client_assertion": mint_client_assertion(key, client_id=a["client_id"],
                                                  audience=f"{LOGIN}/{lookalike.tenant_id}/oauth2/v2.0/token")})
    assert r.status_code == 200, r.text
    assert reached(lookalike, mark)
    line = audit_line(gateway, mark)
    assert line["decision"] == "allow" and "expired_proxy_credential_ignored" in line["flags"]
    assert line["principal"] is None  # the expired token vouched for nothing

    with pytest.raises(requests.exceptions.ProxyError, match="407"):
        requests.get(f"https://graph.microsoft.com/v1.0/users?m={marker()}", timeout=20)
    forged = expired[:-6] + ("AAAAAA" if not expired.endswith("AAAAAA") else "BBBBBB")
    for k, v in gateway.client_env(forged).items():
        if k.lower().endswith("proxy"):
            monkeypatch.setenv(k, v)
    with pytest.raises(requests.exceptions.ProxyError, match="407"):  # only an expired token is left aside
        requests.post(token_url(lookalike, marker()), data={"grant_type": "client_credentials"}, timeout=20)
