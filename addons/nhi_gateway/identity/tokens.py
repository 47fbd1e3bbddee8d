"""Verifying Entra-issued access tokens as an OIDC relying party.

Every check that fails raises ``TokenRejected`` naming the check, so the caller can answer 401/407
with a JSON reason; ``KeysUnavailable`` means the gateway could not judge at all (503). Nothing else
may escape ``TokenVerifier.verify``: a token must never cause a 5xx through an unhandled exception.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from itertools import accumulate
from collections.abc import Callable
from dataclasses import dataclass

import jwt

from nhi_gateway.identity.principal import AuthMethod, Principal, TokenSource
from nhi_gateway.identity.token_form import NOT_COMPACT, is_compact_jws
from nhi_gateway.identity.signing_keys import KeyStore, KeysUnavailable, SigningKey, UnknownKey

logger = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 16 * 1024  # Entra tokens are 1-4 KiB even with many roles; bigger is an attack
ALGORITHMS = ["RS256"]  # Entra signs access tokens with RS256 only; never derived from the token
# Headers that carry or point at keys: a verifier that follows them lets the attacker pick the key.
KEY_CARRYING_HEADERS = ("jku", "x5u", "jwk", "x5c")
REQUIRED_TIME_CLAIMS = ("exp", "nbf", "iat")
CACHE_MARGIN_SECONDS = 5  # a cached verdict ends this long before the token's own expiry
# Limits on the JSON of the header and the payload, checked on the bytes before any parsing, so
# that the answer never depends on the json module or the recursion limit of one Python version.
# Entra's deepest claim (_claim_sources.src1.endpoint) sits three levels down; 200 group ids (the
# most Entra puts in a token) are about 7.8 KiB; no single string it writes comes near 4 KiB.
MAX_JSON_DEPTH = 8
MAX_CLAIM_BYTES = 8 * 1024  # one top-level member's value, as compact ASCII JSON
MAX_STRING_BYTES = 4 * 1024  # one JSON string, as written (escapes counted as written)
# Group overage markers: Entra writes them for users only; on an app-only token they are forged.
OVERAGE_CLAIMS = ("_claim_names", "_claim_sources", "hasgroups")

_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_KID = re.compile(r"^[A-Za-z0-9_\-+/=.]{1,128}$")
# The nonce is matched as the exact JSON member Entra writes; escapes would make the byte-level
# replacement ambiguous, so a nonce that needs them is refused.
_NONCE_MEMBER = re.compile(rb'"nonce"\s*:\s*"([^"\\]*)"')
# A JSON string as written: to its closing quote or, unterminated, to the end (json.loads refuses
# it later). The possessive quantifier never backtracks, so hostile quotes and escapes cost linear
# time. With the strings set aside, what is left cannot hide a bracket.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_A_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEP = [0] * 256
for _b in b"[{":
    _BRACKET_STEP[_b] = 1
for _b in b"]}":
    _BRACKET_STEP[_b] = -1


class TokenRejected(Exception):
    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check
        self.message = message


@dataclass(frozen=True)
class IssuerTrust:
    """One trusted issuer: its template and where its metadata lives, both with {tenantid}."""

    template: str
    metadata_template: str

    def issuer_for(self, tenant_id: str) -> str:
        return self.template.replace("{tenantid}", tenant_id)

    def metadata_for(self, tenant_id: str) -> str:
        return self.metadata_template.replace("{tenantid}", tenant_id)


@dataclass(frozen=True)
class TrustSettings:
    """What the policy says to trust. Compared by value, so a policy reload clears the cache."""

    issuers: tuple[IssuerTrust, ...]
    tenants: frozenset[str]  # lower-case GUIDs
    audiences: frozenset[str]
    leeway_seconds: int = 60


def _b64decode(segment: str) -> bytes:
    if not _B64URL.match(segment):
        raise TokenRejected("format", "token segment is not base64url")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as e:
        raise TokenRejected("format", "token segment is not base64url") from e


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def check_json_shape(data: bytes, what: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings larger than MAX_STRING_BYTES, reading
    the bytes only, before any parser runs (every step runs in C: a hostile token costs linear
    time). Top-level claims larger than MAX_CLAIM_BYTES are refused by :func:`_check_claim_sizes`."""
    strings = _JSON_STRING.findall(data)
    if strings and max(map(len, strings)) - 2 > MAX_STRING_BYTES:
        raise TokenRejected("claim_size", f"token {what} holds a string larger than {MAX_STRING_BYTES} bytes")
    brackets = _JSON_STRING.sub(b'""', data).translate(None, _NOT_A_BRACKET)
    if brackets and max(accumulate(map(_BRACKET_STEP.__getitem__, brackets))) > MAX_JSON_DEPTH:
        raise TokenRejected("nesting", f"token {what} nests deeper than {MAX_JSON_DEPTH} levels")


