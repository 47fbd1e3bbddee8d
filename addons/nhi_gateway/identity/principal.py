"""Who is calling: the identity a verified Entra token proves."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class TokenSource(StrEnum):
    """Where the caller's token was found."""

    PROXY = "proxy"  # HTTPS_PROXY=http://name:<JWT>@host:port -> Proxy-Authorization: Basic on CONNECT
    BEARER = "bearer"  # Authorization: Bearer <JWT> on the request itself


class AuthMethod(StrEnum):
    """How the identity authenticated to Entra, from ``appidacr`` (v1) or ``azpacr`` (v2)."""

    PUBLIC_CLIENT = "public_client"  # "0"
    CLIENT_SECRET = "client_secret"  # "1": a static secret, the pattern this gateway exists to retire
    CERTIFICATE = "certificate"  # "2": certificate, federated credential or managed identity
    UNKNOWN = "unknown"

    @classmethod
    def from_acr(cls, acr: object) -> AuthMethod:
        return {"0": cls.PUBLIC_CLIENT, "1": cls.CLIENT_SECRET, "2": cls.CERTIFICATE}.get(
            acr if isinstance(acr, str) else "", cls.UNKNOWN
        )


@dataclass(frozen=True)
class Principal:
    """A verified non-human (or delegated) identity.

    Identities are keyed by (tenant_id, object_id): ``oid``/``sub`` are unique only within a
    tenant. ``display_name`` is for people reading logs, never for authorization.
    """

    tenant_id: str
    object_id: str
    app_id: str
    display_name: str = ""
    roles: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    auth_method: AuthMethod = AuthMethod.UNKNOWN
    app_only: bool = True
    token_sources: tuple[TokenSource, ...] = ()
    issuer: str = ""
    token_version: str = ""
    managed_identity: str = ""  # xms_mirid, when the caller is a managed identity
    expires_at: int = 0
    token_id: str = field(default="", compare=False)  # uti: lets an audit line name the token without holding it
    # Every token the request presented, each verified on its own with its own source (empty: this
    # one only). The policy must allow the request for each of them; audit lines name them all.
    presented: tuple[Principal, ...] = field(default=(), compare=False, repr=False)

    def every_token(self) -> tuple[Principal, ...]:
        return self.presented or (self,)

    def token_summary(self) -> dict:
        """One presented token, for audit lines: whose it is and how it was obtained."""
        return {
            "source": str(self.token_sources[0]) if self.token_sources else "",
            "object_id": self.object_id,
            "app_id": self.app_id,
            "display_name": self.display_name,
            "auth_method": str(self.auth_method),
            "app_only": self.app_only,
            "managed_identity": self.managed_identity,
            "roles": list(self.roles),
            "scopes": list(self.scopes),
            "issuer": self.issuer,
            "token_version": self.token_version,
            "token_id": self.token_id,
        }

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant_id, self.object_id)

    @property
    def label(self) -> str:
        """A short human-readable name for logs and flow comments."""
        name = self.display_name or self.app_id or self.object_id
        return f"{name} ({self.object_id})"

    def to_dict(self) -> dict:
        """A tnetstring- and JSON-safe view, for flow metadata and audit lines."""
        return {
            "tenant_id": self.tenant_id,
            "object_id": self.object_id,
            "app_id": self.app_id,
            "display_name": self.display_name,
            "roles": list(self.roles),
            "scopes": list(self.scopes),
            "groups": list(self.groups),
            "auth_method": str(self.auth_method),
            "app_only": self.app_only,
            "token_sources": [str(s) for s in self.token_sources],
            "issuer": self.issuer,
            "token_version": self.token_version,
            "managed_identity": self.managed_identity,
            "token_id": self.token_id,
            **({"tokens": [p.token_summary() for p in self.presented]} if self.presented else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Principal:
        """The inverse of :meth:`to_dict`, for re-deciding recorded flows (``policy replay``).

        Raises ``ValueError`` for a dict that is not one: a recording is input, not trusted code.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a principal must be a mapping, not {type(d).__name__}")

        def text(name: str, required: bool = False) -> str:
            v = d.get(name, "")
            if not isinstance(v, str) or (required and not v):
                raise ValueError(f"principal {name!r} must be a non-empty string" if required
                                 else f"principal {name!r} must be a string")
            return v

        def texts(name: str) -> tuple[str, ...]:
            v = d.get(name) or []
            if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v):
                raise ValueError(f"principal {name!r} must be a list of strings")
            return tuple(v)

        app_only = d.get("app_only", True)
        if not isinstance(app_only, bool):
            raise ValueError("principal 'app_only' must be true or false")
        try:
            auth_method = AuthMethod(d.get("auth_method") or AuthMethod.UNKNOWN)
            sources = tuple(TokenSource(s) for s in texts("token_sources"))
        except ValueError as e:
            raise ValueError(f"principal: {e}") from e
        expires_at = d.get("expires_at", 0)
        if isinstance(expires_at, bool) or not isinstance(expires_at, int):
            raise ValueError("principal 'expires_at' must be a whole number")
        tokens = d.get("tokens") or []
        if not isinstance(tokens, list) or not all(isinstance(t, dict) for t in tokens):
            raise ValueError("principal 'tokens' must be a list of mappings")
        # Each presented token, as token_summary() wrote it: the tenant and groups are the
        # request's (the tokens name one principal, and groups are resolved for it).
        presented = tuple(cls.from_dict({**t, "tenant_id": d.get("tenant_id"), "groups": d.get("groups") or [],
                                         "token_sources": [t.get("source")], "tokens": []}) for t in tokens)
        return cls(
            tenant_id=text("tenant_id", required=True),
            object_id=text("object_id", required=True),
            app_id=text("app_id"),
            display_name=text("display_name"),
            roles=texts("roles"),
            scopes=texts("scopes"),
            groups=texts("groups"),
            auth_method=auth_method,
            app_only=app_only,
            token_sources=sources,
            issuer=text("issuer"),
            token_version=text("token_version"),
            managed_identity=text("managed_identity"),
            expires_at=expires_at,
            token_id=text("token_id"),
            presented=presented,
        )

    def with_sources(self, sources: tuple[TokenSource, ...]) -> Principal:
        from dataclasses import replace

        return replace(self, token_sources=sources)
