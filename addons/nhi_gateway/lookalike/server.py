"""One HTTPS listener that answers as login.microsoftonline.com (and sts.windows.net) and as
graph.microsoft.com, chosen by the Host header.

There is no network here: the gateway maps the real names to this loopback port and keeps URL,
Host and SNI, so clients cannot tell the difference in the shapes they see. Every request that
arrives is noted (header names only) in ``received.jsonl``, so a test can prove that a request the
gateway refused never got this far.

Tests also need Graph to misbehave, as a compromised or buggy upstream would, to show that the
gateway still masks. A Graph request may ask for that with headers the look-alike reads and
real Graph ignores: ``X-LookAlike-Content-Type`` (repeatable: the answer carries each as its own
``Content-Type`` header instead of Graph's), ``X-LookAlike-Charset`` (the JSON answer written in
that charset, and named in its Content-Type) and ``X-LookAlike-Header: Name: value`` (repeatable:
added to the answer).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import gzip
import json
import logging
import os
import re
import secrets
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Host, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from nhi_gateway.lookalike.directory import GATEWAY_API_URI, NHI_GATEWAY, Directory
from nhi_gateway.lookalike.minting import (
    GRAPH_APP_ID,
    GRAPH_AUDIENCES,
    GRAPH_RESOURCE,
    LOGIN_HOST,
    MULTI_TENANT_ALIASES,
    EntraAuthority,
    issuer_for,
    undo_graph_nonce,
)
from nhi_gateway.lookalike.pki import SigningKey, ensure_server_pki

logger = logging.getLogger(__name__)

INFO_FILE = "lookalike.json"
RECEIVED_FILE = "received.jsonl"
GRAPH_URL = "https://graph.microsoft.com"

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_LIFETIME = 3600
MAX_BATCH = 20


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class DeviceSignIn:
    """One device code flow, from ``devicecode`` to the token (kept in memory only)."""

    device_code: str
    user_code: str
    client_id: str
    scopes: tuple[str, ...]
    auth_contexts: tuple[str, ...]  # asked for by the claims parameter
    expires_at: float
    user: dict | None = None  # the person who entered the code
    mfa: bool = False


@dataclass
class LookAlike:
    """Everything both look-alikes answer from."""

    state_dir: Path
    authority: EntraAuthority
    directory: Directory
    device_sign_ins: dict[str, DeviceSignIn] = field(default_factory=dict)  # by device code

    @classmethod
    def open(cls, state_dir: Path) -> LookAlike:
        state_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            state_dir=state_dir,
            authority=EntraAuthority.open(state_dir / "keys"),
            directory=Directory(state_dir / "directory"),
        )

    @property
    def received_log(self) -> Path:
        return self.state_dir / RECEIVED_FILE

    def note_received(self, host: str, method: str, path: str, header_names: list[str], authorization: bool,
                      **extra: object) -> None:
        entry = {
            "time": _utcnow().isoformat(timespec="milliseconds"),
            "host": host,
            "method": method,
            "path": path,
            # Names only: values carry tokens, secrets and assertions that must never hit a file.
            "headers": header_names,
            "authorization": authorization,
            **extra,
        }
        with self.received_log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


class ReceivedLog:
    """ASGI middleware: note every HTTP request before anything else can answer it."""

    def __init__(self, app: ASGIApp, lookalike: LookAlike) -> None:
        self.app = app
        self.lookalike = lookalike

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = [name.decode("latin-1") for name, _ in scope["headers"]]
            host = next((v.decode("latin-1") for n, v in scope["headers"] if n == b"host"), "")
            path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
            if scope.get("query_string"):
                path += "?" + scope["query_string"].decode("latin-1")
            self.lookalike.note_received(
                host, scope["method"], path, names, authorization="authorization" in names
            )
        await self.app(scope, receive, send)


# --- login.microsoftonline.com -------------------------------------------------------------


def aadsts_error(status: int, error: str, code: int, description: str) -> JSONResponse:
    """An error body in Entra's shape: the AADSTS code leads the description and is repeated in
    ``error_codes``; trace and correlation ids make every answer unique, as in production."""
    now = _utcnow()
    stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
    trace_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
    body = {
        "error": error,
        "error_description": (
            f"AADSTS{code}: {description}\r\nTrace ID: {trace_id}\r\n"
            f"Correlation ID: {correlation_id}\r\nTimestamp: {stamp}"
        ),
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": f"{LOGIN_HOST}/error?code={code}",
    }
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store, no-cache"})


def _resolve_tenant(lookalike: LookAlike, tenant: str, *, allow_alias: bool) -> str | None:
    """The tenant GUID (or the alias itself, where aliases are allowed) for a path segment."""
    d = lookalike.directory
    if tenant.lower() in (d.tenant_id, d.tenant_domain):
        return d.tenant_id
    if allow_alias and tenant.lower() in MULTI_TENANT_ALIASES:
        return tenant.lower()
    return None


def _tenant_not_found(tenant: str) -> JSONResponse:
    return aadsts_error(
        400, "invalid_tenant", 90002,
        f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing "
        "into the correct cloud. Check with your subscription administrator, this may happen if there "
        "are no active subscriptions for the tenant.",
    )


def _here(document: dict, request: Request) -> dict:
    """A discovery document whose endpoints point where it was asked for. A client outside the
    gateway (``nhi-gateway approvals login --authority https://localhost:PORT``) reaches the
    look-alike by its loopback name; the issuer stays Entra's, as the tokens say."""
    host = (request.headers.get("host") or "").lower()
    if host.split(":")[0] in ("login.microsoftonline.com", "sts.windows.net", ""):
        return document
    return {k: v.replace(LOGIN_HOST, f"https://{host}") if k != "issuer" and isinstance(v, str) else v
            for k, v in document.items()}


def build_login_app(lookalike: LookAlike) -> Starlette:
    async def openid_configuration(request: Request) -> Response:
        tenant = request.path_params["tenant"]
        resolved = _resolve_tenant(lookalike, tenant, allow_alias=True)
        if resolved is None:
            return _tenant_not_found(tenant)
        version = "2.0" if request.url.path.lower().endswith("/v2.0/.well-known/openid-configuration") else "1.0"
        return JSONResponse(_here(lookalike.authority.discovery(resolved, version), request))

    async def devicecode(request: Request) -> Response:
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        return start_device_sign_in(lookalike, request.path_params["tenant"], fields)

    async def deviceauth(request: Request) -> Response:
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        return enter_device_code(lookalike, fields)

    async def keys(request: Request) -> Response:
        tenant = request.path_params["tenant"]
        if _resolve_tenant(lookalike, tenant, allow_alias=True) is None:
            return _tenant_not_found(tenant)
        lookalike.authority.refresh()  # a test may have rotated keys from its own process
        version = "2.0" if "/discovery/v2.0/" in request.url.path.lower() else "1.0"
        return JSONResponse(lookalike.authority.jwks(version))

    async def token(request: Request) -> Response:
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        return issue_token(lookalike, request.path_params["tenant"], fields, request.headers.get("authorization"))

    async def instance_discovery(request: Request) -> Response:
        # What MSAL asks of an authority it does not know by name (login.microsoftonline.com it
        # knows, and skips this): where the tenant's metadata is, and the cloud's host aliases.
        endpoint = request.query_params.get("authorization_endpoint", "")
        tenant = urllib.parse.urlsplit(endpoint).path.strip("/").split("/")[0] or "common"
        return JSONResponse({
            "tenant_discovery_endpoint": f"{LOGIN_HOST}/{tenant}/v2.0/.well-known/openid-configuration",
            "api-version": "1.1",
            "metadata": [{
                "preferred_network": "login.microsoftonline.com",
                "preferred_cache": "login.windows.net",
                "aliases": ["login.microsoftonline.com", "login.windows.net", "login.microsoft.com",
                            "sts.windows.net"],
            }],
        })

    return Starlette(routes=[
        Route("/common/discovery/instance", instance_discovery),
        Route("/{tenant}/v2.0/.well-known/openid-configuration", openid_configuration),
        Route("/{tenant}/.well-known/openid-configuration", openid_configuration),
        Route("/{tenant}/discovery/v2.0/keys", keys),
        Route("/{tenant}/discovery/keys", keys),
        Route("/{tenant}/oauth2/v2.0/token", token, methods=["POST"]),
        Route("/{tenant}/oauth2/v2.0/devicecode", devicecode, methods=["POST"]),
        # Where https://microsoft.com/devicelogin leads: the person enters the code and signs in.
        # The look-alike has no browser pages; a test or the demo posts what the person would do.
        Route("/{tenant}/oauth2/deviceauth", deviceauth, methods=["POST"]),
    ])


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    # RFC 6749 2.3.1: both parts are form-urlencoded before the Basic encoding.
    if not authorization or not authorization.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        return None
    return urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(secret)


DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEVICE_CODE_LIFETIME = 900
DEVICE_CODE_INTERVAL = 1  # Entra says 5; the look-alike lets tests and the demo poll faster
OIDC_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})
_USER_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def _requested_auth_contexts(claims: str | None) -> tuple[str, ...] | None:
    """The authentication contexts a ``claims`` parameter asks for (None: not JSON)."""
    if not claims:
        return ()
    try:
        acrs = json.loads(claims).get("access_token", {}).get("acrs", {})
    except (ValueError, AttributeError):
        return None
    if not isinstance(acrs, dict):
        return None
    values = acrs.get("values") or ([acrs["value"]] if "value" in acrs else [])
    return tuple(v for v in values if isinstance(v, str))


