"""The gateway's own outbound HTTPS: OIDC metadata, JWKS and group lookups (groups.py).

These requests must never go through the gateway itself (a proxy that authorizes its own key
fetches can deadlock or be steered), so the client ignores HTTPS_PROXY (``trust_env=False``).
A ``Resolve`` map sends a host name to another address while keeping URL, Host and SNI, like
curl's ``--resolve``: that is how the loopback look-alikes of Entra and Graph are reached.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

MAX_DOCUMENT_BYTES = 1024 * 1024  # a metadata document or JWKS far bigger than this is not Entra's


@dataclass(frozen=True)
class Address:
    host: str
    port: int


def parse_resolve(entries: list[str] | tuple[str, ...]) -> dict[str, Address]:
    """``["graph.microsoft.com=127.0.0.1:8443", ...]`` -> {host: Address}. Raises ValueError."""
    out: dict[str, Address] = {}
    for entry in entries:
        name, sep, target = entry.partition("=")
        host, colon, port = target.rpartition(":")
        if not sep or not name or not colon or not host or not port.isdigit():
            raise ValueError(f"--resolve {entry!r}: expected HOST=ADDRESS:PORT")
        out[name.strip().lower().rstrip(".")] = Address(host.strip("[]"), int(port))
    return out


class EgressClient:
    def __init__(
        self,
        resolve: Mapping[str, Address] | None = None,
        ca_file: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.resolve = dict(resolve or {})
        verify: ssl.SSLContext | bool = True
        if ca_file:
            verify = ssl.create_default_context(cafile=ca_file)
        self._client = httpx.AsyncClient(
            trust_env=False, verify=verify, timeout=timeout, follow_redirects=False
        )

    def _route(self, url: str) -> tuple[str, dict[str, str], dict]:
        """The URL to connect to, headers and extensions that keep Host and SNI of ``url``."""
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"refusing to fetch {url!r}: only https URLs")
        host = parts.hostname.lower()
        headers = {"Accept": "application/json"}
        extensions = {}
        target = self.resolve.get(host)
        if target is not None:
            netloc = f"[{target.host}]" if ":" in target.host else target.host
            url = urlunsplit(("https", f"{netloc}:{target.port}", parts.path, parts.query, ""))
            headers["Host"] = parts.netloc
            extensions["sni_hostname"] = host
        return url, headers, extensions

    async def get_json(self, url: str) -> dict:
        parts = urlsplit(url)
        target, headers, extensions = self._route(url)
        response = await self._client.get(target, headers=headers, extensions=extensions)
        response.raise_for_status()
        if len(response.content) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"{parts.netloc}{parts.path}: document too large")
        return response.json()

    async def post_json(
        self,
        url: str,
        *,
        form: Mapping[str, str] | None = None,
        json_body: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, object]:
        """POST a form or JSON body; (status, parsed JSON body or None). Does not raise on an
        error status: the OAuth and Graph error bodies say what went wrong."""
        parts = urlsplit(url)
        target, route_headers, extensions = self._route(url)
        response = await self._client.post(
            target, data=form, json=json_body, headers={**(headers or {}), **route_headers}, extensions=extensions
        )
        if len(response.content) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"{parts.netloc}{parts.path}: answer too large")
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None

    async def get_json_status(self, url: str, *, headers: Mapping[str, str] | None = None) -> tuple[int, object]:
        """GET; (status, parsed JSON body or None). Does not raise on an error status: Graph's
        error body says what went wrong (the gateway's own object lookups, policy/objects.py)."""
        parts = urlsplit(url)
        target, route_headers, extensions = self._route(url)
        response = await self._client.get(target, headers={**(headers or {}), **route_headers},
                                          extensions=extensions)
        if len(response.content) > MAX_DOCUMENT_BYTES:
            raise ValueError(f"{parts.netloc}{parts.path}: answer too large")
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None

    async def aclose(self) -> None:
        await self._client.aclose()
