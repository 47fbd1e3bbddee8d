"""Token verification: Entra's real shapes pass, every forged or broken shape is refused with a
named check, and nothing a token contains can raise anything else."""

import base64
import hashlib
import hmac
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization

from nhi_gateway.lookalike.minting import EntraAuthority
from nhi_gateway.lookalike.pki import SigningKey
from nhi_gateway.identity.principal import AuthMethod, TokenSource
from nhi_gateway.identity.signing_keys import KeysUnavailable, KeyStore
from nhi_gateway.identity.tokens import TokenRejected, TokenVerifier, TrustSettings

from ..support.entra import ENTRA_ISSUERS, LOGIN, Entra
from ..support.entra import b64url as b64

TENANT = "72f988bf-0000-4000-8000-000000000001"
OTHER_TENANT = "11111111-2222-4333-8444-555555555555"
APP = "5a8f3c2e-1b4d-4e6f-9a7b-0c1d2e3f4a5b"
OID = "0b7c1d2e-3f40-4152-8364-758697a8b9ca"

TRUST = TrustSettings(
    issuers=ENTRA_ISSUERS,
    tenants=frozenset({TENANT, OTHER_TENANT}),
    audiences=frozenset({"https://graph.microsoft.com", "https://graph.microsoft.com/",
                         "00000003-0000-0000-c000-000000000000", "api://nhi-test"}),
    leeway_seconds=60,
)


@pytest.fixture
def entra(authority):
    return Entra(authority)


@pytest.fixture
def verifier(entra):
    return TokenVerifier(KeyStore(entra.fetch))


def mint(authority, **kw):
    args = dict(tenant_id=TENANT, app_id=APP, object_id=OID, display_name="mcp-directory",
                roles=("User.Read.All",))
    args.update(kw)
    return authority.mint_app_token(**args)


def reassemble(header: dict, payload: dict, signature: str = "") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{signature}"


def parts(token: str):
    h, p, s = token.split(".")
    pad = lambda x: x + "=" * (-len(x) % 4)  # noqa: E731
    return json.loads(base64.urlsafe_b64decode(pad(h))), json.loads(base64.urlsafe_b64decode(pad(p))), s


# --- the shapes Entra issues --------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("audience", ["https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000",
                                      "api://nhi-test"])
async def test_entra_shapes_verify(authority, verifier, version, audience):
    p = await verifier.verify(mint(authority, version=version, audience=audience), TokenSource.BEARER, TRUST)
    assert p.key == (TENANT, OID)
    assert p.app_id == APP
    assert p.roles == ("User.Read.All",)
    assert p.app_only
    assert p.auth_method is AuthMethod.CERTIFICATE
    assert p.token_version == version
    assert p.token_sources == (TokenSource.BEARER,)


async def test_graph_token_carries_a_nonce_and_verifies(authority, verifier):
    token = mint(authority)
    header, _, _ = parts(token)
    assert "nonce" in header  # Entra adds it for Graph; signed over its hash
    assert (await verifier.verify(token, TokenSource.PROXY, TRUST)).object_id == OID


async def test_graph_token_with_hashed_nonce_on_the_wire_fails(authority, verifier):
    """Verifying the signed header as-is (hash in place of the nonce) must not be accepted
    because the header is then a different one; the verifier hashes the wire nonce itself."""
    token = mint(authority)
    h, p, s = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(h + "=" * (-len(h) % 4)))
    header["nonce"] = b64(hashlib.sha256(header["nonce"].encode()).digest())
    forged = f"{b64(json.dumps(header, separators=(',', ':')).encode())}.{p}.{s}"
    with pytest.raises(TokenRejected) as e:
        await verifier.verify(forged, TokenSource.BEARER, TRUST)
    assert e.value.check == "signature"


async def test_client_secret_authentication_is_visible(authority, verifier):
    p = await verifier.verify(mint(authority, acr="1"), TokenSource.BEARER, TRUST)
    assert p.auth_method is AuthMethod.CLIENT_SECRET


async def test_verified_token_is_cached(authority, verifier):
    token = mint(authority)
    for _ in range(5):
        await verifier.verify(token, TokenSource.BEARER, TRUST)
    assert verifier.signature_checks == 1


