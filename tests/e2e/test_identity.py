"""Identity through the real gateway: every token shape Entra issues is understood, every forged
shape is refused with 401 (request) or 407 (CONNECT) and a JSON reason — never a 5xx — and a
signing key rotated at Entra works without a restart."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pytest
import requests
from cryptography.hazmat.primitives import serialization

from nhi_gateway.lookalike.pki import SigningKey

from ..support.e2e import GRAPH, marker, proxy_basic, raw_connect, reached_graph, use_proxy
from ..support.entra import b64url as b64
from ..support.entra import unb64url
from .conftest import start_gateway, stop


def decode(segment: str) -> dict:
    return json.loads(unb64url(segment))


def with_header(token: str, **changes) -> str:
    h, p, s = token.split(".")
    header = decode(h)
    header.update(changes)
    return f"{b64(json.dumps(header).encode())}.{p}.{s}"


def hs256_with_public_key(lookalike, tokens) -> str:
    authority = lookalike.authority()
    pem = authority.signing_key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    h, p, _ = tokens(nonce=False).split(".")
    header = decode(h) | {"alg": "HS256"}
    unsigned = f"{b64(json.dumps(header).encode())}.{p}"
    return f"{unsigned}.{b64(hmac.new(pem, unsigned.encode(), hashlib.sha256).digest())}"


ATTACKS = {
    "alg none": lambda la, t: with_header(t(nonce=False), alg="none").rsplit(".", 1)[0] + ".",
    "alg None": lambda la, t: with_header(t(nonce=False), alg="None"),
    "HS256 with the public key": hs256_with_public_key,
    "RS256 to PS256 swap": lambda la, t: with_header(t(nonce=False), alg="PS256"),
    "jku": lambda la, t: t(header_overrides={"jku": "https://graph.microsoft.com/keys"}),
    "x5u": lambda la, t: t(header_overrides={"x5u": "https://graph.microsoft.com/cert"}),
    "jwk": lambda la, t: t(header_overrides={"jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}),
    "x5c": lambda la, t: t(header_overrides={"x5c": ["MIIB"]}),
    "crit": lambda la, t: t(header_overrides={"crit": ["b64"], "b64": False}),
    "unknown kid": lambda la, t: t(header_overrides={"kid": "nope"}),
    "absurd kid": lambda la, t: t(header_overrides={"kid": "A" * 5000}),
    "never published key": lambda la, t: t(key=SigningKey.generate()),
    "expired": lambda la, t: t(now=int(time.time()) - 10_000),
    "not yet valid": lambda la, t: t(extra_claims={"nbf": int(time.time()) + 3600}),
    "no exp": lambda la, t: t(drop_claims=["exp"]),
    "exp as string": lambda la, t: t(extra_claims={"exp": "never"}),
    "exp overflow": lambda la, t: t(extra_claims={"exp": 1e308 * 10}),
    "wrong tenant": lambda la, t: t(tenant_id="0f0f0f0f-0f0f-4f0f-8f0f-0f0f0f0f0f0f"),
    "issuer of another tenant": lambda la, t: t(extra_claims={"iss": "https://sts.windows.net/0f0f0f0f-0f0f-4f0f-8f0f-0f0f0f0f0f0f/"}),
    "audience confusion": lambda la, t: t(audience="api://some-other-api"),
    "oversized": lambda la, t: t(extra_claims={"pad": "x" * 40_000}),
    "garbage": lambda la, t: "%%%.@@@.!!!",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_forged_bearer_tokens_get_401_json(gateway, lookalike, tokens, monkeypatch, attack):
    use_proxy(monkeypatch, gateway)
    mark = marker()
    token = ATTACKS[attack](lookalike, tokens)
    r = requests.get(f"{GRAPH}/v1.0/users?m={mark}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    # A header bigger than mitmproxy accepts is refused by the HTTP parser itself (431/400).
    assert r.status_code in ((401,) if attack != "oversized" else (401, 400, 431)), r.text[:300]
    if r.status_code == 401:
        err = r.json()["error"]
        assert err["code"] == "InvalidAuthenticationToken"
        assert err["innerError"]["nhi-gateway"]["check"]
    assert not reached_graph(lookalike, mark)


@pytest.mark.parametrize("attack", [a for a in ATTACKS if a != "oversized"])
def test_forged_proxy_tokens_get_407_json(gateway, lookalike, tokens, attack):
    status, body, s = raw_connect(gateway, "graph.microsoft.com", proxy_basic(ATTACKS[attack](lookalike, tokens)))
    s.close()
    assert status == 407, body[:300]
    assert json.loads(body)["error"]["innerError"]["nhi-gateway"]["check"]


SHAPES = {
    "v1 app-only (Graph)": {},
    "v2 app-only": {"version": "2.0"},
    "Graph app id as audience": {"audience": "00000003-0000-0000-c000-000000000000"},
    "managed identity": {"extra_claims": {"xms_mirid": "/subscriptions/0000/resourcegroups/rg/providers/"
                                                      "Microsoft.ManagedIdentity/userAssignedIdentities/mcp"}},
    "delegated": {"extra_claims": {"scp": "User.Read.All", "idtyp": "user"}},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_entra_token_shapes_are_accepted(gateway, lookalike, tokens, monkeypatch, shape):
    use_proxy(monkeypatch, gateway)
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/groups?m={mark}",
                     headers={"Authorization": f"Bearer {tokens(**SHAPES[shape])}"}, timeout=30)
    assert r.status_code == 200, r.text[:300]
    line = next(a for a in gateway.audit() if mark in a["url"])
    assert line["decision"] == "allow"
    if shape == "delegated":
        assert line["principal"]["app_only"] is False
    if shape == "managed identity":
        assert line["principal"]["managed_identity"].endswith("/mcp")


def test_key_rotated_at_entra_works_without_restart(request, tmp_path, lookalike, tokens, monkeypatch):
    # A gateway of its own: the shared one has spent its unknown-kid refresh on forged kids
    # (at most one refetch per 5 minutes, by design).
    gateway = start_gateway(tmp_path / "gw", lookalike)
    request.addfinalizer(lambda: stop(gateway.proc))
    use_proxy(monkeypatch, gateway)
    # Warm the gateway's key cache with the current key first.
    assert requests.get(f"{GRAPH}/v1.0/groups", headers={"Authorization": f"Bearer {tokens()}"},
                        timeout=30).status_code == 200
    authority = lookalike.authority()
    new_key = authority.add_key()  # published in the look-alike's JWKS from now on
    try:
        rotated = tokens(key=new_key)
        r = requests.get(f"{GRAPH}/v1.0/groups", headers={"Authorization": f"Bearer {rotated}"}, timeout=30)
        assert r.status_code == 200, r.text[:300]
    finally:
        authority.retire_key(new_key.kid)


def test_both_sources_must_name_the_same_principal(gateway, lookalike, tokens, monkeypatch):
    other = lookalike.app("rotation-bot")
    intruder = tokens(app_id=other["client_id"], object_id=other["object_id"], display_name="rotation-bot")
    use_proxy(monkeypatch, gateway, tokens())
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/groups?m={mark}", headers={"Authorization": f"Bearer {intruder}"},
                     timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["innerError"]["nhi-gateway"]["check"] == "mismatch"
    assert not reached_graph(lookalike, mark)


def test_flood_of_random_kids_refetches_keys_at_most_once(request, tmp_path, lookalike, tokens, monkeypatch):
    gateway = start_gateway(tmp_path / "gw", lookalike)
    request.addfinalizer(lambda: stop(gateway.proc))
    use_proxy(monkeypatch, gateway)

    def key_fetches() -> int:
        return sum(1 for line in lookalike.received() if "/keys" in line["path"] and line["method"] == "GET")

    before = key_fetches()
    session = requests.Session()
    for i in range(60):
        r = session.get(f"{GRAPH}/v1.0/groups",
                        headers={"Authorization": f"Bearer {tokens(header_overrides={'kid': f'random-{i}'})}"},
                        timeout=30)
        assert r.status_code == 401
    # The first token loads the key set; one refresh for the unknown kid; then none for 5 minutes.
    assert 1 <= key_fetches() - before <= 2


@pytest.mark.parametrize("credential", ["Basic YWdlbnQ6c2VjcmV0", "PoP eyJhbGciOiJSUzI1NiJ9.e30.x", "Bearer"])
def test_other_authorization_schemes_never_ride_on_the_proxy_identity(gateway, lookalike, tokens, monkeypatch,
                                                                      credential):
    """With a valid proxy token, a non-Bearer Authorization header must not reach Graph unverified."""
    use_proxy(monkeypatch, gateway, tokens())
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/groups?m={mark}", headers={"Authorization": credential}, timeout=30)
    assert r.status_code == 401, r.text[:300]
    assert r.json()["error"]["innerError"]["nhi-gateway"]["check"] in ("scheme", "format")
    assert not reached_graph(lookalike, mark)


def test_a_key_withdrawn_at_entra_revokes_every_token_it_signed_cached_or_not(request, tmp_path, lookalike, tokens):
    """Microsoft's emergency rollover: once a refresh of the JWKS no longer lists a kid, every token
    that kid signed is refused, in either source, whether its verdict was cached or not, and even
    inside a tunnel opened while the key was good. Nothing reaches Graph."""
    gateway = start_gateway(tmp_path / "gw", lookalike, extra_args=["--unknown-kid-refresh", "0"])
    request.addfinalizer(lambda: stop(gateway.proc))
    authority = lookalike.authority()
    doomed = authority.add_key(current=False)  # published, not the look-alike's signing key
    request.addfinalizer(lambda: doomed.kid in {k.kid for k in authority.keys} and authority.retire_key(doomed.kid))
    token = tokens(key=doomed)
    proxies = {"https": gateway.proxy()}
    in_tunnel = requests.Session()
    in_tunnel.proxies = {"https": gateway.proxy(token)}
    for _ in range(2):  # verified, then answered from the cache
        r = requests.get(f"{GRAPH}/v1.0/groups", headers={"Authorization": f"Bearer {token}"},
                         proxies=proxies, verify=gateway.ca_cert, timeout=30)
        assert r.status_code == 200, r.text[:300]
        assert in_tunnel.get(f"{GRAPH}/v1.0/groups", verify=gateway.ca_cert, timeout=30).status_code == 200

    authority.retire_key(doomed.kid)
    # The gateway learns of it at its next refresh: here, the one a token with an unknown kid causes.
    r = requests.get(f"{GRAPH}/v1.0/groups", headers={"Authorization": f"Bearer {tokens(key=SigningKey.generate())}"},
                     proxies=proxies, verify=gateway.ca_cert, timeout=30)
    assert r.status_code == 401

    marks = [marker() for _ in range(4)]
    for mark, presented in zip(marks[:2], (token, tokens(key=doomed)), strict=True):  # cached, and fresh
        r = requests.get(f"{GRAPH}/v1.0/groups?m={mark}", headers={"Authorization": f"Bearer {presented}"},
                         proxies=proxies, verify=gateway.ca_cert, timeout=30)
        assert r.status_code == 401, r.text[:300]
        assert r.json()["error"]["innerError"]["nhi-gateway"]["check"] == "kid"
    r = in_tunnel.get(f"{GRAPH}/v1.0/groups?m={marks[2]}", verify=gateway.ca_cert, timeout=30)  # the tunnel opened with it
    assert r.status_code == 407, r.text[:300]
    assert r.json()["error"]["innerError"]["nhi-gateway"]["check"] == "kid"
    status, body, s = raw_connect(gateway, "graph.microsoft.com", proxy_basic(token))  # a new tunnel
    s.close()
    assert status == 407 and json.loads(body)["error"]["innerError"]["nhi-gateway"]["check"] == "kid"
    assert not any(reached_graph(lookalike, m) for m in marks)
    assert "signing keys withdrawn" in gateway.log.read_text()


# --- credentials cannot become headers (issue 18, item 3) ------------------------------------------

SMUGGLED = "\r\nX-Injected: yes\r\n\r\nDELETE /v1.0/users/AdeleV@nhilab.onmicrosoft.com HTTP/1.1\r\nHost: graph.microsoft.com"


def smuggled_anything(lookalike) -> bool:
    return any("x-injected" in (h.lower() for h in line.get("headers", ())) or line.get("method") == "DELETE"
               for line in lookalike.received())


@pytest.mark.parametrize("tail", ["\r\n", SMUGGLED, " ", "=", "\t"])
def test_proxy_token_with_anything_after_its_signature_is_refused_at_connect(gateway, lookalike, tokens, tail):
    """A valid token followed by CR LF (and a smuggled header or request) in the proxy credentials:
    refused as not being a compact JWS before PyJWT reads it, whatever PyJWT version is installed."""
    status, body, s = raw_connect(gateway, "graph.microsoft.com", proxy_basic(tokens() + tail))
    s.close()
    assert status == 407, body[:300]
    inner = json.loads(body)["error"]["innerError"]["nhi-gateway"]
    assert inner["check"] == "format"
    assert "compact JWS" in json.loads(body)["error"]["message"]
    assert not smuggled_anything(lookalike)


def test_proxy_url_credentials_with_crlf_never_reach_graph(gateway, lookalike, tokens, monkeypatch):
    """The same through a real client: HTTPS_PROXY with the CR LF percent-encoded in the password."""
    from urllib.parse import quote

    proxy = f"http://agent:{quote(tokens() + SMUGGLED, safe='')}@127.0.0.1:{gateway.port}"
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", gateway.ca_cert)
    mark = marker()
    with pytest.raises(requests.exceptions.ProxyError) as e:
        requests.get(f"{GRAPH}/v1.0/groups?m={mark}", timeout=30)
    assert "407" in str(e.value)
    assert not reached_graph(lookalike, mark)
    assert not smuggled_anything(lookalike)


@pytest.mark.parametrize("tail", [" X-Injected: yes", "==", " "])
def test_bearer_token_with_anything_after_it_is_refused(gateway, lookalike, tokens, monkeypatch, tail):
    use_proxy(monkeypatch, gateway)
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/groups?m={mark}", headers={"Authorization": f"Bearer {tokens()}{tail}"},
                     timeout=30)
    if tail == " ":  # HTTP trims whitespace around a header value: the token as sent is compact
        assert r.status_code == 200, r.text[:300]
        return
    assert r.status_code == 401, r.text[:300]
    assert r.json()["error"]["innerError"]["nhi-gateway"]["check"] == "format"
    assert not reached_graph(lookalike, mark)
    assert not smuggled_anything(lookalike)

