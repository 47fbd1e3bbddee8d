"""The look-alike authority mints tokens in Entra's exact shapes: the gateway's verifier is only
as good as the tokens it is tested against."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time

import jwt
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from nhi_gateway.lookalike import pki
from nhi_gateway.lookalike.minting import (
    GRAPH_APP_ID,
    EntraAuthority,
    graph_nonce_hash,
    mint_client_assertion,
    undo_graph_nonce,
)
from nhi_gateway.lookalike.pki import SigningKey

TID = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
APP = "5e0b1683-de22-4eac-9334-fb85a741f6ff"
OID = "340ba929-384f-4524-9618-43eba60c04e3"
KID_SHAPE = re.compile(r"^[A-Za-z0-9_-]{27}$")


@pytest.fixture(scope="module")
def authority() -> EntraAuthority:
    return EntraAuthority([SigningKey.generate()])


def b64d(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def wire_header(token: str) -> bytes:
    return b64d(token.split(".")[0])


def mint(authority: EntraAuthority, **kwargs) -> str:
    kwargs = {"tenant_id": TID, "app_id": APP, "object_id": OID, "display_name": "mcp-directory", **kwargs}
    return authority.mint_app_token(**kwargs)


def verify(token: str, key: SigningKey, audience: str = "https://graph.microsoft.com") -> dict:
    return jwt.decode(token, key.public_key, algorithms=["RS256"], audience=audience,
                      options={"require": ["exp", "nbf", "iat"]})


def transform_by_hand(token: str) -> str:
    """The verification recipe from the facts doc, written out independently of undo_graph_nonce."""
    header_b64, payload_b64, signature_b64 = token.split(".")
    raw = b64d(header_b64)
    nonce = json.loads(raw)["nonce"]
    hashed = base64.urlsafe_b64encode(hashlib.sha256(nonce.encode()).digest()).rstrip(b"=").decode()
    replaced = raw.replace(f'"nonce":"{nonce}"'.encode(), f'"nonce":"{hashed}"'.encode())
    return ".".join([base64.urlsafe_b64encode(replaced).rstrip(b"=").decode(), payload_b64, signature_b64])


@pytest.mark.parametrize("audience", ["https://graph.microsoft.com", "https://graph.microsoft.com/", GRAPH_APP_ID])
def test_graph_token_verifies_only_after_the_nonce_transform(authority, audience):
    token = mint(authority, audience=audience)
    assert "nonce" in json.loads(wire_header(token))
    with pytest.raises(jwt.InvalidSignatureError):
        verify(token, authority.signing_key, audience)  # as sent: Graph's quirk makes this fail
    assert verify(transform_by_hand(token), authority.signing_key, audience)["aud"] == audience
    assert undo_graph_nonce(token) == transform_by_hand(token)


def test_only_the_nonce_value_differs_between_wire_and_signed_header(authority):
    token = mint(authority, nonce="fixed-nonce-value")
    signed = wire_header(undo_graph_nonce(token))
    assert wire_header(token).replace(b"fixed-nonce-value", graph_nonce_hash("fixed-nonce-value").encode()) == signed


@pytest.mark.parametrize("audience", ["api://nhi-gateway", "6f1c2a4e-0b3d-4e5f-8a7b-9c0d1e2f3a4b"])
def test_non_graph_token_has_no_nonce_and_verifies_as_sent(authority, audience):
    token = mint(authority, audience=audience)
    assert "nonce" not in json.loads(wire_header(token))
    assert verify(token, authority.signing_key, audience)["aud"] == audience
    assert undo_graph_nonce(token) == token


@pytest.mark.parametrize(
    ("version", "order"),
    [("1.0", ["typ", "nonce", "alg", "x5t", "kid"]), ("2.0", ["typ", "nonce", "alg", "kid"])],
)
def test_header_key_order_is_entras(authority, version, order):
    header = json.loads(wire_header(mint(authority, version=version)))
    assert list(header) == order
    assert header["typ"] == "JWT" and header["alg"] == "RS256"
    assert header["kid"] == authority.signing_key.kid
    assert wire_header(mint(authority, version=version)).startswith(b'{"typ":"JWT","nonce":"')  # compact JSON


def test_explicit_nonce_choices(authority):
    assert "nonce" not in json.loads(wire_header(mint(authority, nonce=False)))
    token = mint(authority, nonce="abc")
    assert json.loads(wire_header(token))["nonce"] == "abc"
    verify(undo_graph_nonce(token), authority.signing_key)


def test_v1_app_token_claims(authority):
    now = int(time.time())
    token = mint(authority, roles=["User.Read.All"], acr="1", now=now, lifetime=4500, groups=["g1"])
    claims = verify(undo_graph_nonce(token), authority.signing_key)
    assert claims["iss"] == f"https://sts.windows.net/{TID}/"
    assert (claims["appid"], claims["appidacr"], claims["ver"]) == (APP, "1", "1.0")
    assert "azp" not in claims and "scp" not in claims
    assert claims["oid"] == claims["sub"] == OID
    assert (claims["idtyp"], claims["tid"], claims["roles"], claims["groups"]) == ("app", TID, ["User.Read.All"], ["g1"])
    assert (claims["iat"], claims["nbf"], claims["exp"]) == (now, now, now + 4500)
    assert claims["app_displayname"] == "mcp-directory" and claims["uti"]


def test_v2_app_token_claims(authority):
    claims = verify(undo_graph_nonce(mint(authority, version="2.0", audience=APP, nonce=False)),
                    authority.signing_key, APP)
    assert claims["iss"] == f"https://login.microsoftonline.com/{TID}/v2.0"
    assert (claims["azp"], claims["azpacr"], claims["ver"]) == (APP, "2", "2.0")
    assert "appid" not in claims and "x5t" not in json.loads(wire_header(mint(authority, version="2.0")))


def test_each_token_has_its_own_uti(authority):
    assert jwt.decode(mint(authority), options={"verify_signature": False})["uti"] != jwt.decode(
        mint(authority), options={"verify_signature": False})["uti"]


def test_claim_and_header_edits_for_attack_tests(authority):
    token = mint(authority, extra_claims={"xms_mirid": "/subscriptions/x", "roles": ["Directory.ReadWrite.All"]},
                 drop_claims=["exp"], header_overrides={"alg": "none", "jku": "https://evil.example/keys", "x5t": None})
    header = json.loads(wire_header(token))
    assert header["alg"] == "none" and header["jku"] == "https://evil.example/keys" and "x5t" not in header
    claims = jwt.decode(token, options={"verify_signature": False})
    assert "exp" not in claims and claims["roles"] == ["Directory.ReadWrite.All"] and claims["xms_mirid"]


def test_token_signed_with_an_unpublished_key(authority):
    stranger = SigningKey.generate()
    token = mint(authority, key=stranger)
    assert json.loads(wire_header(token))["kid"] == stranger.kid not in [k.kid for k in authority.keys]
    verify(undo_graph_nonce(token), stranger)


def test_kid_is_base64url_sha1_of_certificate_der():
    key = SigningKey.generate()
    jwk = key.jwk()
    der = base64.b64decode(jwk["x5c"][0])
    assert KID_SHAPE.match(key.kid)
    assert key.kid == key.x5t == jwk["kid"] == jwk["x5t"]
    assert b64d(key.kid) == hashlib.sha1(der).digest()  # noqa: S324
    assert x509.load_der_x509_certificate(der).public_key().public_numbers() == key.public_key.public_numbers()


def test_jwks_shape(authority):
    v2 = authority.jwks("2.0")["keys"]
    v1 = authority.jwks("1.0")["keys"]
    assert set(v2[0]) == {"kty", "use", "kid", "x5t", "n", "e", "x5c", "issuer"}
    assert set(v1[0]) == {"kty", "use", "kid", "x5t", "n", "e", "x5c"}  # no issuer, no alg
    assert v2[0]["issuer"] == "https://login.microsoftonline.com/{tenantid}/v2.0"
    assert (v2[0]["kty"], v2[0]["use"], v2[0]["e"]) == ("RSA", "sig", "AQAB")
    # PyJWT accepts the published set and the key verifies a minted token.
    jwk = jwt.PyJWKSet.from_dict(authority.jwks("2.0"))[authority.signing_key.kid]
    jwt.decode(undo_graph_nonce(mint(authority)), jwk.key, algorithms=["RS256"], audience="https://graph.microsoft.com")


@pytest.mark.parametrize(
    ("tenant", "version", "issuer", "jwks_uri", "token_endpoint"),
    [
        (TID, "2.0", f"https://login.microsoftonline.com/{TID}/v2.0",
         f"https://login.microsoftonline.com/{TID}/discovery/v2.0/keys",
         f"https://login.microsoftonline.com/{TID}/oauth2/v2.0/token"),
        ("common", "2.0", "https://login.microsoftonline.com/{tenantid}/v2.0",
         "https://login.microsoftonline.com/common/discovery/v2.0/keys",
         "https://login.microsoftonline.com/common/oauth2/v2.0/token"),
        (TID, "1.0", f"https://sts.windows.net/{TID}/", "https://login.microsoftonline.com/common/discovery/keys",
         f"https://login.microsoftonline.com/{TID}/oauth2/token"),
    ],
)
def test_discovery_documents(authority, tenant, version, issuer, jwks_uri, token_endpoint):
    doc = authority.discovery(tenant, version)
    assert (doc["issuer"], doc["jwks_uri"], doc["token_endpoint"]) == (issuer, jwks_uri, token_endpoint)
    assert doc["id_token_signing_alg_values_supported"] == ["RS256"]
    assert doc["authorization_endpoint"].startswith(f"https://login.microsoftonline.com/{tenant}/oauth2/")


def test_rotation_publish_then_use_then_retire(tmp_path):
    authority = EntraAuthority.open(tmp_path)
    old = authority.signing_key
    new = authority.add_key(current=False)  # announced before use, like Entra
    assert [k.kid for k in authority.keys] == [old.kid, new.kid] and authority.signing_key == old
    authority.use_key(new.kid)
    assert json.loads(wire_header(mint(authority)))["kid"] == new.kid
    authority.retire_key(old.kid)
    assert [k["kid"] for k in authority.jwks()["keys"]] == [new.kid]
    with pytest.raises(ValueError):
        authority.retire_key(new.kid)  # never publish an empty set


def test_keys_survive_a_restart_and_other_processes_see_rotation(tmp_path):
    server_side = EntraAuthority.open(tmp_path)
    first = server_side.signing_key.kid
    assert EntraAuthority.open(tmp_path).signing_key.kid == first  # restart: same key

    test_side = EntraAuthority.open(tmp_path)
    added = test_side.add_key()
    server_side.refresh()
    assert [k.kid for k in server_side.keys] == [first, added.kid]
    assert server_side.signing_key.kid == added.kid
    verify(undo_graph_nonce(mint(test_side)), server_side.key(added.kid))


def test_signing_key_pem_round_trip(tmp_path):
    key = SigningKey.generate()
    key.save(tmp_path / "k.key.pem", tmp_path / "k.pem")
    assert (tmp_path / "k.key.pem").stat().st_mode & 0o077 == 0
    loaded = SigningKey.load(tmp_path / "k.key.pem", tmp_path / "k.pem")
    assert loaded.kid == key.kid and loaded.jwk() == key.jwk()


@pytest.mark.parametrize("name", ["graph.microsoft.com", "login.microsoftonline.com", "sts.windows.net", "localhost"])
def test_server_certificate_chains_to_the_test_ca_for_every_name(tmp_path, name):
    files = pki.ensure_server_pki(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName(name))
    verifier.verify(leaf, [])
    assert pki.ensure_server_pki(tmp_path) == files
    assert x509.load_pem_x509_certificate(files.server_cert.read_bytes()) == leaf  # loaded, not regenerated


def test_client_assertion_shape():
    key = SigningKey.generate()
    endpoint = f"https://login.microsoftonline.com/{TID}/oauth2/v2.0/token"
    assertion = mint_client_assertion(key, client_id=APP, audience=endpoint)
    header = jwt.get_unverified_header(assertion)
    assert header["x5t"] == key.x5t and header["x5t#S256"] == key.x5t_s256
    claims = jwt.decode(assertion, key.public_key, algorithms=["RS256"], audience=endpoint)
    assert claims["iss"] == claims["sub"] == APP and 0 < claims["exp"] - claims["iat"] <= 600