def start_device_sign_in(lookalike: LookAlike, tenant: str, form: Mapping[str, str]) -> Response:
    """``/{tenant}/oauth2/v2.0/devicecode``: the first step of the device code flow, for the public
    client of the approval API (the gateway's registration)."""
    tenant_id = _resolve_tenant(lookalike, tenant, allow_alias=True)
    if tenant_id is None:
        return _tenant_not_found(tenant)
    api = lookalike.directory.approvals_api()
    client_id = form.get("client_id", "").lower()
    if client_id != api["client_id"]:
        return aadsts_error(
            400, "unauthorized_client", 700016, f"Application with identifier '{client_id}' was not found in the "
            f"directory '{tenant}', or it is not a public client (Allow public client flows).")
    resource_scopes = [x for x in form.get("scope", "").split() if x not in OIDC_SCOPES]
    known = {f"{api['app_id_uri']}/{api['scope']}", f"{api['client_id']}/{api['scope']}"}
    if not resource_scopes or any(x not in known for x in resource_scopes):
        return aadsts_error(
            400, "invalid_scope", 70011, f"The provided value for the input parameter 'scope' is not valid. The "
            f"scope {form.get('scope', '')} does not exist.")
    contexts = _requested_auth_contexts(form.get("claims"))
    if contexts is None:
        return aadsts_error(400, "invalid_request", 90014, "The claims parameter is not valid JSON.")
    device_code = secrets.token_urlsafe(48)
    user_code = "".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(9))
    lookalike.device_sign_ins[device_code] = DeviceSignIn(
        device_code, user_code, client_id, tuple(resource_scopes), contexts, time.time() + DEVICE_CODE_LIFETIME)
    verification = "https://microsoft.com/devicelogin"
    return JSONResponse({
        "user_code": user_code, "device_code": device_code, "verification_uri": verification,
        "expires_in": DEVICE_CODE_LIFETIME, "interval": DEVICE_CODE_INTERVAL,
        "message": f"To sign in, use a web browser to open the page {verification} and enter the code {user_code} "
                   "to authenticate.",
    }, headers={"Cache-Control": "no-store, no-cache"})


def enter_device_code(lookalike: LookAlike, form: Mapping[str, str]) -> Response:
    """What the person does at https://microsoft.com/devicelogin: enter the code, sign in as
    ``user`` (object id or UPN), with multi-factor authentication when ``mfa`` is true."""
    code = form.get("otc", "").strip().upper()
    sign_in = next((d for d in lookalike.device_sign_ins.values() if d.user_code == code), None)
    if sign_in is None or sign_in.expires_at < time.time():
        return aadsts_error(400, "invalid_grant", 70019, "The code you entered has expired or is not valid.")
    user = lookalike.directory.find_user(form.get("user", ""))
    if user is None:
        return aadsts_error(400, "invalid_grant", 50034, "The user account does not exist in the directory.")
    sign_in.user, sign_in.mfa = user, form.get("mfa", "").lower() == "true"
    logger.info("device sign-in %s: %s signed in%s", code, user["userPrincipalName"],
                " with MFA" if sign_in.mfa else "")
    return JSONResponse({"signed_in": user["userPrincipalName"], "mfa": sign_in.mfa})


def _id_token(lookalike: LookAlike, tenant_id: str, client_id: str, user: dict) -> str:
    now = int(time.time())
    claims = {"aud": client_id, "iss": issuer_for(tenant_id, "2.0"), "iat": now, "nbf": now, "exp": now + 3600,
              "name": user["displayName"], "oid": user["id"], "preferred_username": user["userPrincipalName"],
              "sub": user["id"], "tid": tenant_id, "ver": "2.0"}
    return jwt.encode(claims, lookalike.authority.signing_key.private_key, algorithm="RS256",
                      headers={"kid": lookalike.authority.signing_key.kid})


