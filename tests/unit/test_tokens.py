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
from nhi_gateway.identity.tokens import IssuerTrust, TokenRejected, TokenVerifier, TrustSettings

TENANT = "72f988bf-0000-4000-8000-000000000001"
OTHER_TENANT = "11111111-2222-4333-8444-555555555555"
APP = "5a8f3c2e-1b4d-4e6f-9a7b-0c1d2e3f4a5b"
OID = "0b7c1d2e-3f40-4152-8364-758697a8b9ca"
LOGIN = "https://login.microsoftonline.com"

TRUST = TrustSettings(
    issuers=(
        IssuerTrust(f"{LOGIN}/{{tenantid}}/v2.0", f"{LOGIN}/{{tenantid}}/v2.0/.well-known/openid-configuration"),
        IssuerTrust("https://sts.windows.net/{tenantid}/", f"{LOGIN}/{{tenantid}}/.well-known/openid-configuration"),
    ),
    tenants=frozenset({TENANT, OTHER_TENANT}),
    audiences=frozenset({"https://graph.microsoft.com", "https://graph.microsoft.com/",
                         "00000003-0000-0000-c000-000000000000", "api://nhi-test"}),
    leeway_seconds=60,
)


@pytest.fixture(scope="module")
def authority():
    return EntraAuthority([SigningKey.generate()])


class Entra:
    """Answers metadata and JWKS requests from the authority, like login.microsoftonline.com."""

    def __init__(self, authority):
        self.authority = authority
        self.down = False

    async def fetch(self, url: str) -> dict:
        if self.down:
            raise ConnectionError("down")
        path = url.removeprefix(LOGIN + "/")
        tenant, _, rest = path.partition("/")
        if rest == "v2.0/.well-known/openid-configuration":
            return self.authority.discovery(tenant, "2.0")
        if rest == ".well-known/openid-configuration":
            return self.authority.discovery(tenant, "1.0")
        if "discovery/v2.0/keys" in rest:
            return self.authority.jwks("2.0")
        if "discovery/keys" in rest:
            return self.authority.jwks("1.0")
        raise AssertionError(url)


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


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


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
    ("deeply nested header", lambda a: b64(b"[" * 10000) + ".e30.x", "nesting"),
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


# --- tokens that contradict themselves (issue 13, item 3) -----------------------------------------
# Every token below is properly signed by the published key: what refuses it is its own content.


def _signed_claims(authority, **changes) -> dict:
    _, payload, _ = parts(mint(authority, nonce=False))
    payload.update(changes)
    return payload


def _raw(authority, header: bytes, payload: bytes) -> str:
    return authority.sign_raw(header, payload)


def _header_bytes(authority) -> bytes:
    return json.dumps({"typ": "JWT", "alg": "RS256", "x5t": authority.signing_key.x5t,
                       "kid": authority.signing_key.kid}, separators=(",", ":")).encode()


def _payload_bytes(authority, **changes) -> bytes:
    return json.dumps(_signed_claims(authority, **changes), separators=(",", ":")).encode()


def _duplicate_in_payload(authority, name: str, first, second) -> str:
    claims = _signed_claims(authority)
    claims.pop(name, None)
    body = json.dumps(claims, separators=(",", ":"))[:-1]
    body += f',"{name}":{json.dumps(first)},"{name}":{json.dumps(second)}}}'
    return _raw(authority, _header_bytes(authority), body.encode())


def _duplicate_in_header(authority, name: str, first, second) -> str:
    header = _header_bytes(authority)[:-1] + f',"{name}":{json.dumps(first)},"{name}":{json.dumps(second)}}}'.encode()
    if name == "kid":
        header = json.dumps({"typ": "JWT", "alg": "RS256"}, separators=(",", ":")).encode()[:-1]
        header += f',"kid":{json.dumps(first)},"kid":{json.dumps(second)}}}'.encode()
    return _raw(authority, header, _payload_bytes(authority))


def _nested_claim(depth: int):
    value: object = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


