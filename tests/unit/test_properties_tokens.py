"""Hostile input, the token parser: nothing a token holds can turn into a 5xx.

``TokenVerifier.verify`` may only return a :class:`Principal` or raise :class:`TokenRejected`
(401/407) or :class:`KeysUnavailable` (503). Inputs: random text; real Entra-shaped tokens with
one bit flipped in one segment (as decoded bytes: must be refused) or one character changed (as
text: refused, or the same bytes in another base64 spelling); tokens whose header and claims hold
random JSON values of random types and sizes, *correctly signed* by the issuer's key, so the
checks after the signature are reached too; correctly signed payloads that are not JSON objects
at all (numbers too large for a float, duplicate members, deep nesting, invalid UTF-8); and a key
endpoint that answers random documents. A token that verifies must satisfy every trust setting.

Then the same tokens go through the gateway's addon chain (as ``tests/unit/test_chain.py`` builds
it), in ``Authorization: Bearer`` and in the proxy credentials of the CONNECT, next to random
``Proxy-Authorization`` values: the client's status is never 5xx except 503 for unavailable keys,
and a request that is refused never reaches the upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.test import tflow

from nhi_gateway.lookalike.minting import EntraAuthority
from nhi_gateway.lookalike.pki import SigningKey
from nhi_gateway.identity.principal import Principal, TokenSource
from nhi_gateway.identity.signing_keys import KeysUnavailable, KeyStore
from nhi_gateway.identity.tokens import MAX_TOKEN_BYTES, TokenRejected, TokenVerifier, TrustSettings
from nhi_gateway.addons.identity import Identity

from ..support import chain
from ..support.entra import ENTRA_ISSUERS, basic
from ..support.entra import Entra as EntraStandIn
from ..support.entra import b64url as b64
from ..support.entra import unb64url as unb64

TENANT = chain.TENANT
APP, OID = chain.READER_APP, chain.READER_OID
TRUST = TrustSettings(
    issuers=ENTRA_ISSUERS,
    tenants=frozenset({TENANT}),
    audiences=frozenset({"https://graph.microsoft.com", "00000003-0000-0000-c000-000000000000"}),
    leeway_seconds=60,
)
AUTHORITY = EntraAuthority([SigningKey.generate()])


def mint(**kw) -> str:
    args = dict(tenant_id=TENANT, app_id=APP, object_id=OID, display_name="mcp-directory", roles=("User.Read.All",))
    args.update(kw)
    return AUTHORITY.mint_app_token(**args)


def sign_raw(header: bytes, payload: bytes) -> str:
    """A token over exactly these header and payload bytes, with a valid RS256 signature."""
    signing_input = f"{b64(header)}.{b64(payload)}".encode()
    signature = AUTHORITY.signing_key.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode()}.{b64(signature)}"


def _dump(value: dict) -> bytes:
    try:  # Entra's compact UTF-8, as the look-alike writes it
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: the same JSON, escaped
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def sign(header: dict, claims: dict) -> str:
    """As Entra signs (see ``EntraAuthority._sign``), for headers and claims of any content:
    a string ``nonce`` is signed as its hash (Graph's quirk), the wire keeps the nonce."""
    wire, payload = _dump(header), _dump(claims)
    signed = wire
    nonce = header.get("nonce")
    if isinstance(nonce, str):
        digest = hashlib.sha256(nonce.encode("utf-8", "surrogatepass")).digest()
        signed = _dump({**header, "nonce": b64(digest)})
    signing_input = f"{b64(signed)}.{b64(payload)}".encode()
    signature = AUTHORITY.signing_key.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{b64(wire)}.{b64(payload)}.{b64(signature)}"


def Entra(mode: str = "up", garbage: object = None) -> EntraStandIn:  # noqa: N802  (reads as the class)
    """login.microsoftonline.com serving AUTHORITY's keys, or down, or hostile; any other URL is not
    served (a connection error, as the verifier may meet)."""
    return EntraStandIn(AUTHORITY, mode, garbage, unknown=ConnectionError)


async def judge(token, entra: Entra | None = None, source: TokenSource = TokenSource.BEARER) -> Principal | None:
    """Verify; None when refused. Any exception other than the two allowed fails the property."""
    verifier = TokenVerifier(KeyStore((entra or Entra()).fetch))
    try:
        principal = await verifier.verify(token, source, TRUST)
    except (TokenRejected, KeysUnavailable):
        return None
    assert_trusted(token, principal)
    return principal


def assert_trusted(token: str, p: Principal) -> None:
    """What an accepted token must have been: every check of the trust settings holds."""
    claims = json.loads(unb64(token.split(".")[1]))
    now = time.time()
    assert p.tenant_id in TRUST.tenants
    assert claims["iss"] in {i.issuer_for(p.tenant_id) for i in TRUST.issuers}
    aud = claims["aud"]
    assert (aud if isinstance(aud, list) else [aud]) and set(aud if isinstance(aud, list) else [aud]) & TRUST.audiences
    assert claims["exp"] > now - TRUST.leeway_seconds
    assert claims["nbf"] <= now + TRUST.leeway_seconds and claims["iat"] <= now + TRUST.leeway_seconds
    assert isinstance(p.object_id, str) and isinstance(p.app_id, str)


# --- values of every type and size ---------------------------------------------------------------

HUGE = st.sampled_from(["x" * 5000, 2**64, -(2**63) - 1, 10**30, 2**40, 2**40 - 1, 1e308, -1e308, 0.5, -1,
                        "\u0000", "\ud800", "é" * 100, ["User.Read.All"] * 300, {"a": {"b": {"c": []}}}])
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=30), HUGE,
              st.sampled_from([TENANT, APP, OID, "RS256", "none", "HS256", "2", "app", "1.0", "2.0",
                               "https://graph.microsoft.com", f"https://sts.windows.net/{TENANT}/"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
CLAIMS = ["aud", "iss", "iat", "nbf", "exp", "appid", "azp", "appidacr", "azpacr", "idtyp", "oid", "sub", "tid",
          "roles", "scp", "groups", "ver", "uti", "app_displayname", "xms_mirid", "_claim_names", "_claim_sources"]
HEADERS = ["typ", "alg", "kid", "x5t", "nonce", "jku", "x5u", "jwk", "x5c", "crit", "cty", "zip", "enc"]


def valid_parts(version: str) -> tuple[dict, dict]:
    token = mint(version=version)
    h, p, _ = token.split(".")
    return json.loads(unb64(h)), json.loads(unb64(p))


@st.composite
def signed_edits(draw) -> str:
    """A real token's header and claims with a few members set to random values or removed,
    signed again with the issuer's key: only the checks after the signature can refuse it."""
    header, claims = valid_parts(draw(st.sampled_from(["1.0", "2.0"])))
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["claims", "claims", "header"]))
        doc, names = (claims, CLAIMS) if target == "claims" else (header, HEADERS)
        name = draw(st.one_of(st.sampled_from(names), st.text(max_size=6)))
        if draw(st.integers(0, 4)) == 0:
            doc.pop(name, None)
        else:
            doc[name] = draw(JSON_VALUES)
    return sign(header, claims)


