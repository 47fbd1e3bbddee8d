"""Identity: who is calling.

Accepts a token only in the compact JWS form (``token_form``), verifies Entra-issued tokens as an
OIDC relying party (``tokens``) against the issuers' signing
keys (``signing_keys``), resolves the caller into a ``Principal`` (``principal``), looks up group
membership with the gateway's own Graph credential (``groups``), and classifies requests to the
token endpoint (``token_requests``).

May import: ``policy`` (rules decide which identities need a group lookup) and the standard
library, PyJWT, cryptography, httpx. Never ``addons``, ``proxy`` or ``cli``.
"""