def _check_claim_sizes(members: dict, what: str) -> None:
    """Once the nesting is known to be shallow, json.loads gives the same members on every Python:
    each is measured as compact JSON."""
    for name, value in members.items():
        if not isinstance(value, str | int | float | bool) and value is not None:
            # ASCII-escaped: a lone surrogate (valid JSON, not UTF-8) is measured, not raised on.
            size = len(json.dumps(value, separators=(",", ":")))
            if size > MAX_CLAIM_BYTES:
                raise TokenRejected("claim_size", f"token {what} member {name[:40]!r} is larger than "
                                                  f"{MAX_CLAIM_BYTES} bytes")


def _no_duplicate_members(pairs: list[tuple[str, object]]) -> dict:
    # json.loads keeps the last of two equal names; another parser may keep the first. A token
    # that says two things about one claim (or one header member) is refused, never read.
    out: dict = {}
    for name, value in pairs:
        if name in out:
            raise TokenRejected("duplicate_member", f"token names member {name[:40]!r} more than once")
        out[name] = value
    return out


def _json_object(data: bytes, what: str) -> dict:
    check_json_shape(data, what)
    try:
        value = json.loads(data, object_pairs_hook=_no_duplicate_members)
    except TokenRejected as e:
        raise TokenRejected(e.check, e.message.replace("token names", f"token {what} names")) from None
    except (ValueError, RecursionError) as e:
        raise TokenRejected("format", f"token {what} is not JSON") from e
    if not isinstance(value, dict):
        raise TokenRejected("format", f"token {what} is not a JSON object")
    _check_claim_sizes(value, what)
    return value


def graph_signing_input_header(header_bytes: bytes) -> bytes:
    """Microsoft Graph tokens are signed over a header whose nonce is SHA-256(nonce), base64url.

    The wire header carries the original nonce; only that value changes, byte for byte.
    """
    matches = list(_NONCE_MEMBER.finditer(header_bytes))
    if len(matches) != 1:
        raise TokenRejected("header", "token header nonce is malformed")
    m = matches[0]
    hashed = _b64encode(hashlib.sha256(m.group(1)).digest()).encode("ascii")
    return header_bytes[: m.start(1)] + hashed + header_bytes[m.end(1) :]


def _check_header(header: dict) -> str:
    alg = header.get("alg")
    if alg != "RS256":
        raise TokenRejected("algorithm", f"token algorithm {str(alg)[:20]!r} is not allowed; only RS256")
    for name in KEY_CARRYING_HEADERS:
        if name in header:
            raise TokenRejected("header", f"token header '{name}' is not accepted: keys come only from the issuer's JWKS")
    if "crit" in header:
        raise TokenRejected("header", "token header 'crit' names extensions this gateway does not support")
    if "typ" in header and str(header["typ"]).upper() not in ("JWT", "AT+JWT"):
        raise TokenRejected("header", "token type is not JWT")
    kid = header.get("kid")
    if not isinstance(kid, str) or not _KID.match(kid):
        raise TokenRejected("kid", "token header has no usable 'kid'")
    return kid


def _strings(claims: dict, name: str) -> tuple[str, ...]:
    value = claims.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokenRejected("claims", f"claim '{name}' must be a list of strings")
    return tuple(value)