@st.composite
def bit_flips(draw) -> tuple[str, str]:
    token = mint(version=draw(st.sampled_from(["1.0", "2.0"])))
    parts = token.split(".")
    i = draw(st.integers(0, 2))
    data = bytearray(unb64(parts[i]))
    bit = draw(st.integers(0, len(data) * 8 - 1))
    data[bit // 8] ^= 1 << (bit % 8)
    parts[i] = b64(bytes(data))
    return token, ".".join(parts)


B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@st.composite
def char_edits(draw) -> tuple[str, str]:
    token = mint(version=draw(st.sampled_from(["1.0", "2.0"])))
    i = draw(st.integers(0, len(token) - 1))
    new = draw(st.one_of(st.sampled_from(B64_CHARS), st.sampled_from(list("=.+/ \x00é%")), st.just("")))
    return token, token[:i] + new + token[i + 1:]


def same_bytes(a: str, b: str) -> bool:
    try:
        return [unb64(x) for x in a.split(".")] == [unb64(x) for x in b.split(".")]
    except ValueError:
        return False


RAW_PAYLOADS = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b'{"exp":1e400}', b'{"exp":-1e400,"nbf":1,"iat":1}', b"[1,2]", b'"claims"', b"null", b"1e999",
                     b'{"tid":"a","tid":"b"}', b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
                     b'{"exp":NaN}', b'{"exp":Infinity}', b"\xff\xfe{}", b'{"iss":"\\ud800"}', b"\xef\xbb\xbf{}",
                     b'{"exp":' + b"9" * 5000 + b"}"]),
)
RAW_HEADERS = st.sampled_from([
    None,  # a valid header for the authority's key (nonce-less)
    b'{"alg":"RS256"}', b'{"alg":"RS256","kid":null}', b"[]", b'{"alg":"RS256","kid":' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"alg":"RS256","kid":"x","nonce":"a\\"b"}', b'{"alg":"RS256","kid":"x","nonce":"a","nonce":"b"}',
    b"\xff", b'{"alg":"none","kid":"x"}', b'{"alg":"RS256","kid":"' + b"k" * 10000 + b'"}',
])


# --- the verifier --------------------------------------------------------------------------------


@settings(max_examples=200)
@given(st.text(max_size=200))
async def test_random_text_is_refused(text):
    assert await judge(text) is None


@settings(max_examples=150)
@given(st.lists(st.text(alphabet=B64_CHARS, max_size=30), min_size=1, max_size=5).map(".".join))
async def test_random_dotted_base64_is_refused(text):
    assert await judge(text) is None


@settings(max_examples=200)
@given(bit_flips())
async def test_a_flipped_bit_in_any_segment_is_refused(pair):
    _, flipped = pair
    assert await judge(flipped) is None


