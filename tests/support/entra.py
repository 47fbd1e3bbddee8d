"""login.microsoftonline.com for the token verifier, without sockets, and the encodings clients use.

``Entra(authority).fetch`` is what ``KeyStore`` is given in place of the gateway's HTTPS client: it
answers the v1.0 and v2.0 discovery documents and signing keys (JWKS) of a look-alike
``EntraAuthority``, so the tokens that authority mints really verify.
"""

from __future__ import annotations

import base64

from nhi_gateway.identity.tokens import IssuerTrust
from nhi_gateway.lookalike.minting import EntraAuthority

LOGIN = "https://login.microsoftonline.com"

# Entra's two issuers (v2.0 and v1.0 tokens), each with the discovery document its keys come from:
# the ``issuers`` of a verifier's ``TrustSettings``.
ENTRA_ISSUERS = (
    IssuerTrust(f"{LOGIN}/{{tenantid}}/v2.0", f"{LOGIN}/{{tenantid}}/v2.0/.well-known/openid-configuration"),
    IssuerTrust("https://sts.windows.net/{tenantid}/", f"{LOGIN}/{{tenantid}}/.well-known/openid-configuration"),
)


class Entra:
    """Discovery and JWKS from ``authority``, like login.microsoftonline.com, or down, or hostile.

    ``mode``: ``"up"``; ``"down"`` (every fetch fails to connect); ``"garbage-keys"`` or
    ``"garbage-discovery"`` (that document is ``garbage`` instead). ``unknown`` is raised for a URL
    Entra does not serve: ``AssertionError`` (the default) when such a fetch is the test's own bug,
    ``ConnectionError`` when the verifier may meet it and must treat it as keys it cannot get.
    """

    def __init__(self, authority: EntraAuthority, mode: str = "up", garbage: object = None, *,
                 unknown: type[Exception] = AssertionError) -> None:
        self.authority = authority
        self.mode = mode
        self.garbage = garbage
        self.unknown = unknown

    @property
    def down(self) -> bool:
        return self.mode == "down"

    @down.setter
    def down(self, value: bool) -> None:
        self.mode = "down" if value else "up"

    async def fetch(self, url: str) -> dict:
        if self.down:
            raise ConnectionError("login.microsoftonline.com is down")
        tenant, _, rest = url.removeprefix(LOGIN + "/").partition("/")
        if self.mode == "garbage-keys" and "keys" in rest:
            return self.garbage
        if self.mode == "garbage-discovery" and "openid-configuration" in rest:
            return self.garbage
        if rest == "v2.0/.well-known/openid-configuration":
            return self.authority.discovery(tenant, "2.0")
        if rest == ".well-known/openid-configuration":
            return self.authority.discovery(tenant, "1.0")
        if "discovery/v2.0/keys" in rest:
            return self.authority.jwks("2.0")
        if "discovery/keys" in rest:
            return self.authority.jwks("1.0")
        raise self.unknown(f"nothing is served at {url}")


def entra_fetcher(authority: EntraAuthority):
    """``Entra(authority).fetch``: the key fetch of a verifier that trusts ``authority``."""
    return Entra(authority).fetch


def b64url(data: bytes) -> str:
    """base64url without padding, as JWT segments are written."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def basic(user: str, password: str) -> str:
    """A ``Basic`` credential, as clients send ``HTTPS_PROXY=http://user:<token>@gateway``."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
