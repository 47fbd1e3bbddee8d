"""Group membership of a caller, resolved by the gateway with a Graph credential of its own.

Service principals carry no ``groups`` claim in app-only tokens, and a token whose subject is in
more than 200 groups carries ``_claim_names``/``_claim_sources`` instead (overage). Either way the
gateway asks Graph itself: ``POST /v1.0/servicePrincipals/{oid}/getMemberGroups`` (transitive),
with an app token it obtains for its own credential. It never presents the caller's token (the
caller's permissions must not decide what the gateway can learn about the caller) and never calls
an endpoint written in the token (``_claim_sources`` is chosen by whoever minted it; only the
token's ``oid`` and ``tid`` are used, and only after the signature was verified).

A lookup that fails raises :class:`GroupLookupFailed`; the membership addon refuses (503) only the
requests whose decision could depend on groups (:class:`GroupRules`), so a Graph outage does not
stop traffic that no group rule could affect.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nhi_gateway.policy.operation import Operation
from nhi_gateway.policy.objects import object_key
from nhi_gateway.policy.model import OperationMatch, Policy, PrincipalMatch
from nhi_gateway.identity.principal import Principal

logger = logging.getLogger(__name__)

LOGIN_URL = "https://login.microsoftonline.com"
GRAPH_URL = "https://graph.microsoft.com"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

DEFAULT_TTL = 300  # seconds a membership answer is reused; a removal from a group counts after this
DEFAULT_CACHE_SIZE = 10_000  # principals whose groups are kept
TOKEN_REFRESH_MARGIN = 300  # the gateway's own Graph token is renewed this long before it expires
ASSERTION_LIFETIME = 600  # Entra accepts client assertions of 5 to 10 minutes

# Where the gateway's own credential is configured (the secret only ever in the environment:
# command lines are visible to every user of the machine).
ENV_CLIENT_ID = "NHI_GRAPH_CLIENT_ID"
ENV_TENANT_ID = "NHI_GRAPH_TENANT_ID"
ENV_CLIENT_SECRET = "NHI_GRAPH_CLIENT_SECRET"
ENV_CERTIFICATE = "NHI_GRAPH_CERTIFICATE"
ENV_CERTIFICATE_KEY = "NHI_GRAPH_CERTIFICATE_KEY"

_GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class GroupLookupFailed(Exception):
    """The gateway could not learn a principal's groups; decisions that need them fail closed."""


class CredentialError(ValueError):
    """The gateway's Graph credential is configured wrongly; the gateway does not start."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- the gateway's own credential --------------------------------------------------------------


@dataclass(frozen=True)
class CertificateCredential:
    """A certificate registered on the gateway's app, and its private key (for client assertions)."""

    private_key: rsa.RSAPrivateKey = field(repr=False)
    x5t: str  # base64url SHA-1 of the certificate's DER: how Entra names the certificate
    x5t_s256: str
    path: str = ""

    @classmethod
    def load(cls, cert_path: str | Path, key_path: str | Path | None = None) -> CertificateCredential:
        """From PEM files; the key may sit in the certificate's file. Raises CredentialError."""
        try:
            cert_pem = Path(cert_path).read_bytes()
            key_pem = Path(key_path).read_bytes() if key_path else cert_pem
        except OSError as e:
            raise CredentialError(f"cannot read the Graph certificate: {e.strerror or e}: {e.filename}") from e
        try:
            certificate = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as e:
            raise CredentialError(f"{cert_path}: no PEM certificate found") from e
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise CredentialError(
                f"{key_path or cert_path}: no unencrypted PEM private key found "
                f"(pass the key file with --graph-certificate-key or {ENV_CERTIFICATE_KEY})"
            ) from e
        if not isinstance(key, rsa.RSAPrivateKey):
            raise CredentialError(f"{key_path or cert_path}: the key must be RSA (Entra client assertions use RS256)")
        if key.public_key().public_numbers() != certificate.public_key().public_numbers():
            raise CredentialError(f"{key_path or cert_path}: the private key does not belong to {cert_path}")
        der = certificate.public_bytes(serialization.Encoding.DER)
        return cls(
            private_key=key,
            x5t=_b64url(hashlib.sha1(der).digest()),  # noqa: S324 - Entra's certificate thumbprint
            x5t_s256=_b64url(hashlib.sha256(der).digest()),
            path=str(cert_path),
        )