@settings(max_examples=200)
@given(char_edits())
async def test_an_edited_character_is_refused_unless_the_bytes_are_the_same(pair):
    original, edited = pair
    if await judge(edited) is not None:
        # base64 without padding has spare bits in the last character of a segment: a different
        # spelling of the same signed bytes. The signature still covers every byte that counts.
        assert same_bytes(original, edited), edited


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(signed_edits())
async def test_signed_tokens_with_random_header_and_claims_never_raise(token):
    await judge(token)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(RAW_HEADERS, RAW_PAYLOADS)
async def test_signed_payloads_that_are_not_claims_are_refused(header, payload):
    if header is None:
        header = json.dumps({"typ": "JWT", "alg": "RS256", "kid": AUTHORITY.signing_key.kid}).encode()
    assert await judge(sign_raw(header, payload)) is None


@pytest.mark.parametrize("size", [MAX_TOKEN_BYTES + 1, 10 * MAX_TOKEN_BYTES])
async def test_an_oversized_token_is_refused_before_parsing(size):
    token = mint(extra_claims={"pad": "x" * size})
    with pytest.raises(TokenRejected) as e:
        await TokenVerifier(KeyStore(Entra("down").fetch)).verify(token, TokenSource.BEARER, TRUST)
    assert e.value.check == "size"


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["down", "garbage-keys", "garbage-discovery"]), JSON_VALUES,
       st.one_of(st.builds(mint), signed_edits()))
async def test_an_unreachable_or_hostile_key_endpoint_never_raises(mode, garbage, token):
    """Keys unreachable at a cold start: 503 (KeysUnavailable). A key endpoint answering random
    documents: refused or 503, never an exception, never a token accepted without a real key."""
    principal = await judge(token, Entra(mode, garbage))
    assert principal is None


async def test_a_valid_token_still_verifies():
    """The baseline the properties above differ from."""
    for version in ("1.0", "2.0"):
        assert (await judge(mint(version=version))).object_id == OID


# --- through the addon chain ---------------------------------------------------------------------

PROXY_HEADERS = st.one_of(
    st.builds(lambda user, token: basic(user, token), st.text(alphabet=B64_CHARS + ":", max_size=8),
              st.one_of(st.builds(mint), signed_edits(), bit_flips().map(lambda p: p[1]), st.text(max_size=40))),
    st.sampled_from(["Basic", "Basic ", "Basic !!!", "Basic " + b64(b"no-colon"), "Basic " + b64(b"\xff\xfe:\xff"),
                     "Bearer x", "basic " + b64(b"a:b"), "Basic " + "A" * 20000, "Negotiate abc", ""]),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=30),
)
BEARERS = st.one_of(st.none(), st.builds(mint), signed_edits(), bit_flips().map(lambda p: p[1]),
                    char_edits().map(lambda p: p[1]), st.text(alphabet=B64_CHARS + ". ", max_size=60))


@pytest.fixture
async def gw(tmp_path):
    """One gateway for all the examples of a test, as ``test_chain`` builds it."""
    with chain.running_gateway(tmp_path, AUTHORITY, fetch=Entra().fetch) as gateway:
        yield gateway


@settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(["up", "up", "down"]), proxy=st.one_of(st.none(), PROXY_HEADERS), bearer=BEARERS)
async def test_no_token_makes_the_gateway_answer_5xx(gw, mode, proxy, bearer):
    # A fresh verifier per example: "down" is then a cold start (no keys cached yet).
    gw.addon(Identity).verifier = TokenVerifier(KeyStore(Entra(mode).fetch))
    chain.escaped.clear()
    client = tflow.tclient_conn()
    connect = await chain.connect(gw.chain, client, proxy_header=proxy)
    status, sent = None, None
    if connect.response is not None:
        status = connect.response.status_code
    else:
        f = chain.graph_request(client, bearer=bearer)
        sent = await chain.exchange(gw.chain, f, chain.graph_json(chain.USERS))
        status = f.response.status_code if f.response is not None else None
        if sent is not None:
            assert status == 200 and chain.SECRET_MAIL.encode() not in f.response.content
    assert not chain.escaped, f"an addon hook raised: {chain.escaped!r}"
    assert status is not None
    assert status < 500 or status == 503, status
    if status == 503:
        body = json.loads((connect.response or f.response).content)
        assert body["error"]["innerError"]["nhi-gateway"]["check"] == "keys_unavailable", body
    if status != 200:
        assert sent is None, "a refused request reached the upstream"


def test_the_chain_properties_start_from_a_request_that_passes(tmp_path):
    """The baseline: with a valid token in either place, the request is allowed and forwarded."""

    async def run():
        with chain.running_gateway(tmp_path, AUTHORITY, fetch=Entra().fetch) as gw:
            for proxy, bearer in ((basic("a", mint()), None), (None, mint())):
                client = tflow.tclient_conn()
                c = await chain.connect(gw.chain, client, proxy_header=proxy)
                assert c.response is None
                f = chain.graph_request(client, bearer=bearer)
                assert await chain.exchange(gw.chain, f, chain.graph_json(chain.USERS)) is not None
                assert f.response.status_code == 200

    asyncio.run(run())
