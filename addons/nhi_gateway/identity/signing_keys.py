"""Entra signing keys, cached the way Microsoft advises.

PyJWT's ``PyJWKClient`` refetches on every unknown ``kid`` (no rate limit), clears its cache when a
fetch fails and has no TTL, so the gateway owns its key cache:

- keys are cached per metadata document (that is, per tenant and token version) and per ``kid``;
- a set older than ``refresh_after`` is refreshed in the background while the old one keeps serving;
- a set older than ``max_age`` is refreshed before use, but a failed fetch keeps the last good set;
- an unknown ``kid`` triggers at most one refetch per ``unknown_kid_interval``, so a flood of tokens
  with random kids cannot turn the gateway into an amplifier against Entra;
- with no set at all (cold start) and no reachable endpoint, lookups fail with ``KeysUnavailable``,
  and failed fetches are themselves rate-limited by ``retry_after_failure``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import RSAAlgorithm

logger = logging.getLogger(__name__)

FetchJson = Callable[[str], Awaitable[dict]]

# Entra kids are 27 characters (base64url SHA-1); anything far longer is noise or an attack.
MAX_KID_LENGTH = 128
MAX_KEYS_PER_SET = 100
# Microsoft: refresh on an unknown kid, but at most once per 5 minutes (`nhi-gateway run
# --unknown-kid-refresh` changes it).
DEFAULT_UNKNOWN_KID_INTERVAL = 300.0


class KeysUnavailable(Exception):
    """No signing keys could be obtained: the gateway must answer 503, never let the request pass."""


class UnknownKey(Exception):
    """The token names a kid the issuer does not publish (after any allowed refresh)."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    public_key: RSAPublicKey
    issuer: str | None  # v2 JWKS entries carry an issuer (often the {tenantid} template); v1 do not


@dataclass
class _KeySet:
    keys: dict[str, SigningKey] = field(default_factory=dict)
    fetched_at: float | None = None
    last_attempt: float = float("-inf")
    last_failure: float = float("-inf")
    last_unknown_kid_refresh: float = float("-inf")
    fetches: int = 0  # attempts, for metrics
    failures: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    background: asyncio.Task | None = None