def redeem_device_code(lookalike: LookAlike, tenant_id: str, form: Mapping[str, str]) -> Response:
    """The device code grant: pending until the person signed in, then a delegated v2 token for
    the approval API, once (the code is spent)."""
    sign_in = lookalike.device_sign_ins.get(form.get("device_code", ""))
    if sign_in is None or sign_in.client_id != form.get("client_id", "").lower():
        return aadsts_error(400, "invalid_grant", 70000, "The provided value for the 'device_code' is not valid.")
    if sign_in.expires_at < time.time():
        lookalike.device_sign_ins.pop(sign_in.device_code, None)
        return aadsts_error(400, "expired_token", 70020, "The provided value for the input parameter 'device_code' "
                            "is not valid. This device code has expired.")
    if sign_in.user is None:
        return aadsts_error(400, "authorization_pending", 70016, "OAuth 2.0 device flow error. Authorization is "
                            "pending. Continue polling.")
    lookalike.device_sign_ins.pop(sign_in.device_code, None)
    api, user = lookalike.directory.approvals_api(), sign_in.user
    # The tenant binds every authentication context to MFA: only an MFA sign-in satisfies one.
    acrs = [c for c in sign_in.auth_contexts if sign_in.mfa]
    access_token = lookalike.authority.mint_user_token(
        tenant_id=tenant_id, object_id=user["id"], client_id=sign_in.client_id, audience=api["client_id"],
        scopes=[api["scope"]], version="2.0", name=user["displayName"], upn=user["userPrincipalName"],
        amr=["pwd", "mfa"] if sign_in.mfa else ["pwd"], acrs=acrs, lifetime=TOKEN_LIFETIME)
    client_info = base64.urlsafe_b64encode(json.dumps({"uid": user["id"], "utid": tenant_id}).encode()).decode()
    logger.info("issued an approval API token to %s (acrs %s)", user["userPrincipalName"], acrs or "none")
    return JSONResponse(
        {"token_type": "Bearer", "scope": f"{api['app_id_uri']}/{api['scope']}", "expires_in": TOKEN_LIFETIME - 1,
         "ext_expires_in": TOKEN_LIFETIME - 1, "access_token": access_token,
         "id_token": _id_token(lookalike, tenant_id, sign_in.client_id, user), "client_info": client_info.rstrip("=")},
        headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"},
    )


def issue_token(lookalike: LookAlike, tenant: str, form: Mapping[str, str], authorization: str | None) -> Response:
    """The client-credentials and device code grants of ``/{tenant}/oauth2/v2.0/token``."""
    tenant_id = _resolve_tenant(lookalike, tenant, allow_alias=False)
    if tenant_id is None:
        return _tenant_not_found(tenant)
    if form.get("grant_type") == DEVICE_CODE_GRANT:
        return redeem_device_code(lookalike, tenant_id, form)
    basic = _basic_credentials(authorization)
    client_id = form.get("client_id") or (basic[0] if basic else "")
    for name, value in (("grant_type", form.get("grant_type")), ("client_id", client_id), ("scope", form.get("scope"))):
        if not value:
            return aadsts_error(
                400, "invalid_request", 900144, f"The request body must contain the following parameter: '{name}'."
            )
    if form["grant_type"] != "client_credentials":
        return aadsts_error(
            400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type "
            f"'{form['grant_type']}'. This look-alike serves client_credentials only.",
        )

    scopes = form["scope"].split()
    if len(scopes) != 1 or not scopes[0].endswith("/.default"):
        return aadsts_error(
            400, "invalid_scope", 1002012, f"The provided value for scope {form['scope']} is not valid. Client "
            "credential flows must have a scope value with /.default suffixed to the resource identifier "
            "(application ID URI).",
        )
    resource = scopes[0].removesuffix("/.default")
    gateway_api = lookalike.directory.client_by_name(NHI_GATEWAY)
    gateway_ids = {GATEWAY_API_URI, gateway_api.app_id}
    if resource not in GRAPH_AUDIENCES and resource not in gateway_ids:
        return aadsts_error(
            400, "invalid_resource", 500011, f"The resource principal named {resource} was not found in the "
            f"tenant named {tenant}. This can happen if the application has not been installed by the "
            "administrator of the tenant or consented to by any user in the tenant. You might have sent your "
            "authentication request to the wrong tenant.",
        )

    client = lookalike.directory.clients.get(client_id.lower())
    if client is None:
        return aadsts_error(
            400, "unauthorized_client", 700016, f"Application with identifier '{client_id}' was not found in the "
            f"directory '{tenant}'. This can happen if the application has not been installed by the "
            "administrator of the tenant or consented to by any user in the tenant. You may have sent your "
            "authentication request to the wrong tenant.",
        )

    secret = form.get("client_secret") or (basic[1] if basic else None)
    assertion = form.get("client_assertion")
    if assertion:
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            return aadsts_error(
                400, "invalid_request", 50027, "Invalid client_assertion_type: expected "
                f"'{CLIENT_ASSERTION_TYPE}'.",
            )
        failure = _check_client_assertion(lookalike, tenant, client.app_id, client.certificate, assertion)
        if failure is not None:
            return aadsts_error(401, "invalid_client", *failure)
        acr = "2"
    elif secret:
        if not client.secret_matches(secret):
            return aadsts_error(
                401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being sent "
                "in the request is the client secret value, not the client secret ID, for a secret added to "
                f"app '{client.app_id}'.",
            )
        acr = "1"
    else:
        return aadsts_error(
            401, "invalid_client", 7000218, "The request body must contain the following parameter: "
            "'client_assertion' or 'client_secret'.",
        )

    if resource in gateway_ids:
        # The gateway's own API asks for v2 tokens (requestedAccessTokenVersion 2): aud is its
        # client id, whichever spelling the scope used; it defines no app roles.
        access_token = lookalike.authority.mint_app_token(
            tenant_id=tenant_id, app_id=client.app_id, object_id=client.sp_object_id,
            audience=gateway_api.app_id, version="2.0", display_name=client.name, acr=acr,
            lifetime=TOKEN_LIFETIME,
        )
        what = "a token for the gateway's API"
    else:
        # Graph's tokens are v1 whichever endpoint issued them: the resource picks the version.
        access_token = lookalike.authority.mint_app_token(
            tenant_id=tenant_id,
            app_id=client.app_id,
            object_id=client.sp_object_id,
            audience=GRAPH_APP_ID if resource == GRAPH_APP_ID else GRAPH_RESOURCE,
            version="1.0",
            roles=client.roles,
            display_name=client.name,
            acr=acr,
            lifetime=TOKEN_LIFETIME,
        )
        what = "a Graph token"
    logger.info("issued %s to %s (%s), appidacr=%s", what, client.name, client.sp_object_id, acr)
    return JSONResponse(
        {"token_type": "Bearer", "expires_in": TOKEN_LIFETIME - 1, "ext_expires_in": TOKEN_LIFETIME - 1,
         "access_token": access_token},
        headers={"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"},
    )


