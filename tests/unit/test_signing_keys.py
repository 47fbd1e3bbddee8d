"""The key cache follows Microsoft's guidance: TTL, background refresh, rate-limited unknown-kid
refresh, last good set kept on failure, fail closed on a cold start."""

import asyncio
import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from nhi_gateway.identity.signing_keys import KeysUnavailable, KeyStore, UnknownKey, parse_jwks

META = "https://login.microsoftonline.com/t/v2.0/.well-known/openid-configuration"
ISSUER = "https://login.microsoftonline.com/t/v2.0"
JWKS = "https://login.microsoftonline.com/t/discovery/v2.0/keys"


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


def jwk(kid: str, **extra) -> dict:
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers()
    return {"kty": "RSA", "use": "sig", "kid": kid, "x5t": kid, "n": _b64(numbers.n), "e": _b64(numbers.e), **extra}


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeEntra:
    """Serves metadata and a JWKS that tests can change, break and count."""

    def __init__(self, kids=("k1",)):
        self.keys = [jwk(k) for k in kids]
        self.down = False
        self.jwks_fetches = 0

    async def fetch(self, url):
        await asyncio.sleep(0)
        if self.down:
            raise ConnectionError("connection refused")
        if url == META:
            return {"issuer": ISSUER, "jwks_uri": JWKS}
        if url == JWKS:
            self.jwks_fetches += 1
            return {"keys": list(self.keys)}
        raise AssertionError(url)


@pytest.fixture
def clock():
    return FakeClock()


async def test_known_kid_is_served_from_cache(clock):
    entra = FakeEntra()
    store = KeyStore(entra.fetch, clock=clock)
    for _ in range(5):
        assert (await store.key(META, ISSUER, "k1")).kid == "k1"
    assert entra.jwks_fetches == 1


async def test_flood_of_unknown_kids_refetches_at_most_once_per_interval(clock):
    entra = FakeEntra()
    store = KeyStore(entra.fetch, clock=clock, unknown_kid_interval=300)
    await store.key(META, ISSUER, "k1")
    for i in range(500):
        with pytest.raises(UnknownKey):
            await store.key(META, ISSUER, f"random-{i}")
    assert entra.jwks_fetches == 2  # the first load, then one refresh for the whole flood
    clock.now += 301
    with pytest.raises(UnknownKey):
        await store.key(META, ISSUER, "random-again")
    assert entra.jwks_fetches == 3


async def test_concurrent_flood_is_single_flight(clock):
    entra = FakeEntra()
    store = KeyStore(entra.fetch, clock=clock)
    await store.key(META, ISSUER, "k1")
    results = await asyncio.gather(*(store.key(META, ISSUER, f"x{i}") for i in range(100)),
                                   return_exceptions=True)
    assert all(isinstance(r, UnknownKey) for r in results)
    assert entra.jwks_fetches == 2


async def test_rotated_key_is_found_without_restart(clock):
    entra = FakeEntra(["old"])
    store = KeyStore(entra.fetch, clock=clock)
    await store.key(META, ISSUER, "old")
    entra.keys = [jwk("new")]
    assert (await store.key(META, ISSUER, "new")).kid == "new"


async def test_failed_refresh_keeps_last_good_set(clock):
    entra = FakeEntra()
    store = KeyStore(entra.fetch, clock=clock, refresh_after=3600, max_age=86400)
    await store.key(META, ISSUER, "k1")
    entra.down = True
    clock.now += 90000  # past max_age: a synchronous refresh is attempted and fails
    assert (await store.key(META, ISSUER, "k1")).kid == "k1"


async def test_background_refresh_after_refresh_interval(clock):
    entra = FakeEntra(["k1"])
    store = KeyStore(entra.fetch, clock=clock, refresh_after=3600)
    await store.key(META, ISSUER, "k1")
    entra.keys.append(jwk("k2"))
    clock.now += 3601
    assert (await store.key(META, ISSUER, "k1")).kid == "k1"  # served at once from cache
    for _ in range(10):
        await asyncio.sleep(0)
    assert entra.jwks_fetches == 2
    assert "k2" in {k for k in store._sets[META].keys}


async def test_cold_start_without_keys_fails_closed(clock):
    entra = FakeEntra()
    entra.down = True
    store = KeyStore(entra.fetch, clock=clock, retry_after_failure=10)
    with pytest.raises(KeysUnavailable):
        await store.key(META, ISSUER, "k1")
    for _ in range(20):  # and does not hammer the endpoint while it is down
        with pytest.raises(KeysUnavailable):
            await store.key(META, ISSUER, "k1")
    assert store.fetch_count == 1
    entra.down = False
    clock.now += 11
    assert (await store.key(META, ISSUER, "k1")).kid == "k1"


async def test_metadata_for_another_issuer_is_refused(clock):
    async def fetch(url):
        return {"issuer": "https://evil.example/", "jwks_uri": JWKS} if url == META else {"keys": [jwk("k1")]}

    store = KeyStore(fetch, clock=clock)
    with pytest.raises(KeysUnavailable):
        await store.key(META, ISSUER, "k1")


@pytest.mark.parametrize(
    "entry",
    [
        {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
        {"kty": "RSA", "use": "enc", "kid": "enc", "n": "AQAB", "e": "AQAB"},
        {"kty": "RSA", "kid": "x" * 500, "n": "AQAB", "e": "AQAB"},
        {"kty": "RSA", "kid": "weak", "n": _b64(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_numbers().n), "e": "AQAB"},
        "not-an-object",
    ],
)
def test_unusable_jwks_entries_are_ignored(entry):
    keys = parse_jwks({"keys": [entry, jwk("good")]})
    assert list(keys) == ["good"]


@pytest.mark.parametrize("doc", [{}, {"keys": "x"}, [], {"keys": []}])
def test_jwks_without_usable_keys_is_an_error(doc):
    with pytest.raises(ValueError):
        parse_jwks(doc)