def _check_claim_types(claims: dict) -> None:
    # PyJWT raises TypeError/OverflowError (not PyJWTError) for exp=1e400, [1] or null: check first.
    for name in REQUIRED_TIME_CLAIMS:
        value = claims.get(name)
        if value is None:
            raise TokenRejected("lifetime", f"token has no '{name}' claim")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**40:
            raise TokenRejected("claims", f"claim '{name}' must be a NumericDate integer")
    for name in ("aud", "iss", "tid", "oid"):
        if not isinstance(claims.get(name), str):
            raise TokenRejected("claims", f"claim '{name}' must be a string")
    if not _GUID.match(claims["oid"]):
        raise TokenRejected("claims", "claim 'oid' must be a GUID")
    idtyp = claims.get("idtyp")
    if idtyp is not None and not isinstance(idtyp, str):
        raise TokenRejected("claims", "claim 'idtyp' must be a string")
    if "scp" in claims and not isinstance(claims["scp"], str):
        raise TokenRejected("claims", "claim 'scp' must be a string")


def _check_consistency(claims: dict) -> None:
    """Refuse tokens whose claims contradict each other, whoever signed them: an app-only token
    carries no delegated scopes and no group overage markers (Entra writes those for users only,
    and an overage pointer is never followed)."""
    idtyp = claims.get("idtyp")
    if idtyp == "app" and "scp" in claims:
        raise TokenRejected("contradiction", "token says it is app-only (idtyp: app) and carries delegated scopes (scp)")
    if _is_app_only(claims):
        found = [name for name in OVERAGE_CLAIMS if name in claims]
        if found:
            raise TokenRejected("contradiction", f"app-only token carries group overage markers "
                                                 f"({', '.join(found)}), which Entra writes for users only")


def _is_app_only(claims: dict) -> bool:
    idtyp = claims.get("idtyp")
    return idtyp == "app" if isinstance(idtyp, str) else not claims.get("scp")


@dataclass(frozen=True)
class _Verdict:
    """A verified token's principal and the key that verified it (a verdict lives no longer)."""

    principal: Principal
    metadata_url: str
    issuer: str
    key: SigningKey


