"""An Entra ID look-alike authority: mints access tokens in Entra's exact shapes and publishes
the matching discovery documents and JWKS.

Tokens are assembled by hand (base64url of exact JSON bytes, then RSA PKCS#1 v1.5 SHA-256 from
``cryptography``) rather than with PyJWT, because Microsoft Graph tokens are signed over a header
that differs from the one on the wire (the ``nonce`` quirk, see ``graph_nonce_hash``) and PyJWT
re-serialises headers, so it cannot produce that.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from nhi_gateway.lookalike.pki import SigningKey, b64url, b64url_decode

LOGIN_HOST = "https://login.microsoftonline.com"
GRAPH_RESOURCE = "https://graph.microsoft.com"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
# Graph accepts its App ID URI with or without the slash, and its client id.
GRAPH_AUDIENCES = frozenset({GRAPH_RESOURCE, GRAPH_RESOURCE + "/", GRAPH_APP_ID})

V1_ISSUER = "https://sts.windows.net/{tid}/"
V2_ISSUER = LOGIN_HOST + "/{tid}/v2.0"
# Multi-tenant documents (common, organizations) and JWKS entries name the issuer with this
# placeholder; a verifier substitutes the token's tid.
TENANT_PLACEHOLDER = "{tenantid}"
MULTI_TENANT_ALIASES = frozenset({"common", "organizations", "consumers"})

_KEYS_INDEX = "keys.json"


def _json_bytes(value: Mapping) -> bytes:
    # Entra serialises compactly; the exact bytes matter because they are what gets signed.
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def graph_nonce_hash(nonce: str) -> str:
    """The value Graph tokens are really signed over in place of their ``nonce``."""
    return b64url(hashlib.sha256(nonce.encode("utf-8")).digest())


def undo_graph_nonce(token: str) -> str:
    """Return ``token`` with its header nonce replaced by its hash: the form whose RS256 signature
    verifies. Tokens without a nonce come back unchanged.

    The replacement is done on the header bytes so that nothing else in the header moves.
    """
    header_b64, _, rest = token.partition(".")
    raw = b64url_decode(header_b64)
    header = json.loads(raw)
    nonce = header.get("nonce") if isinstance(header, dict) else None
    if not isinstance(nonce, str):
        return token
    before = b'"nonce":' + json.dumps(nonce, ensure_ascii=False).encode("utf-8")
    after = b'"nonce":' + json.dumps(graph_nonce_hash(nonce)).encode("utf-8")
    if before not in raw:
        return token  # not the compact shape Entra writes; leave it to fail verification
    return b64url(raw.replace(before, after, 1)) + "." + rest


def is_graph_audience(audience: str) -> bool:
    return audience in GRAPH_AUDIENCES


def issuer_for(tenant_id: str, version: str) -> str:
    return (V2_ISSUER if version == "2.0" else V1_ISSUER).format(tid=tenant_id)


def mint_client_assertion(
    key: SigningKey, *, client_id: str, audience: str, lifetime: int = 600, now: int | None = None
) -> str:
    """A certificate client assertion as MSAL builds one (iss == sub == client_id, aud = the
    token endpoint). This one has no nonce quirk, so PyJWT is the right tool."""
    now = int(time.time()) if now is None else now
    claims = {
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": str(uuid.uuid4()),
        "nbf": now,
        "iat": now,
        "exp": now + lifetime,
    }
    headers = {"x5t": key.x5t, "x5t#S256": key.x5t_s256}
    return jwt.encode(claims, key.private_key, algorithm="RS256", headers=headers)


class EntraAuthority:
    """The look-alike Entra authority: its signing keys, the tokens they sign, and what it
    publishes about them.

    With a ``key_dir`` the key set lives on disk (``keys.json`` plus PEM files): a restarted
    look-alike serves the same keys, and a test can rotate keys from its own process while a
    server process picks the change up through ``refresh()``.
    """

    def __init__(self, keys: Iterable[SigningKey] = (), *, key_dir: Path | None = None) -> None:
        self._keys: list[SigningKey] = list(keys)
        self._current = self._keys[-1].kid if self._keys else ""
        self.key_dir = key_dir
        self._index_stamp: tuple[int, int] | None = None

    # --- keys -------------------------------------------------------------------------------

    @classmethod
    def open(cls, key_dir: Path) -> EntraAuthority:
        """Load the key set from ``key_dir``, creating a first key when there is none."""
        authority = cls(key_dir=key_dir)
        if (key_dir / _KEYS_INDEX).exists():
            authority._load()
        else:
            authority.add_key()
        return authority

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        """The published keys, in JWKS order."""
        return tuple(self._keys)

    @property
    def signing_key(self) -> SigningKey:
        """The key new tokens are signed with."""
        return self.key(self._current)

    def key(self, kid: str) -> SigningKey:
        for k in self._keys:
            if k.kid == kid:
                return k
        raise KeyError(kid)

    def add_key(self, key: SigningKey | None = None, *, current: bool = True) -> SigningKey:
        """Publish a new key. ``current=False`` publishes it without signing with it yet, the
        way Entra announces a key before rolling over to it."""
        key = key or SigningKey.generate()
        self._keys.append(key)
        if current or not self._current:
            self._current = key.kid
        if self.key_dir is not None:
            key.save(self.key_dir / f"{key.kid}.key.pem", self.key_dir / f"{key.kid}.pem")
            self._save_index()
        return key

    def use_key(self, kid: str) -> None:
        """Start signing with an already published key (the second half of a rollover)."""
        self.key(kid)
        self._current = kid
        if self.key_dir is not None:
            self._save_index()

    def retire_key(self, kid: str) -> None:
        """Stop publishing ``kid``. Tokens it signed stop verifying, as after an emergency roll."""
        key = self.key(kid)
        if len(self._keys) == 1:
            raise ValueError("cannot retire the only signing key; add one first")
        self._keys.remove(key)
        if self._current == kid:
            self._current = self._keys[-1].kid
        if self.key_dir is not None:
            self._save_index()

    def refresh(self) -> None:
        """Reload the key set if another process changed it on disk."""
        if self.key_dir is None:
            return
        if self._stamp() != self._index_stamp:
            self._load()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = (self.key_dir / _KEYS_INDEX).stat()  # type: ignore[operator]
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _load(self) -> None:
        assert self.key_dir is not None
        index = json.loads((self.key_dir / _KEYS_INDEX).read_text())
        self._keys = [
            SigningKey.load(self.key_dir / f"{kid}.key.pem", self.key_dir / f"{kid}.pem")
            for kid in index["keys"]
        ]
        self._current = index["current"]
        self._index_stamp = self._stamp()

    def _save_index(self) -> None:
        assert self.key_dir is not None
        self.key_dir.mkdir(parents=True, exist_ok=True)
        index = {"keys": [k.kid for k in self._keys], "current": self._current}
        # Atomic replace: a server process reading concurrently sees the old or the new index.
        tmp = self.key_dir / f".{_KEYS_INDEX}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(self.key_dir / _KEYS_INDEX)
        self._index_stamp = self._stamp()

    # --- tokens -----------------------------------------------------------------------------

    def mint_app_token(
        self,
        *,
        tenant_id: str,
        app_id: str,
        object_id: str,
        audience: str = GRAPH_RESOURCE,
        version: str = "1.0",
        roles: Iterable[str] = (),
        display_name: str = "",
        acr: str = "2",
        lifetime: int = 3600,
        now: int | None = None,
        nonce: str | bool | None = None,
        groups: Iterable[str] | None = None,
        extra_claims: Mapping[str, object] | None = None,
        drop_claims: Iterable[str] = (),
        header_overrides: Mapping[str, object] | None = None,
        key: SigningKey | None = None,
    ) -> str:
        """An app-only (client credentials) access token exactly as Entra issues it.

        ``nonce``: None adds a fresh nonce iff the audience is Microsoft Graph (as Entra does),
        False never adds one, a string uses that nonce. ``header_overrides`` sets header members
        (a value of None removes one), ``extra_claims``/``drop_claims`` edit the payload, and
        ``key`` signs with a key other than the current one (e.g. one never published).
        """
        key = key or self.signing_key
        now = int(time.time()) if now is None else now
        v2 = version == "2.0"
        roles = list(roles)

        claims: dict[str, object] = {
            "aud": audience,
            "iss": issuer_for(tenant_id, version),
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "app_displayname": display_name,
        }
        if v2:
            claims |= {"azp": app_id, "azpacr": acr}
        else:
            claims |= {"appid": app_id, "appidacr": acr}
        if groups is not None:
            claims["groups"] = list(groups)
        claims["idtyp"] = "app"
        claims["oid"] = object_id
        # Entra leaves `roles` out entirely when the app holds no application permission.
        if roles:
            claims["roles"] = roles
        claims |= {
            "sub": object_id,
            "tid": tenant_id,
            "uti": b64url(secrets.token_bytes(16)),
            "ver": version,
        }
        for name, value in (extra_claims or {}).items():
            claims[name] = value
        for name in drop_claims:
            claims.pop(name, None)

        if nonce is None:
            nonce = b64url(secrets.token_bytes(32)) if is_graph_audience(audience) else False
        header: dict[str, object] = {"typ": "JWT"}
        if nonce is not False:
            header["nonce"] = nonce
        header["alg"] = "RS256"
        if not v2:
            header["x5t"] = key.x5t
        header["kid"] = key.kid
        for name, value in (header_overrides or {}).items():
            if value is None:
                header.pop(name, None)
            else:
                header[name] = value
        return self._sign(header, claims, key)

    def sign_raw(self, header: bytes, payload: bytes, key: SigningKey | None = None) -> str:
        """A token signed over exactly these header and payload bytes (no nonce quirk): for
        shapes a dict cannot hold, such as a member name written twice, properly signed."""
        key = key or self.signing_key
        signing_input = f"{b64url(header)}.{b64url(payload)}".encode("ascii")
        signature = key.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode('ascii')}.{b64url(signature)}"

    def mint_user_token(
        self,
        *,
        tenant_id: str,
        object_id: str,
        client_id: str,
        audience: str,
        scopes: Iterable[str],
        version: str = "2.0",
        name: str = "",
        upn: str = "",
        amr: Iterable[str] = ("pwd",),
        acrs: Iterable[str] = (),
        groups: Iterable[str] | None = None,
        client_acr: str = "0",
        lifetime: int = 3600,
        now: int | None = None,
        extra_claims: Mapping[str, object] | None = None,
        drop_claims: Iterable[str] = (),
    ) -> str:
        """A delegated (user) access token as Entra issues it to a client signed in as a person:
        ``scp`` with the consented scopes, ``sub`` a pairwise id (never the object id), the client
        in ``azp``/``appid`` (``client_acr`` "0": a public client on the person's device), ``amr``
        only in v1 tokens, ``acrs`` with the authentication contexts the sign-in satisfied.
        Graph audiences get Graph's nonce header, like every Graph token."""
        key = self.signing_key
        now = int(time.time()) if now is None else now
        v2 = version == "2.0"
        claims: dict[str, object] = {
            "aud": audience, "iss": issuer_for(tenant_id, version), "iat": now, "nbf": now, "exp": now + lifetime,
        }
        acrs = list(acrs)
        if acrs:
            claims["acrs"] = acrs
        if v2:
            claims |= {"aio": b64url(secrets.token_bytes(24)), "azp": client_id, "azpacr": client_acr}
        else:
            claims |= {"acr": "1", "aio": b64url(secrets.token_bytes(24)), "amr": list(amr), "appid": client_id,
                       "appidacr": client_acr}
        if groups is not None:
            claims["groups"] = list(groups)
        claims |= {"idtyp": "user", "name": name, "oid": object_id}
        if v2:
            claims["preferred_username"] = upn
        claims |= {
            "rh": "0.A" + b64url(secrets.token_bytes(30)) + ".",
            "scp": " ".join(scopes),
            "sid": str(uuid.uuid4()),
            # Pairwise: a person's sub differs per app and is never the object id.
            "sub": b64url(hashlib.sha256(f"{client_id}:{object_id}".encode()).digest()),
            "tid": tenant_id,
        }
        if not v2:
            claims |= {"unique_name": upn, "upn": upn}
        claims |= {"uti": b64url(secrets.token_bytes(16)), "ver": version}
        for claim, value in (extra_claims or {}).items():
            claims[claim] = value
        for claim in drop_claims:
            claims.pop(claim, None)
        header: dict[str, object] = {"typ": "JWT"}
        if is_graph_audience(audience):
            header["nonce"] = b64url(secrets.token_bytes(32))
        header["alg"] = "RS256"
        if not v2:
            header["x5t"] = key.x5t
        header["kid"] = key.kid
        return self._sign(header, claims, key)

    @staticmethod
    def _sign(header: dict[str, object], claims: dict[str, object], key: SigningKey) -> str:
        payload_b64 = b64url(_json_bytes(claims))
        wire_header_b64 = b64url(_json_bytes(header))
        signed_header_b64 = wire_header_b64
        nonce = header.get("nonce")
        if isinstance(nonce, str):
            # Graph's quirk: sign over the header with the nonce's hash, ship the original nonce.
            signed_header_b64 = b64url(_json_bytes({**header, "nonce": graph_nonce_hash(nonce)}))
        signing_input = f"{signed_header_b64}.{payload_b64}".encode("ascii")
        signature = key.private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{wire_header_b64}.{payload_b64}.{b64url(signature)}"

    # --- what the authority publishes ------------------------------------------------------

    def jwks(self, version: str = "2.0", *, issuer: str | None = None) -> dict:
        """The key set. v2 sets carry ``issuer`` (the {tenantid} template unless ``issuer`` says
        otherwise); v1 sets carry none. The same keys sign v1 and v2 tokens."""
        if version == "2.0":
            member_issuer = issuer or V2_ISSUER.format(tid=TENANT_PLACEHOLDER)
        else:
            member_issuer = issuer
        return {"keys": [k.jwk(member_issuer) for k in self._keys]}

    def discovery(self, tenant_id: str, version: str = "2.0") -> dict:
        """The OpenID configuration document Entra serves for ``tenant_id`` (a tenant GUID or a
        multi-tenant alias such as ``common``)."""
        t = tenant_id
        issuer_tid = TENANT_PLACEHOLDER if tenant_id in MULTI_TENANT_ALIASES else tenant_id
        common = {
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "kerberos_endpoint": f"{LOGIN_HOST}/{t}/kerberos",
            "tenant_region_scope": None if issuer_tid == TENANT_PLACEHOLDER else "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }
        if version == "2.0":
            return {
                "token_endpoint": f"{LOGIN_HOST}/{t}/oauth2/v2.0/token",
                "jwks_uri": f"{LOGIN_HOST}/{t}/discovery/v2.0/keys",
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": V2_ISSUER.format(tid=issuer_tid),
                "request_uri_parameter_supported": False,
                "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
                "authorization_endpoint": f"{LOGIN_HOST}/{t}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{LOGIN_HOST}/{t}/oauth2/v2.0/devicecode",
                "end_session_endpoint": f"{LOGIN_HOST}/{t}/oauth2/v2.0/logout",
                "claims_supported": [
                    "sub", "iss", "cloud_instance_name", "cloud_instance_host_name", "cloud_graph_host_name",
                    "msgraph_host", "aud", "exp", "iat", "auth_time", "acr", "nonce", "preferred_username",
                    "name", "tid", "ver", "at_hash", "c_hash", "email",
                ],
                **common,
            }
        return {
            "token_endpoint": f"{LOGIN_HOST}/{t}/oauth2/token",
            # v1 documents point at the common key set even for a single tenant.
            "jwks_uri": f"{LOGIN_HOST}/common/discovery/keys",
            "response_types_supported": ["code", "id_token", "code id_token", "token id_token", "token"],
            "scopes_supported": ["openid"],
            "issuer": V1_ISSUER.format(tid=issuer_tid),
            "microsoft_multi_refresh_token": True,
            "authorization_endpoint": f"{LOGIN_HOST}/{t}/oauth2/authorize",
            "device_authorization_endpoint": f"{LOGIN_HOST}/{t}/oauth2/devicecode",
            "end_session_endpoint": f"{LOGIN_HOST}/{t}/oauth2/logout",
            "claims_supported": [
                "sub", "iss", "cloud_instance_name", "cloud_instance_host_name", "cloud_graph_host_name",
                "msgraph_host", "aud", "exp", "iat", "auth_time", "acr", "amr", "nonce", "email",
                "given_name", "family_name", "nickname",
            ],
            "check_session_iframe": f"{LOGIN_HOST}/{t}/oauth2/checksession",
            "userinfo_endpoint": f"{LOGIN_HOST}/{t}/openid/userinfo",
            **common,
        }