def _check_client_assertion(
    lookalike: LookAlike, tenant: str, client_id: str, certificate: SigningKey, assertion: str
) -> tuple[int, str] | None:
    """Verify a certificate client assertion; return (AADSTS code, description) when it fails."""
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError:
        return 50027, "JWT token is invalid or malformed."
    # MSAL writes the thumbprints base64url *with* "=" padding (x5t#S256 from the async
    # credentials, x5t from the sync ones); Entra accepts either spelling.
    def thumbprint(name: str) -> str:
        value = header.get(name)
        return value.rstrip("=") if isinstance(value, str) else ""

    if thumbprint("x5t#S256") != certificate.x5t_s256 and thumbprint("x5t") != certificate.x5t:
        return 700027, (
            "The certificate with identifier used to sign the client assertion is not registered on application."
        )
    d = lookalike.directory
    # Entra accepts the token endpoint URL of the tenant as the request named it or by GUID.
    audiences = [f"{LOGIN_HOST}/{t}/oauth2/v2.0/token" for t in {tenant, d.tenant_id, d.tenant_domain}]
    try:
        claims = jwt.decode(
            assertion,
            certificate.public_key,
            algorithms=["RS256", "PS256"],
            audience=audiences,
            options={"require": ["aud", "exp", "iss", "sub"]},
        )
    except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
        return 700024, "Client assertion is not within its valid time range."
    except jwt.InvalidAudienceError:
        return 50027, f"Invalid JWT token. The audience claim must be the token endpoint ({audiences[0]})."
    except jwt.InvalidSignatureError:
        return 7000274, "Key was found, but use of the key to verify the signature failed."
    except jwt.PyJWTError as e:
        return 50027, f"JWT token is invalid or malformed: {e}."
    if claims["iss"] != client_id or claims["sub"] != client_id:
        return 700021, "Client assertion application identifier doesn't match 'client_id' parameter."
    return None


# --- graph.microsoft.com -------------------------------------------------------------------

# Graph names the serving instance in every answer; clients log it with the request-id.
_DIAGNOSTIC = json.dumps(
    {"ServerInfo": {"DataCenter": "Look-alike", "Slice": "E", "Ring": "5", "ScaleUnit": "000",
                    "RoleInstance": "LOOPBACK"}},
    separators=(",", ":"),
)
GRAPH_CONTENT_TYPE = (
    "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"
)

READ_USERS = frozenset({"User.Read.All", "User.ReadWrite.All", "User.ReadBasic.All", "Directory.Read.All",
                        "Directory.ReadWrite.All"})
READ_GROUPS = frozenset({"Group.Read.All", "Group.ReadWrite.All", "GroupMember.Read.All", "Directory.Read.All",
                         "Directory.ReadWrite.All"})
READ_APPS = frozenset({"Application.Read.All", "Application.ReadWrite.All", "Application.ReadWrite.OwnedBy",
                       "Directory.Read.All", "Directory.ReadWrite.All"})
WRITE_ANY_APP = frozenset({"Application.ReadWrite.All"})
WRITE_OWNED_APP = frozenset({"Application.ReadWrite.OwnedBy"})

# What GET /v1.0/users returns without $select; beta returns every property.
USER_DEFAULT_V1 = ("businessPhones", "displayName", "givenName", "jobTitle", "mail", "mobilePhone",
                   "officeLocation", "preferredLanguage", "surname", "userPrincipalName", "id")


class GraphError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def graph_error_body(code: str, message: str, request_id: str, client_request_id: str) -> dict:
    return {"error": {"code": code, "message": message, "innerError": {
        "date": _utcnow().strftime("%Y-%m-%dT%H:%M:%S"),
        "request-id": request_id,
        "client-request-id": client_request_id,
    }}}


def _unauthenticated(message: str) -> GraphError:
    return GraphError(401, "InvalidAuthenticationToken", message)