class TokenVerifier:
    def __init__(
        self,
        keys: KeyStore,
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
    ) -> None:
        self.keys = keys
        self._clock = clock
        self._cache: OrderedDict[tuple, _Verdict] = OrderedDict()
        self.cache_size = cache_size
        self.signature_checks = 0  # how many tokens were checked cryptographically (for tests and bench)

    async def verify(self, token: str, source: TokenSource, trust: TrustSettings) -> Principal:
        """A Principal for ``token``, or TokenRejected / KeysUnavailable."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
            raise TokenRejected("size", f"token is larger than {MAX_TOKEN_BYTES} bytes")
        if not is_compact_jws(token):  # before the cache and any library: see identity/token_form.py
            raise TokenRejected("format", NOT_COMPACT)
        cache_key = (hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest(), trust)
        now = self._clock()
        cached = self._cache.get(cache_key)
        if cached is not None:
            if cached.principal.expires_at - CACHE_MARGIN_SECONDS > now and await self._key_still_published(cached):
                self._cache.move_to_end(cache_key)
                p = cached.principal
                return p if p.token_sources == (source,) else p.with_sources((source,))
            del self._cache[cache_key]

        principal, verified_by = await self._verify_uncached(token, source, trust, now)
        self._cache[cache_key] = _Verdict(principal, *verified_by)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return principal

    async def _key_still_published(self, verdict: _Verdict) -> bool:
        """A cached verdict lasts only as long as the key that verified it: the key store's lookup
        (which refreshes the set on its schedule) must still hand out that very key. A kid that a
        refresh dropped (an emergency rollover) or republished with other material sends the token
        back to a full verification, which refuses it."""
        try:
            key = await self.keys.key(verdict.metadata_url, verdict.issuer, verdict.key.kid)
        except UnknownKey:
            return False
        return key is verdict.key

    async def _verify_uncached(
        self, token: str, source: TokenSource, trust: TrustSettings, now: float
    ) -> tuple[Principal, tuple[str, str, SigningKey]]:
        if not token.isascii():
            raise TokenRejected("format", "token is not ASCII")
        parts = token.split(".")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise TokenRejected("format", "token is not a JWT (header.payload.signature)")
        header_bytes = _b64decode(parts[0])
        header = _json_object(header_bytes, "header")
        kid = _check_header(header)  # before the signature: "alg: none" is named as what it is
        if not parts[2]:
            raise TokenRejected("format", "token is not signed")
        claims = _json_object(_b64decode(parts[1]), "payload")
        _check_claim_types(claims)
        _check_consistency(claims)

        tenant_id = claims["tid"].lower()
        if not _GUID.match(tenant_id) or tenant_id not in trust.tenants:
            raise TokenRejected("tenant", "token tenant is not on the allow-list")
        issuer = next((i for i in trust.issuers if i.issuer_for(tenant_id) == claims["iss"]), None)
        if issuer is None:
            raise TokenRejected("issuer", "token issuer is not trusted for its tenant")
        expected_issuer = issuer.issuer_for(tenant_id)

        metadata_url = issuer.metadata_for(tenant_id)
        try:
            key = await self.keys.key(metadata_url, expected_issuer, kid)
        except UnknownKey as e:
            raise TokenRejected("kid", str(e)) from e
        # KeysUnavailable propagates: the caller answers 503 (fail closed, and says why).

        if key.issuer is not None and key.issuer.replace("{tenantid}", tenant_id) != expected_issuer:
            raise TokenRejected("issuer", "the signing key belongs to another issuer")

        signed_header = parts[0]
        if "nonce" in header:
            signed_header = _b64encode(graph_signing_input_header(header_bytes))
        self.signature_checks += 1
        try:
            jwt.decode(
                f"{signed_header}.{parts[1]}.{parts[2]}",
                key.public_key,
                algorithms=ALGORITHMS,
                audience=sorted(trust.audiences),
                issuer=expected_issuer,
                leeway=trust.leeway_seconds,
                options={"require": ["exp", "nbf", "iat", "iss", "aud"], "strict_aud": False},
            )
        except jwt.ExpiredSignatureError as e:
            raise TokenRejected("lifetime", "token has expired") from e
        except jwt.ImmatureSignatureError as e:
            raise TokenRejected("lifetime", "token is not yet valid (nbf/iat in the future)") from e
        except jwt.InvalidAudienceError as e:
            raise TokenRejected("audience", "token audience is not accepted by this gateway") from e
        except jwt.InvalidIssuerError as e:
            raise TokenRejected("issuer", "token issuer is not trusted") from e
        except jwt.InvalidSignatureError as e:
            raise TokenRejected("signature", "token signature does not verify") from e
        except jwt.PyJWTError as e:
            raise TokenRejected("token", f"token is invalid: {e}") from e
        except Exception as e:  # never let a token turn into a 5xx
            raise TokenRejected("token", "token could not be verified") from e

        return principal_from_claims(claims, source, expected_issuer), (metadata_url, expected_issuer, key)


def principal_from_claims(claims: dict, source: TokenSource, issuer: str) -> Principal:
    version = claims.get("ver") if isinstance(claims.get("ver"), str) else ""
    if version == "2.0":
        app_id, acr = claims.get("azp"), claims.get("azpacr")
    else:
        app_id, acr = claims.get("appid"), claims.get("appidacr")
    if not isinstance(app_id, str):
        raise TokenRejected("claims", "token names no client application (appid/azp)")
    scopes = claims.get("scp", "")
    if not isinstance(scopes, str):
        raise TokenRejected("claims", "claim 'scp' must be a string")
    app_only = _is_app_only(claims)
    display = claims.get("app_displayname")
    mirid = claims.get("xms_mirid")
    return Principal(
        tenant_id=claims["tid"].lower(),
        object_id=claims["oid"].lower(),
        app_id=app_id.lower(),
        display_name=display if isinstance(display, str) else "",
        roles=_strings(claims, "roles"),
        scopes=tuple(scopes.split()),
        # Overage (_claim_names) and app-only tokens carry no usable groups claim.
        groups=tuple(g.lower() for g in _strings(claims, "groups")),
        auth_method=AuthMethod.from_acr(acr),
        app_only=app_only,
        token_sources=(source,),
        issuer=issuer,
        token_version=version,
        managed_identity=mirid if isinstance(mirid, str) else "",
        expires_at=claims["exp"],
        token_id=claims.get("uti") if isinstance(claims.get("uti"), str) else "",
    )


__all__ = [
    "IssuerTrust",
    "KeysUnavailable",
    "TokenRejected",
    "TokenVerifier",
    "TrustSettings",
    "check_json_shape",
    "graph_signing_input_header",
    "principal_from_claims",
]
