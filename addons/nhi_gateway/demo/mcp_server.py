"""The demo's workload: an MCP server that reads a tenant's directory through Microsoft Graph.

It is written the way such servers are written everywhere, with nothing gateway-specific in it:
the official ``mcp`` SDK for the tools, httpx for HTTP, the real Entra and Graph host names, and
the client credentials in the environment variables Azure's SDKs read (``AZURE_TENANT_ID``,
``AZURE_CLIENT_ID``, ``AZURE_CLIENT_SECRET``). The gateway is put in its path only by the
environment an agent starts it with: ``HTTPS_PROXY`` and ``SSL_CERT_FILE`` (httpx reads both).

It imports nothing from nhi_gateway. Run it over stdio: ``python mcp_server.py``.
"""

from __future__ import annotations

import hashlib
import os
import re

import httpx
import jwt
from mcp.server.mcpserver import MCPServer

AUTHORITY = os.environ.get("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com").rstrip("/")
GRAPH = "https://graph.microsoft.com"
GRAPH_SCOPE = f"{GRAPH}/.default"
TIMEOUT = 15.0
# The user name in the proxy credentials is only a label: the gateway reads the identity from the token.
PROXY_USER = "mcp-directory"

server = MCPServer(
    "mcp-directory",
    instructions="Reads users from the organisation's Microsoft Entra directory through Microsoft Graph.",
)

_access_token: str | None = None


def _client(**kwargs) -> httpx.AsyncClient:
    # trust_env (httpx's default) takes HTTPS_PROXY and SSL_CERT_FILE from the environment.
    return httpx.AsyncClient(timeout=TIMEOUT, **kwargs)


def _fingerprint(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _answer(response: httpx.Response) -> dict:
    """Status and body of a response, as the tool's caller (an LLM, a person) reads them."""
    try:
        body: object = response.json()
    except ValueError:
        body = response.text[:500]
    return {"status": response.status_code, "body": body}


def _failure(e: httpx.HTTPError) -> dict:
    # A refused CONNECT surfaces as httpx.ProxyError ("407 Proxy Authentication Required"), with
    # the proxy's status in the message and no response object.
    status = re.match(r"(\d{3}) ", str(e)) if isinstance(e, httpx.ProxyError) else None
    return {"status": int(status.group(1)) if status else None, "error": f"{type(e).__name__}: {e}"}


async def _fetch_token() -> tuple[dict, str | None]:
    tenant = os.environ["AZURE_TENANT_ID"]
    form = {
        "grant_type": "client_credentials",
        "client_id": os.environ["AZURE_CLIENT_ID"],
        "client_secret": os.environ["AZURE_CLIENT_SECRET"],
        "scope": GRAPH_SCOPE,
    }
    async with _client() as client:
        response = await client.post(f"{AUTHORITY}/{tenant}/oauth2/v2.0/token", data=form)
    answer = _answer(response)
    body = answer["body"]
    token = body.get("access_token") if isinstance(body, dict) and response.status_code == 200 else None
    return answer, token if isinstance(token, str) else None


async def _token() -> str:
    global _access_token
    if _access_token is None:
        answer, token = await _fetch_token()
        if token is None:
            raise RuntimeError(f"the token endpoint refused: {answer}")
        _access_token = token
    return _access_token


async def _list_users(token: str, top: int, **client_kwargs) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with _client(**client_kwargs) as client:
        # The literal `$top` (not %24top) is how Graph's own SDKs and docs spell it.
        response = await client.get(f"{GRAPH}/v1.0/users?$top={top}", headers=headers)
    return _answer(response)


@server.tool()
async def get_token() -> dict:
    """Get an app-only access token for Microsoft Graph (client credentials).

    Returns only a fingerprint and the token's public claims: the token itself stays in this server.
    """
    global _access_token
    try:
        answer, token = await _fetch_token()
    except httpx.HTTPError as e:
        return _failure(e)
    if token is None:
        return answer
    _access_token = token
    claims = jwt.decode(token, options={"verify_signature": False})
    return {
        "status": answer["status"],
        "fingerprint": _fingerprint(token),
        "expires_in": answer["body"].get("expires_in"),
        "claims": {k: claims.get(k) for k in ("tid", "appid", "app_displayname", "roles", "appidacr", "idtyp")},
    }


@server.tool()
async def list_users(top: int = 5) -> dict:
    """List users of the directory (GET /v1.0/users) with the token in Authorization: Bearer."""
    try:
        return await _list_users(await _token(), top)
    except httpx.HTTPError as e:
        return _failure(e)


@server.tool()
async def list_users_with_proxy_credentials(top: int = 5) -> dict:
    """List users with the token carried as proxy credentials (HTTPS_PROXY=http://name:<token>@host:port)
    and no Authorization header, for clients that cannot add headers to their requests."""
    try:
        token = await _token()
        proxy = httpx.URL(os.environ["HTTPS_PROXY"]).copy_with(username=PROXY_USER, password=token)
        return await _list_users("", top, proxy=proxy)
    except httpx.HTTPError as e:
        return _failure(e)


@server.tool()
async def add_app_password(application_id: str, display_name: str = "added by mcp-directory") -> dict:
    """Add a client secret to an application registration (POST /v1.0/applications/{id}/addPassword)."""
    try:
        token = await _token()
        async with _client() as client:
            response = await client.post(
                f"{GRAPH}/v1.0/applications/{application_id}/addPassword",
                headers={"Authorization": f"Bearer {token}"},
                json={"passwordCredential": {"displayName": display_name}},
            )
        return _answer(response)
    except httpx.HTTPError as e:
        return _failure(e)


@server.tool()
async def list_users_with_bad_token(top: int = 5) -> dict:
    """The same read as list_users, with one character of the token's signature changed."""
    try:
        token = await _token()
        header, payload, signature = token.split(".")
        # A middle character: the last one of a base64url signature may only hold padding bits.
        i = len(signature) // 2
        signature = signature[:i] + ("A" if signature[i] != "A" else "B") + signature[i + 1:]
        return await _list_users(f"{header}.{payload}.{signature}", top)
    except httpx.HTTPError as e:
        return _failure(e)


if __name__ == "__main__":
    server.run()