CONTRADICTIONS = [
    ("app-only token with delegated scopes", lambda a: _raw(a, _header_bytes(a), _payload_bytes(a, scp="User.Read.All")), "contradiction"),
    ("app-only token with _claim_names", lambda a: _raw(a, _header_bytes(a), _payload_bytes(
        a, _claim_names={"groups": "src1"}, _claim_sources={"src1": {"endpoint": "https://graph.microsoft.com/v1.0/x"}})), "contradiction"),
    ("app-only token with _claim_sources only", lambda a: _raw(a, _header_bytes(a), _payload_bytes(
        a, _claim_sources={"src1": {"endpoint": "https://evil.example/groups"}})), "contradiction"),
    ("app-only token with hasgroups", lambda a: _raw(a, _header_bytes(a), _payload_bytes(a, hasgroups=True)), "contradiction"),
    ("no idtyp, no scp (app-only) with hasgroups", lambda a: _raw(a, _header_bytes(a), json.dumps(
        {k: v for k, v in _signed_claims(a, hasgroups="true").items() if k != "idtyp"}).encode()), "contradiction"),
    ("payload names roles twice", lambda a: _duplicate_in_payload(a, "roles", ["User.Read.All"], ["Directory.ReadWrite.All"]), "duplicate_member"),
    ("payload names tid twice", lambda a: _duplicate_in_payload(a, "tid", TENANT, OTHER_TENANT), "duplicate_member"),
    ("payload names aud twice", lambda a: _duplicate_in_payload(a, "aud", "api://someone-else", "https://graph.microsoft.com"), "duplicate_member"),
    ("payload duplicate inside a nested object", lambda a: _raw(a, _header_bytes(a), _payload_bytes(
        a, xms_extra={"k": 1}).replace(b'{"k":1}', b'{"k":1,"k":2}')), "duplicate_member"),
    ("header names alg twice", lambda a: _duplicate_in_header(a, "alg", "none", "RS256"), "duplicate_member"),
    ("header names kid twice", lambda a: _duplicate_in_header(a, "kid", "nope", a.signing_key.kid), "duplicate_member"),
    ("claim nested too deep", lambda a: _raw(a, _header_bytes(a), _payload_bytes(a, xms_deep=_nested_claim(12))), "nesting"),
    ("header nested too deep", lambda a: _raw(a, _header_bytes(a)[:-1] + b',"x":' + json.dumps(_nested_claim(12)).encode() + b"}",
                                              _payload_bytes(a)), "nesting"),
    ("one claim too large", lambda a: _raw(a, _header_bytes(a), _payload_bytes(a, xms_pad=["g" * 30] * 300)), "claim_size"),
    ("one string too large", lambda a: _raw(a, _header_bytes(a), _payload_bytes(a, xms_pad="y" * 5000)), "claim_size"),
]


@pytest.mark.parametrize("name,make,check", CONTRADICTIONS, ids=[c[0] for c in CONTRADICTIONS])
async def test_tokens_that_contradict_themselves_are_refused_whatever_their_signature(
        authority, verifier, name, make, check):
    token = make(authority)
    for source in TokenSource:
        with pytest.raises(TokenRejected) as e:
            await verifier.verify(token, source, TRUST)
        assert e.value.check == check, e.value.message


async def test_the_raw_signing_helper_makes_tokens_that_verify(authority, verifier):
    """The contradiction cases above are refused for their content, not for a broken signature."""
    token = _raw(authority, _header_bytes(authority), _payload_bytes(authority))
    assert (await verifier.verify(token, TokenSource.BEARER, TRUST)).object_id == OID


@pytest.mark.parametrize("claims", [
    {"scp": "User.Read", "idtyp": "user", "hasgroups": True},
    {"scp": "User.Read", "idtyp": "user", "_claim_names": {"groups": "src1"},
     "_claim_sources": {"src1": {"endpoint": "https://graph.microsoft.com/v1.0/users/x/getMemberObjects"}}},
    {"scp": "User.Read", "groups": [f"00000000-0000-4000-8000-{i:012d}" for i in range(200)], "idtyp": "user"},
], ids=["hasgroups", "overage", "200 groups"])
async def test_delegated_tokens_may_carry_group_overage_markers(authority, verifier, claims):
    """Entra emits overage markers for users: they are not a contradiction there (and never followed)."""
    token = _raw(authority, _header_bytes(authority), _payload_bytes(authority, **claims))
    p = await verifier.verify(token, TokenSource.BEARER, TRUST)
    assert p.app_only is False