def _denied() -> GraphError:
    return GraphError(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation.")


def verify_graph_token(lookalike: LookAlike, authorization: str | None) -> dict:
    """Graph's own check of the bearer token: signature over the nonce-transformed header, the
    key from the authority's published set, Graph as audience, this tenant as issuer."""
    if not authorization or not authorization.lower().startswith("bearer ") or not authorization[7:].strip():
        raise _unauthenticated("Access token is empty.")
    token = authorization[7:].strip()
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise _unauthenticated("IDX14100: JWT is not well formed.") from None
    if header.get("alg") != "RS256" or "crit" in header:
        raise _unauthenticated("Access token validation failure. Invalid algorithm.")
    lookalike.authority.refresh()
    try:
        key = lookalike.authority.key(str(header.get("kid")))
    except KeyError:
        raise _unauthenticated("Access token validation failure. Unknown signing key.") from None
    tenant_id = lookalike.directory.tenant_id
    try:
        claims = jwt.decode(
            undo_graph_nonce(token),
            key.public_key,
            algorithms=["RS256"],
            audience=list(GRAPH_AUDIENCES),
            issuer=[issuer_for(tenant_id, "1.0"), issuer_for(tenant_id, "2.0")],
            options={"require": ["exp", "nbf", "iat", "aud", "iss", "tid", "oid"]},
        )
    except (jwt.ExpiredSignatureError, jwt.ImmatureSignatureError):
        raise _unauthenticated("Lifetime validation failed, the token is expired.") from None
    except jwt.InvalidAudienceError:
        raise _unauthenticated("Access token validation failure. Invalid audience.") from None
    except jwt.InvalidIssuerError:
        raise _unauthenticated("Access token validation failure. Invalid issuer.") from None
    except (jwt.PyJWTError, TypeError, OverflowError):
        raise _unauthenticated("Access token validation failure. Invalid signature.") from None
    if claims.get("tid") != tenant_id:
        raise _unauthenticated("Access token validation failure. Invalid tenant.")
    return claims


@dataclass
class GraphCall:
    """One Graph request, outer or inside a $batch."""

    method: str
    version: str  # "v1.0" or "beta"
    path: str  # below the version, percent-decoded, no leading slash
    query: Mapping[str, str]
    body: object
    claims: dict

    @property
    def permissions(self) -> frozenset[str]:
        roles = self.claims.get("roles") or []
        scopes = str(self.claims.get("scp") or "").split()
        return frozenset([*roles, *scopes])

    def option(self, name: str) -> str | None:
        # On beta the `$` of OData system query options is optional.
        value = self.query.get(f"${name}")
        if value is None and self.version == "beta":
            value = self.query.get(name)
        return value

    @property
    def select(self) -> list[str] | None:
        value = self.option("select")
        return [s.strip() for s in value.split(",") if s.strip()] if value else None


def _require(call: GraphCall, allowed: frozenset[str]) -> None:
    if not call.permissions & allowed:
        raise _denied()


def _project(obj: dict, call: GraphCall, type_name: str, default: tuple[str, ...] | None) -> dict:
    select = call.select
    if select:
        by_lower = {k.lower(): k for k in obj}
        for name in select:
            if name.lower() not in by_lower:
                raise GraphError(400, "BadRequest",
                                 f"Could not find a property named '{name}' on type 'microsoft.graph.{type_name}'.")
        return {by_lower[n.lower()]: obj[by_lower[n.lower()]] for n in select}
    if default and call.version == "v1.0":
        return {k: obj[k] for k in default}
    return dict(obj)


def _context(call: GraphCall, entity_set: str, *, entity: bool = False) -> str:
    select = f"({','.join(call.select)})" if call.select else ""
    return f"{GRAPH_URL}/{call.version}/$metadata#{entity_set}{select}" + ("/$entity" if entity else "")


def _collection(call: GraphCall, entity_set: str, type_name: str, items: list[dict],
                default: tuple[str, ...] | None = None) -> dict:
    offset = 0
    if skiptoken := call.option("skiptoken"):
        try:
            offset = int(base64.urlsafe_b64decode(skiptoken.encode()).decode().removeprefix("offset:"))
        except ValueError:
            raise GraphError(400, "BadRequest", "The skip token is invalid.") from None
    top = call.option("top")
    try:
        page = int(top) if top else 100  # Graph's default page size for directory objects
    except ValueError:
        raise GraphError(400, "BadRequest", f"Invalid page size specified: '{top}'.") from None
    if not 1 <= page <= 999:
        raise GraphError(400, "Request_UnsupportedQuery",
                         f"Invalid page size specified: '{top}'. Must be between 1 and 999 inclusive.")
    chunk = items[offset:offset + page]
    body: dict = {"@odata.context": _context(call, entity_set)}
    if offset + page < len(items):
        params = {k: v for k, v in call.query.items() if k.lstrip("$") not in ("skiptoken",)}
        params["$skiptoken"] = base64.urlsafe_b64encode(f"offset:{offset + page}".encode()).decode()
        body["@odata.nextLink"] = f"{GRAPH_URL}/{call.version}/{entity_set}?{urllib.parse.urlencode(params, safe='$,')}"
    body["value"] = [_project(o, call, type_name, default) for o in chunk]
    return body


# $filter, $orderby and $search on users, in the few forms tests need to show that a caller can
# learn a property's values from them without ever reading it (an oracle): eq and startswith,
# joined by "and"; one property to sort by; "property:word" phrases, joined by AND.
_FILTER_CLAUSE = re.compile(
    r"\s*(?:startswith\(\s*(?P<sprop>\w+)\s*,\s*'(?P<sval>(?:[^']|'')*)'\s*\)"
    r"|(?P<eprop>\w+)\s+eq\s+'(?P<eval>(?:[^']|'')*)')\s*", re.IGNORECASE)
_SEARCH_PHRASE = re.compile(r'"(?P<prop>\w+):(?P<word>[^"]*)"')


def _property(user: dict, name: str) -> object:
    by_lower = {k.lower(): k for k in user}
    if name.lower() not in by_lower:
        raise GraphError(400, "BadRequest", f"Could not find a property named '{name}' on type 'microsoft.graph.user'.")
    return user[by_lower[name.lower()]]


def query_users(call: GraphCall, users: list[dict]) -> list[dict]:
    """``users`` as ``$filter``, ``$search`` and ``$orderby`` select and sort them."""
    out = list(users)
    if flt := call.option("filter"):
        for clause in re.split(r"\s+and\s+", flt, flags=re.IGNORECASE):
            m = _FILTER_CLAUSE.fullmatch(clause)
            if not m:
                raise GraphError(400, "BadRequest", f"Invalid filter clause: {clause}")
            if m["sprop"]:
                prop, value = m["sprop"], m["sval"].replace("''", "'").lower()
                out = [u for u in out if str(_property(u, prop) or "").lower().startswith(value)]
            else:
                prop, value = m["eprop"], m["eval"].replace("''", "'").lower()
                out = [u for u in out if str(_property(u, prop) or "").lower() == value]
    if search := call.option("search"):
        phrases = list(_SEARCH_PHRASE.finditer(search))
        if not phrases:
            raise GraphError(400, "Request_UnsupportedQuery", "Syntax error: $search must be \"property:value\".")
        for m in phrases:
            word = m["word"].lower()
            out = [u for u in out if any(t.startswith(word) for t in re.split(r"[\s@.]+", str(_property(u, m["prop"]) or "").lower()))]
    if order := call.option("orderby"):
        prop, _, direction = order.strip().partition(" ")
        out.sort(key=lambda u: str(_property(u, prop) or "").lower(), reverse=direction.strip().lower() == "desc")
    return out


# `users('x')`, `applications(appId='x')`: Graph's key-in-parentheses spellings.
_KEY_SEGMENT = re.compile(r"^(?P<name>[A-Za-z.]+)\((?:(?P<prop>\w+)=)?'(?P<key>[^']*)'\)$")


_NAMESPACE = "microsoft.graph."
# Casts Graph serves on directory objects, and the entity set of each type.
_CAST_SETS = {"microsoft.graph.user": "users", "microsoft.graph.group": "groups",
              "microsoft.graph.application": "applications", "microsoft.graph.serviceprincipal": "servicePrincipals"}
_BASE_TYPE = "microsoft.graph.directoryobject"


def _split_path(path: str) -> tuple[list[str], str | None]:
    """Path segments with key-in-parentheses spellings unfolded, and the alternate key named (if any).
    Namespace-qualified actions and functions (``microsoft.graph.addPassword``) are served as their
    unqualified names, as Graph does; casts keep their namespace."""
    segments: list[str] = []
    alternate: str | None = None
    for segment in path.strip("/").split("/"):
        if match := _KEY_SEGMENT.match(segment):
            segments += [match["name"], match["key"]]
            alternate = match["prop"].lower() if match["prop"] else None
        elif segment.lower().startswith(_NAMESPACE) and segment.lower() not in (*_CAST_SETS, _BASE_TYPE):
            segments.append(segment[len(_NAMESPACE):])
        else:
            segments.append(segment)
    return segments, alternate


# How each key named in parentheses is looked up: (id='x') is the id, appId and uniqueName are
# the alternate keys Graph documents for applications and service principals.
_KEY_FIELDS = {None: "id", "id": "id", "appid": "appId", "uniquename": "uniqueName"}


def _find_by_key(objects: list[dict], alternate: str | None, key: str) -> dict | None:
    field = _KEY_FIELDS.get(alternate)
    if field is None:
        raise GraphError(400, "BadRequest", f"'{alternate}' is not a key property of this entity set.")
    return next((o for o in objects if str(o.get(field) or "").lower() == key.lower()), None)


def _without_own_cast(rest: list[str], type_name: str) -> list[str]:
    """``{id}/microsoft.graph.application/addPassword`` is ``{id}/addPassword`` on an application."""
    if len(rest) >= 2 and rest[1].lower() in (f"{_NAMESPACE}{type_name.lower()}", _BASE_TYPE):
        return [rest[0], *rest[2:]]
    return rest


def _directory_object(lookalike: LookAlike, call: GraphCall, rest: list[str]) -> tuple[int, dict | None]:
    """``/directoryObjects/{id}``: the object whatever its type (with ``@odata.type``), and its casts
    (``/directoryObjects/{id}/microsoft.graph.application/addPassword``) served as the typed path."""
    d = lookalike.directory
    typed = [("users", "user", u) for u in d.users] + [("groups", "group", g) for g in d.groups] + \
            [("applications", "application", a) for a in d.applications()] + \
            [("servicePrincipals", "servicePrincipal", s) for s in d.service_principals()]
    if not rest:
        raise _method_not_allowed()
    found = next(((es, tn, o) for es, tn, o in typed if o["id"] == rest[0].lower()), None)
    if found is None:
        raise _not_found(rest[0])
    entity_set, type_name, obj = found
    if len(rest) >= 2 and rest[1].lower() in _CAST_SETS:
        if _CAST_SETS[rest[1].lower()] != entity_set:
            raise _not_found(rest[0])
        inner = GraphCall(call.method, call.version, "/".join([entity_set, rest[0], *rest[2:]]), call.query,
                          call.body, call.claims)
        return answer_graph(lookalike, inner)
    rest = _without_own_cast(rest, "directoryObject")
    if len(rest) == 1:
        if call.method != "GET":
            raise _method_not_allowed()
        _require(call, READ_USERS | READ_GROUPS | READ_APPS)
        return 200, {"@odata.context": _context(call, "directoryObjects", entity=True),
                     "@odata.type": f"#microsoft.graph.{type_name}", **_project(obj, call, type_name, None)}
    raise GraphError(400, "BadRequest", f"Resource not found for the segment '{rest[1]}'.")


def _not_found(key: str) -> GraphError:
    return GraphError(
        404, "Request_ResourceNotFound",
        f"Resource '{key}' does not exist or one of its queried reference-property objects are not present.",
    )


def _method_not_allowed() -> GraphError:
    return GraphError(405, "Request_BadRequest", "Specified HTTP method is not allowed for the request target.")


def answer_graph(lookalike: LookAlike, call: GraphCall) -> tuple[int, dict | None]:
    """Route one Graph call (case-insensitively, as Graph does) and return (status, JSON body)."""
    d = lookalike.directory
    segments, alternate = _split_path(call.path)
    head = segments[0].lower()
    rest = segments[1:]
    get = call.method == "GET"

    if head == "directoryobjects":
        return _directory_object(lookalike, call, rest)

    if head == "users":
        _require(call, READ_USERS)
        if not rest:
            if not get:
                raise _method_not_allowed()
            return 200, _collection(call, "users", "user", query_users(call, d.users), USER_DEFAULT_V1)
        # users/{id}, users/{userPrincipalName}, users(id='...'), users(userPrincipalName='...')
        if alternate not in (None, "id", "userprincipalname"):
            raise GraphError(400, "BadRequest", f"'{alternate}' is not a key property of users.")
        user = d.find_user(rest[0])
        if user is None:
            raise _not_found(rest[0])
        rest = _without_own_cast(rest, "user")
        return _member_of_or_entity(lookalike, call, "users", "user", user, rest, USER_DEFAULT_V1)

    if head == "groups":
        _require(call, READ_GROUPS)
        if not rest:
            if not get:
                raise _method_not_allowed()
            return 200, _collection(call, "groups", "group", d.groups)
        group = next((g for g in d.groups if g["id"] == rest[0].lower()), None)
        if group is None:
            raise _not_found(rest[0])
        return _member_of_or_entity(lookalike, call, "groups", "group", group, rest)

    if head == "applications":
        _require(call, READ_APPS)
        if not rest:
            if not get:
                raise _method_not_allowed()
            return 200, _collection(call, "applications", "application", d.applications())
        # keyCredentials[].key is returned only to $select=keyCredentials on a single object.
        with_keys = any(s.lower() == "keycredentials" for s in call.select or [])
        apps = d.applications(with_keys=with_keys)
        app = _find_by_key(apps, alternate, rest[0])
        if app is None:
            raise _not_found(rest[0])
        rest = _without_own_cast(rest, "application")
        if len(rest) == 1:
            if not get:
                raise _method_not_allowed()
            return 200, {"@odata.context": _context(call, "applications", entity=True),
                         **_project(app, call, "application", None)}
        if rest[1].lower() == "addpassword" and len(rest) == 2:
            if call.method != "POST":
                raise _method_not_allowed()
            owners = d.owners.get(app["id"], [])
            if not call.permissions & WRITE_ANY_APP and not (
                call.permissions & WRITE_OWNED_APP and call.claims.get("oid") in owners
            ):
                raise _denied()
            body = call.body if isinstance(call.body, dict) else {}
            wanted = body.get("passwordCredential") or {}
            created = d.add_password(app["id"], str(wanted.get("displayName") or ""))
            if created is None:
                raise _not_found(rest[0])
            return 200, {"@odata.context": f"{GRAPH_URL}/{call.version}/$metadata#microsoft.graph.passwordCredential",
                         **created}
        raise GraphError(400, "BadRequest", f"Resource not found for the segment '{rest[1]}'.")

    if head == "serviceprincipals":
        _require(call, READ_APPS | READ_GROUPS)
        sps = d.service_principals()
        if not rest:
            if not get:
                raise _method_not_allowed()
            return 200, _collection(call, "servicePrincipals", "servicePrincipal", sps)
        sp = _find_by_key(sps, alternate, rest[0])
        if sp is None:
            raise _not_found(rest[0])
        rest = _without_own_cast(rest, "servicePrincipal")
        return _member_of_or_entity(lookalike, call, "servicePrincipals", "servicePrincipal", sp, rest)

    raise GraphError(400, "BadRequest", f"Resource not found for the segment '{segments[0]}'.")


def _member_of_or_entity(lookalike: LookAlike, call: GraphCall, entity_set: str, type_name: str, obj: dict,
                         rest: list[str], default: tuple[str, ...] | None = None) -> tuple[int, dict | None]:
    """``/{set}/{id}``, ``/{set}/{id}/getMemberGroups`` and ``/{set}/{id}/transitiveMemberOf[/cast]``."""
    d = lookalike.directory
    if len(rest) == 1:
        if call.method != "GET":
            raise _method_not_allowed()
        return 200, {"@odata.context": _context(call, entity_set, entity=True),
                     **_project(obj, call, type_name, default)}
    action = rest[1].lower()
    by_lower = {k.lower(): k for k in obj}
    if len(rest) == 2 and action in by_lower and action not in ("id",):
        # A property path: GET /users/{id}/mobilePhone answers {"value": ...} (its raw form: /$value).
        if call.method != "GET":
            raise _method_not_allowed()
        name = by_lower[action]
        return 200, {"@odata.context": f"{GRAPH_URL}/{call.version}/$metadata#{entity_set}('{obj['id']}')/{name}",
                     "value": obj[name]}
    if action == "getmembergroups" and len(rest) == 2:
        if call.method != "POST":
            raise _method_not_allowed()
        body = call.body if isinstance(call.body, dict) else {}
        groups = d.member_groups(obj["id"], security_enabled_only=bool(body.get("securityEnabledOnly")))
        return 200, {"@odata.context": f"{GRAPH_URL}/{call.version}/$metadata#Collection(Edm.String)", "value": groups}
    cast_to_group = len(rest) == 3 and rest[2].lower() == "microsoft.graph.group"
    if action == "transitivememberof" and (len(rest) == 2 or cast_to_group):
        if call.method != "GET":
            raise _method_not_allowed()
        ids = d.member_groups(obj["id"], security_enabled_only=False)
        groups = [{"@odata.type": "#microsoft.graph.group", **g} for g in d.groups if g["id"] in ids]
        return 200, _collection(call, "groups" if cast_to_group else "directoryObjects", "group", groups)
    raise GraphError(400, "BadRequest", f"Resource not found for the segment '{rest[1]}'.")


def run_batch(lookalike: LookAlike, version: str, body: object, claims: dict) -> dict:
    """``POST /$batch``: every inner request runs through the same routes, with the outer token."""
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        raise GraphError(400, "BadRequest", "Invalid batch payload format.")
    if len(requests) > MAX_BATCH:
        raise GraphError(400, "BadRequest", f"Number of batch request steps exceeds the maximum of {MAX_BATCH}.")
    ids = [str(r.get("id", "")).lower() if isinstance(r, dict) else "" for r in requests]
    if "" in ids or len(set(ids)) != len(ids):
        raise GraphError(400, "BadRequest", "Batch request ids must be present and unique.")

    statuses: dict[str, int] = {}
    responses = []
    for request in requests:
        rid = str(request["id"])
        method = str(request.get("method", "GET")).upper()
        url = str(request.get("url", ""))
        split = urllib.parse.urlsplit(url)
        inner_headers = request.get("headers") if isinstance(request.get("headers"), dict) else {}
        lookalike.note_received(
            "graph.microsoft.com", method, f"/{version}/{url.lstrip('/')}", list(inner_headers),
            authorization=True, batch=True,
        )
        depends = request.get("dependsOn") or []
        if any(statuses.get(str(dep).lower(), 0) >= 400 for dep in depends):
            status, payload = 424, graph_error_body("FailedDependency", "Dependency failed.", str(uuid.uuid4()), "")
        else:
            call = GraphCall(
                method=method,
                version=version,
                path=urllib.parse.unquote(split.path).lstrip("/"),
                query=dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True)),
                body=request.get("body"),
                claims=claims,
            )
            try:
                status, payload = answer_graph(lookalike, call)
            except GraphError as e:
                status, payload = e.status, graph_error_body(e.code, e.message, str(uuid.uuid4()), "")
        statuses[rid.lower()] = status
        item: dict = {"id": rid, "status": status, "headers": {"Content-Type": GRAPH_CONTENT_TYPE}}
        if payload is not None:
            item["body"] = payload
        responses.append(item)
    return {"responses": responses}