async def test_cache_is_bounded(authority, entra):
    verifier = TokenVerifier(KeyStore(entra.fetch), cache_size=3)
    for _ in range(6):
        await verifier.verify(mint(authority), TokenSource.BEARER, TRUST)
    assert len(verifier._cache) == 3


async def test_cached_token_expires(authority, entra):
    clock = [time.time()]
    verifier = TokenVerifier(KeyStore(entra.fetch), clock=lambda: clock[0])
    token = mint(authority, lifetime=100)
    await verifier.verify(token, TokenSource.BEARER, TRUST)
    await verifier.verify(token, TokenSource.BEARER, TRUST)
    assert verifier.signature_checks == 1
    # Past the token's expiry by the verifier's clock, the cache must not answer any more.
    # (PyJWT judges exp by the real clock, so the fresh check itself still passes here.)
    clock[0] += 200
    await verifier.verify(token, TokenSource.BEARER, TRUST)
    assert verifier.signature_checks == 2


# --- refusals -----------------------------------------------------------------------------------

def _hs256_with_public_key(authority):
    pem = authority.signing_key.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header, payload, _ = parts(mint(authority, nonce=False))
    header["alg"] = "HS256"
    unsigned = reassemble(header, payload)[:-1]
    sig = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    return f"{unsigned}.{b64(sig)}"


def _alg_none(authority, alg):
    header, payload, _ = parts(mint(authority, nonce=False))
    header["alg"] = alg
    return reassemble(header, payload)


def _strip_signature(authority):
    return mint(authority).rsplit(".", 1)[0] + "."


def _resign_payload(authority, **changes):
    """A payload edited after signing: the signature no longer matches."""
    h, p, s = mint(authority, nonce=False).split(".")
    _, payload, _ = parts(mint(authority, nonce=False))
    payload.update(changes)
    return f"{h}.{b64(json.dumps(payload).encode())}.{s}"