@dataclass(frozen=True)
class GraphCredential:
    """The gateway's own app registration: a client secret or, better, a certificate."""

    tenant_id: str
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    certificate: CertificateCredential | None = None
    authority: str = LOGIN_URL

    def __post_init__(self) -> None:
        for name in ("tenant_id", "client_id"):
            if not _GUID.match(getattr(self, name)):
                raise CredentialError(f"the Graph credential's {name} must be a lower-case GUID")
        if (self.client_secret is None) == (self.certificate is None):
            raise CredentialError("the Graph credential needs exactly one of a client secret or a certificate")

    @property
    def token_endpoint(self) -> str:
        return f"{self.authority}/{self.tenant_id}/oauth2/v2.0/token"

    @property
    def kind(self) -> str:
        return "certificate" if self.certificate else "client secret"

    def token_request(self, now: float) -> dict[str, str]:
        """The client-credentials form for a Graph token (holds the secret or a fresh assertion)."""
        form = {"grant_type": "client_credentials", "client_id": self.client_id, "scope": GRAPH_SCOPE}
        if self.certificate is not None:
            form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
            form["client_assertion"] = self.client_assertion(now)
        else:
            form["client_secret"] = self.client_secret or ""
        return form

    def client_assertion(self, now: float) -> str:
        cert = self.certificate
        if cert is None:
            raise CredentialError("no certificate configured")
        issued = int(now)
        claims = {
            "aud": self.token_endpoint,
            "iss": self.client_id,
            "sub": self.client_id,
            "jti": str(uuid.uuid4()),
            "nbf": issued,
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME,
        }
        headers = {"x5t": cert.x5t, "x5t#S256": cert.x5t_s256}
        return jwt.encode(claims, cert.private_key, algorithm="RS256", headers=headers)


def credential_from_settings(
    *,
    client_id: str | None = None,
    tenant_id: str | None = None,
    certificate: str | Path | None = None,
    certificate_key: str | Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> GraphCredential | None:
    """The credential from command-line values, falling back to the environment; None when
    nothing is configured. Raises CredentialError naming what is missing."""
    client_id = client_id or environ.get(ENV_CLIENT_ID) or None
    tenant_id = tenant_id or environ.get(ENV_TENANT_ID) or None
    certificate = certificate or environ.get(ENV_CERTIFICATE) or None
    certificate_key = certificate_key or environ.get(ENV_CERTIFICATE_KEY) or None
    secret = environ.get(ENV_CLIENT_SECRET) or None
    if not any((client_id, tenant_id, certificate, certificate_key, secret)):
        return None
    if not client_id:
        raise CredentialError(f"a Graph credential is partly configured: set --graph-client-id or {ENV_CLIENT_ID}")
    if not tenant_id:
        raise CredentialError(f"the Graph credential needs its tenant: set --graph-tenant-id or {ENV_TENANT_ID}")
    if certificate_key and not certificate:
        raise CredentialError(f"a certificate key was given without --graph-certificate / {ENV_CERTIFICATE}")
    if certificate and secret:
        raise CredentialError(
            f"both a certificate and {ENV_CLIENT_SECRET} are set for the Graph credential; keep one "
            "(the certificate: a static secret is what this gateway exists to retire)"
        )
    if not certificate and not secret:
        raise CredentialError(
            f"the Graph credential needs a certificate (--graph-certificate or {ENV_CERTIFICATE}) "
            f"or a client secret in {ENV_CLIENT_SECRET}"
        )
    cert = CertificateCredential.load(certificate, certificate_key) if certificate else None
    return GraphCredential(
        tenant_id=tenant_id.strip().lower(),
        client_id=client_id.strip().lower(),
        client_secret=secret,
        certificate=cert,
    )


# --- which requests depend on groups -----------------------------------------------------------


class GroupRules:
    """The rules of one policy that name ``groups``, read without that key: if none of them could
    match a request whatever the caller's groups, the decision does not depend on groups."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._rules: tuple[tuple[PrincipalMatch, tuple[OperationMatch, ...]], ...] = tuple(
            (replace(rule.when, groups=None), rule.operations)
            for rule in policy.rules
            if rule.when.groups is not None
        )

    def __bool__(self) -> bool:
        return bool(self._rules)

    def could_apply(self, principal: Principal | None, op: Operation) -> bool:
        if principal is None or not self._rules:
            return False
        if op.segments and op.segments[-1] == "$batch":
            # The inner requests of a batch are judged one by one: any of them may meet a group rule.
            return True
        if object_key(op) is not None:
            # Named by an alternate key: the rules judge the object, whose path is not known yet.
            return True
        return any(when.matches(principal) and any(o.matches(op) for o in ops) for when, ops in self._rules)


def needs_lookup(principal: Principal) -> bool:
    """App-only tokens never carry the groups of a service principal; a delegated token keeps its
    ``groups`` claim, and one without (overage, or no claim configured) is looked up like an app."""
    return principal.app_only or not principal.groups


# --- resolving -------------------------------------------------------------------------------


class GraphTransport(Protocol):
    """The gateway's own HTTPS client (:class:`nhi_gateway.proxy.egress.EgressClient`), or a test's."""

    async def post_json(
        self,
        url: str,
        *,
        form: Mapping[str, str] | None = None,
        json_body: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, object]: ...

    async def get_json_status(self, url: str, *, headers: Mapping[str, str] | None = None) -> tuple[int, object]: ...


class SingleFlight:
    """Concurrent callers with the same key share one run of the work, and its outcome."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future] = {}

    async def run(self, key: Hashable, work: Callable[[], Awaitable]):
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._running[key] = task
            task.add_done_callback(functools.partial(self._finished, key))
        # shield: one caller going away (its client disconnected) must not cancel the others' lookup.
        return await asyncio.shield(task)

    def _finished(self, key: Hashable, task: asyncio.Future) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved, even when every caller has gone

    def __len__(self) -> int:
        return len(self._running)


def _error_summary(body: object) -> str:
    """What went wrong, from an Entra or Graph error body (codes and messages hold no secrets)."""
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):  # Graph
            err = body["error"]
            return f"{err.get('code', '')}: {str(err.get('message', ''))[:200]}"
        if isinstance(body.get("error"), str):  # Entra: the AADSTS code leads the description
            description = str(body.get("error_description", "")).splitlines()
            return f"{body['error']}: {(description[0] if description else '')[:200]}"
    return "no error body"