def _graph_response(request: Request, status: int, body: dict | None, request_id: str,
                    client_request_id: str, extra_headers: Mapping[str, str] | None = None) -> Response:
    headers = {
        "request-id": request_id,
        "client-request-id": client_request_id,
        "x-ms-ags-diagnostic": _DIAGNOSTIC,
        "Strict-Transport-Security": "max-age=31536000",
        **(extra_headers or {}),
    }
    content = b"" if body is None else json.dumps(body, separators=(",", ":")).encode("utf-8")
    if body is not None:
        headers["Content-Type"] = GRAPH_CONTENT_TYPE
        charset = request.headers.get("x-lookalike-charset")
        if charset:
            content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(charset)
            headers["Content-Type"] = GRAPH_CONTENT_TYPE.replace("charset=utf-8", f"charset={charset}")
    return _misbehave(request, _encoded_response(request, status, content, headers))


def _misbehave(request: Request, response: Response) -> Response:
    """The answer changed as the request's ``X-LookAlike-*`` headers ask (see the module docstring)."""
    content_types = request.headers.getlist("x-lookalike-content-type")
    extra = request.headers.getlist("x-lookalike-header")
    if not content_types and not extra:
        return response
    raw = [(k, v) for k, v in response.raw_headers if not (content_types and k == b"content-type")]
    raw += [(b"content-type", v.encode("latin-1")) for v in content_types]
    for line in extra:
        name, _, value = line.partition(":")
        raw.append((name.strip().lower().encode("latin-1"), value.strip().encode("utf-8")))
    response.raw_headers = raw
    return response