CASES = [
    ("alg none", lambda a: _alg_none(a, "none"), "algorithm"),
    ("alg NONE", lambda a: _alg_none(a, "NONE"), "algorithm"),
    ("alg nOnE", lambda a: _alg_none(a, "nOnE"), "algorithm"),
    ("alg RS512", lambda a: mint(a, header_overrides={"alg": "RS512"}), "algorithm"),
    ("alg ES256", lambda a: mint(a, header_overrides={"alg": "ES256"}), "algorithm"),
    ("alg missing", lambda a: mint(a, header_overrides={"alg": None}), "algorithm"),
    ("HS256 signed with the public key", _hs256_with_public_key, "algorithm"),
    ("unsigned", _strip_signature, "format"),
    ("jku header", lambda a: mint(a, header_overrides={"jku": "https://evil.example/keys"}), "header"),
    ("x5u header", lambda a: mint(a, header_overrides={"x5u": "https://evil.example/cert"}), "header"),
    ("jwk header", lambda a: mint(a, header_overrides={"jwk": {"kty": "RSA", "n": "AQAB", "e": "AQAB"}}), "header"),
    ("x5c header", lambda a: mint(a, header_overrides={"x5c": ["MIIB"]}), "header"),
    ("crit header", lambda a: mint(a, header_overrides={"crit": ["exp"]}), "header"),
    ("unknown kid", lambda a: mint(a, header_overrides={"kid": "not-a-published-kid"}), "kid"),
    ("absurd kid", lambda a: mint(a, header_overrides={"kid": "../" * 100}), "kid"),
    ("kid not a string", lambda a: mint(a, header_overrides={"kid": 7}), "kid"),
    ("key never published", lambda a: mint(a, key=SigningKey.generate()), "kid"),
    ("expired", lambda a: mint(a, now=int(time.time()) - 7200, lifetime=3600), "lifetime"),
    ("not yet valid", lambda a: mint(a, extra_claims={"nbf": int(time.time()) + 3600}), "lifetime"),
    ("issued in the future", lambda a: mint(a, extra_claims={"iat": int(time.time()) + 3600}), "lifetime"),
    ("no exp", lambda a: mint(a, drop_claims=["exp"]), "lifetime"),
    ("no nbf", lambda a: mint(a, drop_claims=["nbf"]), "lifetime"),
    ("no iat", lambda a: mint(a, drop_claims=["iat"]), "lifetime"),
    ("exp huge float", lambda a: mint(a, extra_claims={"exp": 1e400}), "claims"),
    ("exp list", lambda a: mint(a, extra_claims={"exp": [1]}), "claims"),
    ("exp null", lambda a: mint(a, extra_claims={"exp": None}), "lifetime"),
    ("exp bool", lambda a: mint(a, extra_claims={"exp": True}), "claims"),
    ("exp string", lambda a: mint(a, extra_claims={"exp": "9999999999"}), "claims"),
    ("aud list", lambda a: mint(a, extra_claims={"aud": ["https://graph.microsoft.com"]}), "claims"),
    ("roles not a list", lambda a: mint(a, extra_claims={"roles": "Directory.ReadWrite.All"}), "claims"),
    ("oid not a guid", lambda a: mint(a, object_id="admin"), "claims"),
    ("tenant not allowed", lambda a: mint(a, tenant_id="99999999-9999-4999-8999-999999999999"), "tenant"),
    ("tenant not a guid", lambda a: mint(a, tenant_id="common"), "tenant"),
    ("issuer of another tenant", lambda a: mint(a, extra_claims={"iss": f"https://sts.windows.net/{OTHER_TENANT}/"}), "issuer"),
    ("untrusted issuer", lambda a: mint(a, extra_claims={"iss": "https://evil.example/"}), "issuer"),
    ("audience of another api", lambda a: mint(a, audience="api://someone-else"), "audience"),
    ("payload edited after signing", lambda a: _resign_payload(a, roles=["Directory.ReadWrite.All"]), "signature"),
    ("oversized", lambda a: mint(a, extra_claims={"pad": "x" * 20000}), "size"),
    ("garbage", lambda a: "not a token", "format"),
    ("four parts", lambda a: mint(a) + ".x", "format"),
    ("header not json", lambda a: "bm90IGpzb24." + mint(a).split(".", 1)[1], "format"),
    ("header is a list", lambda a: b64(b"[1]") + "." + mint(a).split(".", 1)[1], "format"),
    ("non-ascii", lambda a: mint(a) + "é", "format"),
    ("deeply nested header", lambda a: b64(b"[" * 10000) + ".e30.x", "format"),
]


@pytest.mark.parametrize("name,make,check", CASES, ids=[c[0] for c in CASES])
async def test_attacks_are_refused_with_a_named_check(authority, verifier, name, make, check):
    token = make(authority)
    with pytest.raises(TokenRejected) as e:
        await verifier.verify(token, TokenSource.BEARER, TRUST)
    assert e.value.check == check, e.value.message


async def test_key_of_another_issuer_cannot_sign(authority, entra):
    """A key whose JWKS entry names a concrete issuer may sign only for that issuer."""
    other = EntraAuthority([SigningKey.generate()])

    async def fetch(url):
        doc = await entra.fetch(url)
        if "keys" in doc:
            doc = {"keys": [k.jwk(f"{LOGIN}/{OTHER_TENANT}/v2.0") for k in authority.keys]}
        return doc

    verifier = TokenVerifier(KeyStore(fetch))
    with pytest.raises(TokenRejected) as e:
        await verifier.verify(mint(authority, version="2.0"), TokenSource.BEARER, TRUST)
    assert e.value.check == "issuer"
    del other


async def test_cold_start_without_keys_is_keys_unavailable(authority, entra, verifier):
    entra.down = True
    with pytest.raises(KeysUnavailable):
        await verifier.verify(mint(authority), TokenSource.BEARER, TRUST)


async def test_policy_change_is_not_answered_from_cache(authority, verifier):
    token = mint(authority)
    await verifier.verify(token, TokenSource.BEARER, TRUST)
    narrowed = TrustSettings(TRUST.issuers, frozenset({OTHER_TENANT}), TRUST.audiences)
    with pytest.raises(TokenRejected) as e:
        await verifier.verify(token, TokenSource.BEARER, narrowed)
    assert e.value.check == "tenant"