class GroupResolver:
    """The groups of a principal, from Graph, cached per (tenant, object id) for ``ttl`` seconds."""

    def __init__(
        self,
        credential: GraphCredential,
        transport: GraphTransport,
        *,
        ttl: float = DEFAULT_TTL,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        graph_url: str = GRAPH_URL,
    ) -> None:
        self.credential = credential
        self.transport = transport
        self.ttl = ttl
        self.cache_size = cache_size
        self._clock = clock
        self._wall_clock = wall_clock
        self._graph_url = graph_url
        self._cache: OrderedDict[tuple[str, str, str], tuple[float, tuple[str, ...]]] = OrderedDict()
        self._flights = SingleFlight()
        self._token: tuple[str, float] | None = None  # (access token, renew after) - never logged
        self.lookups = 0  # Graph calls made (for tests, the benchmark and metrics)
        self.lookup_failures = 0  # lookups Graph did not answer 200, or not at all
        self.token_requests = 0

    def __repr__(self) -> str:
        return f"<GroupResolver client={self.credential.client_id} ({self.credential.kind}) ttl={self.ttl}>"

    async def with_groups(self, principal: Principal) -> Principal:
        """``principal`` with its groups from Graph, or unchanged when its token's claim counts."""
        if not needs_lookup(principal):
            return principal
        collection = "servicePrincipals" if principal.app_only else "users"
        groups = await self.member_groups(principal.tenant_id, principal.object_id, collection)
        return replace(principal, groups=groups)

    async def member_groups(
        self, tenant_id: str, object_id: str, collection: str = "servicePrincipals"
    ) -> tuple[str, ...]:
        """Transitive, security-enabled group ids (lower-case). Raises GroupLookupFailed."""
        tenant_id, object_id = tenant_id.lower(), object_id.lower()
        if tenant_id != self.credential.tenant_id:
            raise GroupLookupFailed(
                f"the gateway's Graph credential is for tenant {self.credential.tenant_id}, "
                f"not the caller's tenant {tenant_id}"
            )
        if not _GUID.match(object_id) or collection not in ("servicePrincipals", "users"):
            raise GroupLookupFailed(f"cannot look up {collection}/{object_id[:64]!r}")
        key = (tenant_id, object_id, collection)
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > self._clock():
                self._cache.move_to_end(key)
                return hit[1]
            del self._cache[key]
        return await self._flights.run(key, functools.partial(self._lookup, key))

    async def _lookup(self, key: tuple[str, str, str]) -> tuple[str, ...]:
        _, object_id, collection = key
        url = f"{self._graph_url}/v1.0/{collection}/{object_id}/getMemberGroups"
        for attempt in (1, 2):
            token = await self._access_token()
            self.lookups += 1
            status, body = await self._post(
                url, json_body={"securityEnabledOnly": True}, headers={"Authorization": f"Bearer {token}"}
            )
            if status == 401 and attempt == 1:
                # Revoked or rolled before its expiry: renew once, then believe the answer.
                self._drop_token(token)
                continue
            break
        if status != 200:
            self.lookup_failures += 1
            raise GroupLookupFailed(f"Graph answered {status} to getMemberGroups of {collection}/{object_id} "
                                    f"({_error_summary(body)})")
        groups = _group_ids(body, f"{collection}/{object_id}")
        self._cache[key] = (self._clock() + self.ttl, groups)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        logger.info("groups of %s/%s resolved: %d security groups", collection, object_id, len(groups))
        return groups

    async def _access_token(self) -> str:
        if self._token is not None and self._token[1] > self._clock():
            return self._token[0]
        return await self._flights.run("token", self._request_token)

    # The same credential and token serve the gateway's other Graph lookups (policy/objects.py).

    @property
    def graph_url(self) -> str:
        return self._graph_url

    async def access_token(self) -> str:
        """The gateway's own Graph token; raises GroupLookupFailed when it cannot be had."""
        return await self._access_token()

    def drop_token(self, token: str) -> None:
        self._drop_token(token)

    async def get_json(self, url: str, token: str) -> tuple[int, object]:
        return await self.transport.get_json_status(url, headers={"Authorization": f"Bearer {token}"})

    def _drop_token(self, token: str) -> None:
        if self._token is not None and self._token[0] == token:
            self._token = None

    async def _request_token(self) -> str:
        c = self.credential
        self.token_requests += 1
        status, body = await self._post(c.token_endpoint, form=c.token_request(self._wall_clock()))
        token = body.get("access_token") if isinstance(body, dict) else None
        if status != 200 or not isinstance(token, str) or not token:
            raise GroupLookupFailed(
                f"the token endpoint refused the gateway's Graph credential (client {c.client_id}, "
                f"{c.kind}): {status} {_error_summary(body)}"
            )
        try:
            lifetime = float(body.get("expires_in", 0))
        except (TypeError, ValueError):
            lifetime = 0.0
        # Renew shortly before expiry; a short-lived token is used for half its life.
        renew_in = max(lifetime - TOKEN_REFRESH_MARGIN, lifetime / 2)
        self._token = (token, self._clock() + renew_in)
        logger.info("obtained the gateway's own Graph token (client %s, %s)", c.client_id, c.kind)
        return token

    async def _post(self, url: str, **kw) -> tuple[int, object]:
        try:
            return await self.transport.post_json(url, **kw)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a network failure is a lookup failure: the caller fails closed
            host = url.split("/")[2]
            raise GroupLookupFailed(f"cannot reach {host}: {type(e).__name__}: {str(e)[:200]}") from e


def _group_ids(body: object, whose: str) -> tuple[str, ...]:
    values = body.get("value") if isinstance(body, dict) else None
    if not isinstance(values, list) or not all(isinstance(v, str) and _GUID.match(v.lower()) for v in values):
        raise GroupLookupFailed(f"Graph's getMemberGroups answer for {whose} is not a list of group ids")
    return tuple(dict.fromkeys(v.lower() for v in values))


__all__ = [
    "CertificateCredential",
    "CredentialError",
    "GraphCredential",
    "GroupLookupFailed",
    "GroupResolver",
    "GroupRules",
    "SingleFlight",
    "credential_from_settings",
    "needs_lookup",
]