# Graph answers gzip; the others are here so that tests can show the gateway masks every encoding
# mitmproxy decodes. gzip stays first whenever it is accepted, as Graph does.
_ENCODINGS = ("gzip", "br", "zstd", "deflate")


def _encoded_response(request: Request, status: int, content: bytes, headers: dict) -> Response:
    """Compressed when the client asks (Accept-Encoding), so the gateway must decode to mask."""
    accepts = [e.split(";")[0].strip().lower() for e in request.headers.get("accept-encoding", "").split(",")]
    chosen = next((e for e in _ENCODINGS if e in accepts), None)
    if content and chosen:
        if chosen == "gzip":
            content = gzip.compress(content)
        else:
            from mitmproxy.net import encoding  # brotli and zstd, as the gateway itself reads them

            content = encoding.encode(content, chosen)
        headers["Content-Encoding"] = chosen
        headers["Vary"] = "Accept-Encoding"
    return Response(content, status_code=status, headers=headers)


# Usage reports (Reports.Read.All). Graph answers with a redirect to a CSV download on another
# host; the look-alike serves the CSV itself, as text/csv, so that tests can show that text
# bodies are masked too (each row names a user by userPrincipalName).
_REPORT = re.compile(r"reports/(getOffice365ActiveUserDetail|getEmailActivityUserDetail)"
                     r"\(period='D(7|30|90|180)'\)", re.IGNORECASE)
