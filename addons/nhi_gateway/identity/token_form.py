"""The one shape a token may have: the exact JWS compact serialization (RFC 7515 section 7.1).

Three base64url segments joined by dots, and nothing else: no whitespace, CR or LF, no ``=``
padding, no standard-base64 ``+``/``/``. Checked before any library reads the token, because what
a library tolerates is not what a header can carry: PyJWT before 2.14 verified a signature segment
with CR LF and more after it, and the gateway then wrote that string into the upstream
``Authorization`` header (header injection, and a second request smuggled to Graph). A token that
is not in this form is never trimmed into shape: it is refused.
"""

from __future__ import annotations

import re

# \Z, not $: "$" also matches before a final newline. The signature may be empty here, so that
# the verifier names an unsigned ("alg": "none") token for what it is.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")

NOT_COMPACT = ("token is not a compact JWS (three base64url segments joined by dots, with no "
               "whitespace, line breaks or padding)")


def is_compact_jws(token: object) -> bool:
    return isinstance(token, str) and _COMPACT_JWS.match(token) is not None