def parse_jwks(jwks: object) -> dict[str, SigningKey]:
    """Keep only RSA signature keys we can use; ignore (and never trust) anything else in the set."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ValueError("JWKS document has no 'keys' list")
    keys: dict[str, SigningKey] = {}
    for entry in jwks["keys"][:MAX_KEYS_PER_SET]:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA":
            continue
        if entry.get("use", "sig") != "sig":
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
            continue
        try:
            public_key = RSAAlgorithm.from_jwk(
                {"kty": "RSA", "n": entry["n"], "e": entry["e"]}
            )
        except Exception as e:  # a broken entry must not take the good ones down with it
            logger.warning("ignoring unusable JWKS entry kid=%s: %s", kid, e)
            continue
        if not isinstance(public_key, RSAPublicKey) or public_key.key_size < 2048:
            continue
        issuer = entry.get("issuer")
        keys[kid] = SigningKey(kid, public_key, issuer if isinstance(issuer, str) else None)
    if not keys:
        raise ValueError("JWKS document holds no usable RSA signing key")
    return keys


def _same_key(a: SigningKey | None, b: SigningKey | None) -> bool:
    if a is None or b is None:
        return False
    return a.issuer == b.issuer and a.public_key.public_numbers() == b.public_key.public_numbers()


class KeyStore:
    def __init__(
        self,
        fetch_json: FetchJson,
        *,
        refresh_after: float = 3600.0,
        max_age: float = 24 * 3600.0,
        unknown_kid_interval: float = DEFAULT_UNKNOWN_KID_INTERVAL,
        retry_after_failure: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch_json = fetch_json
        self.refresh_after = refresh_after
        self.max_age = max_age
        self.unknown_kid_interval = unknown_kid_interval
        self.retry_after_failure = retry_after_failure
        self._clock = clock
        self._sets: dict[str, _KeySet] = {}
        self.fetch_count = 0  # fetches of a metadata document + its JWKS; read by tests and metrics

    def clock(self) -> float:
        return self._clock()

    def held(self, metadata_url: str) -> tuple[int, float | None]:
        """How many keys are held for an issuer and their age in seconds (None: never fetched);
        a set that is missing or too old is fetched in the background (readiness asks this)."""
        keyset = self._sets.get(metadata_url)
        if keyset is None or keyset.fetched_at is None or self._clock() - keyset.fetched_at >= self.max_age:
            return (len(keyset.keys) if keyset else 0), None
        return len(keyset.keys), self._clock() - keyset.fetched_at

    def fetch_soon(self, metadata_url: str, expected_issuer: str) -> None:
        """Fetch an issuer's keys in the background (at start, so the first token does not wait)."""
        self._refresh_in_background(self._sets.setdefault(metadata_url, _KeySet()), metadata_url, expected_issuer)

    def keysets(self) -> list[tuple[str, _KeySet]]:
        """``(issuer, key set)`` for every issuer asked for so far (the metadata URL names it)."""
        suffix = "/.well-known/openid-configuration"
        return [(url[: -len(suffix)] if url.endswith(suffix) else url, ks) for url, ks in self._sets.items()]

    async def key(self, metadata_url: str, expected_issuer: str, kid: str) -> SigningKey:
        """The key ``kid`` from the set that ``metadata_url`` points to.

        Raises KeysUnavailable (-> 503) or UnknownKey (-> 401/407).
        """
        keyset = self._sets.setdefault(metadata_url, _KeySet())
        now = self._clock()
        if keyset.fetched_at is None or now - keyset.fetched_at >= self.max_age:
            await self._refresh(keyset, metadata_url, expected_issuer, forced=False)
        elif now - keyset.fetched_at >= self.refresh_after:
            self._refresh_in_background(keyset, metadata_url, expected_issuer)

        if keyset.fetched_at is None:
            raise KeysUnavailable(f"no signing keys could be fetched from {metadata_url}")

        found = keyset.keys.get(kid)
        if found is None and now - keyset.last_unknown_kid_refresh >= self.unknown_kid_interval:
            # A rotated key may be newer than our set; look once, then not again for a while.
            keyset.last_unknown_kid_refresh = now
            await self._refresh(keyset, metadata_url, expected_issuer, forced=True)
            found = keyset.keys.get(kid)
        if found is None:
            raise UnknownKey(f"signing key {kid[:MAX_KID_LENGTH]!r} is not published by the issuer")
        return found

    def _refresh_in_background(self, keyset: _KeySet, metadata_url: str, expected_issuer: str) -> None:
        if keyset.background is None or keyset.background.done():
            keyset.background = asyncio.create_task(
                self._refresh(keyset, metadata_url, expected_issuer, forced=False)
            )

    async def _refresh(
        self, keyset: _KeySet, metadata_url: str, expected_issuer: str, *, forced: bool
    ) -> None:
        async with keyset.lock:
            now = self._clock()
            if keyset.last_attempt > now - 0.001 and not forced:
                return  # another waiter fetched while we queued for the lock
            if now - keyset.last_failure < self.retry_after_failure:
                return  # the endpoint failed moments ago: answer from what we have, don't hammer it
            keyset.last_attempt = now
            self.fetch_count += 1
            keyset.fetches += 1
            try:
                keys = await self._fetch(metadata_url, expected_issuer)
            except Exception as e:
                keyset.failures += 1
                keyset.last_failure = self._clock()
                logger.warning(
                    "signing key fetch from %s failed (%s); %s",
                    metadata_url,
                    e,
                    "keeping the last good set" if keyset.keys else "no keys cached",
                )
                return
            # A key the set still publishes unchanged stays the same object, so verdicts cached on it
            # hold; a kid that is gone, or that now names other material, is no longer handed out.
            removed = sorted(kid for kid, k in keyset.keys.items() if not _same_key(k, keys.get(kid)))
            keyset.keys = {kid: keyset.keys[kid] if _same_key(keyset.keys.get(kid), k) else k
                           for kid, k in keys.items()}
            keyset.fetched_at = self._clock()
            logger.info("signing keys from %s: %s", metadata_url, ", ".join(sorted(keys)))
            if removed:
                logger.warning("signing keys withdrawn by %s: %s; tokens they signed are refused from now on, "
                               "cached or not", metadata_url, ", ".join(removed))

    async def _fetch(self, metadata_url: str, expected_issuer: str) -> dict[str, SigningKey]:
        metadata = await self._fetch_json(metadata_url)
        if not isinstance(metadata, dict):
            raise ValueError("metadata document is not a JSON object")
        issuer = metadata.get("issuer")
        # Multi-tenant metadata (common, organizations) publishes the {tenantid} template.
        if isinstance(issuer, str) and issuer not in (expected_issuer,) and "{tenantid}" not in issuer:
            raise ValueError(f"metadata issuer {issuer!r} is not {expected_issuer!r}")
        jwks_uri = metadata.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
            raise ValueError("metadata document has no https jwks_uri")
        return parse_jwks(await self._fetch_json(jwks_uri))