READ_REPORTS = frozenset({"Reports.Read.All", "User.Read.All", "Directory.Read.All"})


def user_report(lookalike: LookAlike) -> str:
    rows = ["Report Refresh Date,User Principal Name,Display Name,Is Deleted,Last Activity Date,Mobile Phone"]
    today = _utcnow().date().isoformat()
    for u in lookalike.directory.users:
        rows.append(f"{today},{u['userPrincipalName']},{u['displayName']},False,{today},{u.get('mobilePhone') or ''}")
    return "\r\n".join(rows) + "\r\n"


def build_graph_app(lookalike: LookAlike) -> Starlette:
    async def graph(request: Request) -> Response:
        request_id = str(uuid.uuid4())
        client_request_id = request.headers.get("client-request-id", request_id)
        # scope["path"] is already percent-decoded: `%24batch` and `users(%27x%27)` arrive spelled out.
        version, _, rest = request.scope["path"].lstrip("/").partition("/")
        try:
            if version.lower() not in ("v1.0", "beta") or not rest:
                raise GraphError(400, "BadRequest", f"Invalid version: {version}")
            claims = verify_graph_token(lookalike, request.headers.get("authorization"))
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                raise GraphError(400, "BadRequest", "Unable to read JSON request payload.") from None
            if rest.lower() == "$batch":
                if request.method != "POST":
                    raise _method_not_allowed()
                return _graph_response(request, 200, run_batch(lookalike, version.lower(), body, claims),
                                       request_id, client_request_id)
            call = GraphCall(request.method, version.lower(), rest, dict(request.query_params), body, claims)
            if _REPORT.fullmatch(rest.strip("/")):
                if request.method != "GET":
                    raise _method_not_allowed()
                _require(call, READ_REPORTS)
                headers = {"request-id": request_id, "client-request-id": client_request_id,
                           "Content-Type": "text/csv; charset=utf-8"}
                return _encoded_response(request, 200, user_report(lookalike).encode("utf-8"), headers)
            if rest.rstrip("/").lower().endswith("/$value"):
                # The raw value of a property: text/plain, as Graph answers /users/{id}/mobilePhone/$value.
                call.path = rest.rstrip("/")[: -len("/$value")]
                status, payload = answer_graph(lookalike, call)
                if request.method != "GET" or not isinstance(payload, dict) or "value" not in payload \
                        or isinstance(payload["value"], (dict, list)):
                    raise GraphError(400, "BadRequest", "$value is only supported on a primitive property.")
                headers = {"request-id": request_id, "client-request-id": client_request_id,
                           "Content-Type": "text/plain"}
                text = "" if payload["value"] is None else str(payload["value"])
                return _misbehave(request, _encoded_response(request, 200, text.encode("utf-8"), headers))
            status, payload = answer_graph(lookalike, call)
            return _graph_response(request, status, payload, request_id, client_request_id)
        except GraphError as e:
            extra = {}
            if e.status == 401:
                extra["WWW-Authenticate"] = (
                    'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
                    f'client_id="{GRAPH_APP_ID}"'
                )
            body = graph_error_body(e.code, e.message, request_id, client_request_id)
            return _graph_response(request, e.status, body, request_id, client_request_id, extra)

    return Starlette(routes=[
        Route("/{path:path}", graph, methods=["GET", "POST", "PATCH", "PUT", "DELETE"]),
    ])


def build_app(lookalike: LookAlike) -> ASGIApp:
    login = build_login_app(lookalike)
    app = Starlette(routes=[
        Host("login.microsoftonline.com", login),
        # sts.windows.net is the v1 issuer and serves the same metadata.
        Host("sts.windows.net", login),
        Host("graph.microsoft.com", build_graph_app(lookalike)),
        # The loopback name: for clients that reach the look-alike's Entra without the gateway
        # (the approver's sign-in, `nhi-gateway approvals login --authority https://localhost:PORT`).
        Host("localhost", login),
    ])
    return ReceivedLog(app, lookalike)


# --- running it ----------------------------------------------------------------------------


def _write_atomically(path: Path, data: dict) -> None:
    # A process polling for this file must never read half of it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.chmod(0o600)  # it holds the test clients' secrets
    tmp.replace(path)


async def serve(state_dir: Path, host: str = "127.0.0.1", port: int = 0,
                on_ready: Callable[[dict], None] | None = None) -> None:
    """Serve both look-alikes until cancelled or signalled; write ``lookalike.json`` once listening."""
    state_dir = state_dir.resolve()
    info_path = state_dir / INFO_FILE
    lookalike = LookAlike.open(state_dir)
    info_path.unlink(missing_ok=True)  # never let a waiter read the previous run's port
    pki = ensure_server_pki(state_dir / "pki")
    config = uvicorn.Config(
        build_app(lookalike), host=host, port=port,
        ssl_certfile=str(pki.server_cert), ssl_keyfile=str(pki.server_key),
        lifespan="off", access_log=False, log_level="warning", server_header=False,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving  # re-raises why it could not start
            raise RuntimeError("the look-alike stopped before it was listening")
        await asyncio.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]  # the real port when asked for port 0

    d = lookalike.directory
    info = {
        "pid": os.getpid(),
        "host": host,
        "port": bound_port,
        "ca_cert": str(pki.ca_cert),
        "tenant_id": d.tenant_id,
        "tenant_domain": d.tenant_domain,
        "authority_url": f"{LOGIN_HOST}/{d.tenant_id}",
        "token_endpoint": f"{LOGIN_HOST}/{d.tenant_id}/oauth2/v2.0/token",
        "graph_url": GRAPH_URL,
        "signing_keys_dir": str(lookalike.authority.key_dir),
        "received_log": str(lookalike.received_log),
        "apps": d.client_summary(),
        # Group ids by display name, so tests and demo policies can name groups in `when: {groups}`.
        "groups": {g["displayName"]: g["id"] for g in d.groups},
        # The approval API's app registration, and where an approver signs in from outside the gateway.
        "approvals_api": d.approvals_api(),
        "local_authority": f"https://localhost:{bound_port}",
    }
    _write_atomically(info_path, info)
    logger.info("look-alike Entra ID and Graph listening on %s:%d (state in %s)", host, bound_port, state_dir)
    if on_ready is not None:
        on_ready(info)
    await serving


def run(state_dir: Path, host: str = "127.0.0.1", port: int = 0) -> None:
    """Create or load everything in ``state_dir`` and serve in this process until signalled."""
    asyncio.run(serve(state_dir, host, port))