def test_nesting_is_judged_before_json_parsing_so_every_python_agrees():
    """A nesting depth that json.loads of one Python version accepts and another refuses (or
    that exceeds the recursion limit) gets one answer: the limit, checked on the bytes."""
    from nhi_gateway.identity.tokens import MAX_JSON_DEPTH, check_json_shape

    check_json_shape(b'{"a":' * MAX_JSON_DEPTH + b"1" + b"}" * MAX_JSON_DEPTH, "payload")
    for depth in (MAX_JSON_DEPTH + 1, 2_000, 200_000):
        with pytest.raises(TokenRejected) as e:
            check_json_shape(b"[" * depth + b"]" * depth, "payload")
        assert e.value.check == "nesting"
    # Brackets inside strings are text, not nesting, escaped quotes included.
    check_json_shape(json.dumps({"a": "[[[[[[[[[[[[[[[[[[{{{{{{{{{{{{"}).encode(), "payload")
    check_json_shape(json.dumps({"a": '\\"[[[[[[[[[[[[[[[[["'}).encode(), "payload")
    # An unterminated string hides nothing either: what follows its quote is text (json refuses it).
    check_json_shape(b'{"a":"' + b"[" * 100, "payload")
    with pytest.raises(TokenRejected) as e:
        check_json_shape(b'{"a":"\\\\"' + b"[" * 100, "payload")  # the string ended: these nest
    assert e.value.check == "nesting"


# --- removing a key revokes (issue 13, item 4) ----------------------------------------------------


class Rollover:
    """An authority of its own (the module's is shared), with a key store whose clock the test moves."""

    def __init__(self, **store):
        self.authority = EntraAuthority([SigningKey.generate()])
        self.entra = Entra(self.authority)
        self.now = [1000.0]
        self.keys = KeyStore(self.entra.fetch, clock=lambda: self.now[0], **store)
        self.verifier = TokenVerifier(self.keys)

    def mint(self, **kw):
        return mint(self.authority, **kw)

    async def verify(self, token):
        return await self.verifier.verify(token, TokenSource.BEARER, TRUST)


async def test_a_key_removed_by_an_unknown_kid_refresh_revokes_its_cached_tokens():
    r = Rollover(unknown_kid_interval=0)
    doomed = r.authority.add_key()
    token = r.mint(key=doomed)
    await r.verify(token)
    await r.verify(token)
    assert r.verifier.signature_checks == 1  # cached
    r.authority.retire_key(doomed.kid)  # Microsoft's emergency rollover: the kid is gone
    # Until the gateway's set is refreshed, it cannot know; a token with a new kid makes it look.
    await r.verify(r.mint())
    with pytest.raises(TokenRejected) as e:
        await r.verify(r.mint(key=SigningKey.generate()))
    assert e.value.check == "kid"
    with pytest.raises(TokenRejected) as e:
        await r.verify(token)  # cached before, refused now
    assert e.value.check == "kid"
    with pytest.raises(TokenRejected) as e:
        await r.verify(r.mint(key=doomed))  # and never cached: refused too
    assert e.value.check == "kid"


async def test_a_key_removed_by_the_scheduled_refresh_revokes_its_cached_tokens():
    r = Rollover(refresh_after=3600, max_age=24 * 3600)
    doomed = r.authority.add_key()
    token = r.mint(key=doomed)
    await r.verify(token)
    r.authority.retire_key(doomed.kid)
    r.now[0] += 25 * 3600  # past max_age: the set is refreshed before use, even for a cached verdict
    with pytest.raises(TokenRejected) as e:
        await r.verify(token)
    assert e.value.check == "kid"


async def test_a_kid_republished_with_other_key_material_does_not_keep_its_cached_verdict():
    r = Rollover(unknown_kid_interval=0)
    token = r.mint()
    await r.verify(token)
    kid = r.authority.signing_key.kid
    impostor = SigningKey.generate().jwk(None)
    fetch = r.entra.fetch

    async def republished(url):  # the same kid now names other key material
        doc = await fetch(url)
        if "keys" in doc:
            doc = {"keys": [{**impostor, "kid": kid, "x5t": kid}]}
        return doc

    r.keys._fetch_json = republished
    with pytest.raises(TokenRejected):
        await r.verify(r.mint(key=SigningKey.generate()))  # an unknown kid: the set is refreshed
    with pytest.raises(TokenRejected) as e:
        await r.verify(token)
    assert e.value.check == "signature"
