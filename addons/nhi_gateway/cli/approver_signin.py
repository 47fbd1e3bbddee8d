"""``nhi-gateway approvals login``: an approver signs in for the approval API, and where the
token is kept.

The approval API accepts only a person's delegated token for the gateway's own app registration,
with its scope and the step-up the policy asks for. The command asks the running gateway how to
sign in (``GET /.well-known/oauth-protected-resource`` on the approval API: tenant, client id,
scope, authentication context; public, no token needed), then signs in with MSAL's device code
flow, asking Entra for the authentication context with a ``claims`` request, as the API's claims
challenge would.

The token is an Entra access token: it must never reach a plain file. It is kept in the OS
keyring (macOS Keychain, Windows Credential Locker, the Secret Service of a Linux desktop) when
one is available, and read from there by the other ``approvals`` commands. Without one the command
says so and prints ``export NHI_APPROVER_TOKEN=...`` on standard output (everything else goes to
standard error), so ``eval "$(nhi-gateway approvals login)"`` keeps it in the shell's memory for
the session. MSAL's own cache is in memory and ends with the process (no refresh token is kept:
sign in again when the token expires, about an hour later).
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import dataclass

import httpx
import jwt

from nhi_gateway.approvals.approver_token import auth_context_claims

DEFAULT_AUTHORITY = "https://login.microsoftonline.com"
KEYRING_SERVICE = "nhi-gateway approvals"
TIMEOUT = 30.0
# Keyring backends that keep secrets in the operating system's protected store. Anything else
# (keyrings.alt's plaintext or "encrypted" files, the null and fail backends) is not used.
OS_KEYRINGS = ("keyring.backends.SecretService", "keyring.backends.macOS", "keyring.backends.Windows",
               "keyring.backends.kwallet", "keyring.backends.libsecret")

logger = logging.getLogger(__name__)


class SignInFailed(Exception):
    pass


@dataclass(frozen=True)
class SignInSettings:
    """What the approval API says about signing in (overridable on the command line)."""

    tenant: str
    client_id: str
    scope: str  # the full scope: <App ID URI>/<scope>
    auth_context: str | None = None

    @classmethod
    def discover(cls, api: str, *, tenant: str | None = None, client_id: str | None = None,
                 scope: str | None = None) -> SignInSettings:
        try:
            with httpx.Client(timeout=TIMEOUT, trust_env=False) as client:
                r = client.get(api.rstrip("/") + "/.well-known/oauth-protected-resource")
            meta = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as e:
            raise SignInFailed(f"cannot ask the approval API at {api} how to sign in: {e}") from None
        if not isinstance(meta, dict):
            raise SignInFailed(f"the approval API at {api} answered {r.status_code} to the sign-in metadata request")
        own = meta.get("nhi_gateway") or {}
        tenants = own.get("tenants") or []
        tenant = tenant or (tenants[0] if len(tenants) == 1 else None)
        if not tenant:
            raise SignInFailed(f"the gateway trusts {len(tenants)} tenants: name yours with --tenant")
        client_id = client_id or own.get("login_client_id")
        scopes = meta.get("scopes_supported") or []
        scope = scope or (scopes[0] if scopes else None)
        if not client_id or not scope:
            raise SignInFailed("the gateway's policy names no app registration for the approval API "
                               "(approvals.client_id): ask its administrator")
        return cls(tenant, client_id, scope, own.get("require_auth_context"))


def sign_in(settings: SignInSettings, authority: str = DEFAULT_AUTHORITY, out=sys.stderr) -> str:
    """The access token of a device code sign-in (MSAL, in-memory cache only)."""
    import msal

    authority = authority.rstrip("/")
    app = msal.PublicClientApplication(
        settings.client_id, authority=f"{authority}/{settings.tenant}",
        # Entra's own hosts need no instance discovery; any other (a sovereign cloud's is known to
        # MSAL too) would be looked up on login.microsoftonline.com, which a look-alike is not.
        instance_discovery=False if authority != DEFAULT_AUTHORITY else None,
        token_cache=msal.TokenCache())
    claims = auth_context_claims(settings.auth_context) if settings.auth_context else None
    try:
        flow = app.initiate_device_flow(scopes=[settings.scope], claims_challenge=claims)
    except Exception as e:  # noqa: BLE001 - MSAL raises requests' and its own errors
        raise SignInFailed(f"cannot reach {authority}: {e}") from None
    if "user_code" not in flow:
        raise SignInFailed(f"Entra refused to start the sign-in: {flow.get('error_description') or flow}")
    print(flow["message"], file=out, flush=True)
    if settings.auth_context:
        print(f"(the approval API asks for authentication context {settings.auth_context}: your tenant will "
              "ask for the step-up it binds to it, such as MFA)", file=out, flush=True)
    result = app.acquire_token_by_device_flow(flow, claims_challenge=claims)
    token = result.get("access_token") if isinstance(result, dict) else None
    if not token:
        raise SignInFailed(f"sign-in failed: {result.get('error_description') or result.get('error') or result}")
    return token


# --- where the token is kept ---------------------------------------------------------------------


def os_keyring():
    """The OS keyring backend, or None when there is none (never a file-based one)."""
    try:
        import keyring
        backend = keyring.get_keyring()
    except Exception:  # noqa: BLE001 - a broken keyring setup is the same as none
        return None
    parts = getattr(backend, "backends", None)
    chosen = list(parts) if parts is not None else [backend]
    if not chosen or not all(type(b).__module__.startswith(OS_KEYRINGS) for b in chosen):
        return None
    return backend


def store(api: str, token: str) -> bool:
    """Keep the token in the OS keyring; False when there is none (nothing is written then)."""
    backend = os_keyring()
    if backend is None:
        return False
    try:
        backend.set_password(KEYRING_SERVICE, api.rstrip("/"), token)
    except Exception as e:  # noqa: BLE001
        logger.warning("the OS keyring refused the token: %s", e)
        return False
    return True


def stored(api: str) -> str | None:
    backend = os_keyring()
    if backend is None:
        return None
    try:
        return backend.get_password(KEYRING_SERVICE, api.rstrip("/"))
    except Exception:  # noqa: BLE001
        return None


def forget(api: str) -> bool:
    backend = os_keyring()
    if backend is None:
        return False
    try:
        backend.delete_password(KEYRING_SERVICE, api.rstrip("/"))
    except Exception:  # noqa: BLE001 - nothing stored
        return False
    return True


def expired(token: str, now: float | None = None) -> bool:
    """Whether a token's ``exp`` has passed (read only to say "sign in again"; the gateway decides)."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return False
    return isinstance(exp, int | float) and exp <= (now or time.time())


def export_line(token: str) -> str:
    return f"export NHI_APPROVER_TOKEN={shlex.quote(token)}"


def describe(token: str) -> str:
    """Who signed in, for the confirmation line."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return "?"
    who = claims.get("name") or claims.get("preferred_username") or claims.get("upn") or claims.get("oid")
    acrs = claims.get("acrs")
    return f"{who}" + (f" (authentication context {', '.join(acrs)})" if isinstance(acrs, list) and acrs else "")


__all__ = ["SignInFailed", "SignInSettings", "describe", "expired", "export_line", "forget", "os_keyring",
           "sign_in", "store", "stored"]
