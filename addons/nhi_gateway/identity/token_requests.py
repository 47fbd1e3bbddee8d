"""Token requests: how a client is about to authenticate to Entra, read from its token request.

A client obtains its first token with ``POST https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token``
(form encoded, ``grant_type=client_credentials``) and proves who it is in one of three ways:

- a static secret: ``client_secret`` in the body, or HTTP Basic (``client_id:client_secret``);
- a certificate: ``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer``
  and a ``client_assertion`` JWT it signed itself (``iss == sub == client_id``, header ``x5t`` or
  ``x5t#S256`` naming the certificate);
- a federated credential (workload identity federation): the same parameters, with a token from an
  external issuer (GitHub Actions, Kubernetes, another tenant's managed identity; audience
  ``api://AzureADTokenExchange``) as the assertion.

:func:`classify_token_request` tells these apart so the policy can flag or refuse static secrets
before they reach Entra. The assertion is read WITHOUT verifying its signature: the result only
classifies the request, Entra does the verifying, and nothing here is ever trusted as an identity.

Every input classifies; nothing raises. Whatever cannot be read without guessing how Entra would
read it is ``unknown``: a body that is not form encoded, compressed (the classifier never
decompresses: a few kilobytes of brotli can expand to gigabytes) or larger than
:data:`MAX_FORM_BYTES`, invalid UTF-8, a credential parameter given twice, an assertion that is
not a JWT, or no client credential at all. A static secret wins over everything else: a request
carrying one is ``client_secret`` whatever else it carries.

Parameter names are compared case-insensitively and parameters in the query string count as if
they were in the body: Entra is an ASP.NET service, and a name Entra might read must not slip past
a gateway that reads names exactly. The secret and the assertion are never kept: a
:class:`TokenGrant` holds only the client id, the tenant and the assertion's issuer.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import parse_qsl, unquote_plus

import jwt

from nhi_gateway.policy.decision import Decision, Stage
from nhi_gateway.policy.operation import Operation
from nhi_gateway.policy.model import ClientSecretGrants

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FORM_TYPE = "application/x-www-form-urlencoded"
# A client-credentials body is well under 8 KiB even with a federated token and an x5c chain.
MAX_FORM_BYTES = 64 * 1024
MAX_FIELDS = 64

# Entra ID's authority hosts in the public and national clouds.
LOGIN_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "sts.windows.net",
        "login.microsoftonline.us",
        "login.partner.microsoftonline.cn",
        "login.chinacloudapi.cn",
    }
)
# v2 (/{tenant}/oauth2/v2.0/token) and v1 (/{tenant}/oauth2/token): both take client_secret, so
# a policy that lets the v1 endpoint through must not let secrets through with it.
_TOKEN_PATH_ENDS = (("oauth2", "v2.0", "token"), ("oauth2", "token"))
_PRINTABLE = re.compile(r"[\x21-\x7e]{1,256}")


class GrantKind(StrEnum):
    CLIENT_SECRET = "client_secret"  # a static secret: the pattern this gateway exists to retire
    CERTIFICATE = "certificate"
    FEDERATED = "federated"  # workload identity federation: an external issuer's token
    UNKNOWN = "unknown"  # could not be read, or carries no client credential


SECRET_GRANT_FLAG = "client_secret_grant"  # Decision.extra["flags"]: forwarded, but a static secret
UNCLASSIFIED_GRANT_FLAG = "unclassified_grant"  # forwarded without knowing how the client authenticates
REFUSAL_CODE = "unauthorized_client"
_FLAGS = {GrantKind.CLIENT_SECRET: SECRET_GRANT_FLAG, GrantKind.UNKNOWN: UNCLASSIFIED_GRANT_FLAG}


@dataclass(frozen=True)
class TokenGrant:
    """How a token request authenticates its client. Nothing here is verified."""

    kind: GrantKind
    client_id: str = ""
    tenant: str = ""  # as the request path names it: a GUID, a domain, or common/organizations
    issuer: str = ""  # federated only: the external issuer the assertion names
    problem: str = ""  # unknown only: why the request could not be classified

    def to_dict(self) -> dict:
        """JSON-safe and free of credentials, for the decision and the audit trail."""
        out = {"kind": str(self.kind), "client_id": self.client_id, "tenant": self.tenant}
        if self.issuer:
            out["issuer"] = self.issuer
        if self.problem:
            out["problem"] = self.problem
        return out


def is_token_endpoint(op: Operation) -> bool:
    """A POST to an Entra token endpoint (v2 or v1, any tenant, any cloud)."""
    if op.method != "POST" or op.host not in LOGIN_HOSTS:
        return False
    segments = op.segments
    return any(segments[-len(end):] == end for end in _TOKEN_PATH_ENDS)


def tenant_of(path: str) -> str:
    """The tenant a token endpoint path names (``/{tenant}/oauth2/...``), or ``""``."""
    segments = path.strip("/").split("/")
    if len(segments) >= 3 and segments[0] and segments[0] != "oauth2":
        return _printable(segments[0])
    return ""


def classify_token_request(
    headers: Mapping,
    form_body: bytes,
    *,
    path: str = "",
    query: Iterable[tuple[str, str]] = (),
) -> TokenGrant:
    """How the token request authenticates its client.

    ``form_body`` is the body as received (Content-Encoding not undone); ``path`` the request
    path, for the tenant; ``query`` the decoded query parameters. Never raises.
    """
    tenant = ""
    try:
        tenant = tenant_of(path)
        return _classify(headers, form_body, query, tenant)
    except Exception as e:  # noqa: BLE001 - a hostile request must classify as unknown, never raise
        problem = f"the request could not be read ({type(e).__name__})"
        return TokenGrant(GrantKind.UNKNOWN, tenant=tenant, problem=problem)


def _classify(headers: Mapping, body: bytes, query: Iterable[tuple[str, str]], tenant: str) -> TokenGrant:
    def unknown(problem: str, client_id: str = "") -> TokenGrant:
        return TokenGrant(GrantKind.UNKNOWN, client_id=client_id, tenant=tenant, problem=problem)

    # RFC 6749 2.3.1: Basic carries the client secret; no body needs reading to know that.
    for value in _header_values(headers, "authorization"):
        scheme, _, credentials = value.strip().partition(" ")
        if scheme.lower() == "basic":
            return TokenGrant(GrantKind.CLIENT_SECRET, client_id=_basic_client_id(credentials), tenant=tenant)

    params: dict[str, list[str]] = {}
    for name, value in query:
        params.setdefault(name.strip().casefold(), []).append(value)
    if not isinstance(body, bytes | bytearray | memoryview):
        return unknown("the body is not bytes")
    if len(body) > MAX_FORM_BYTES:
        return unknown(f"the body is larger than {MAX_FORM_BYTES} bytes")
    encodings = [v.strip().lower() for v in _header_values(headers, "content-encoding")]
    if any(e not in ("", "identity") for e in encodings):
        return unknown("the body is compressed (Content-Encoding); send it as a plain form")
    if body:
        types = _header_values(headers, "content-type")
        if len(types) != 1 or types[0].split(";", 1)[0].strip().lower() != FORM_TYPE:
            return unknown(f"the body is not {FORM_TYPE}")
        try:
            fields = parse_qsl(
                bytes(body).decode("utf-8"),
                keep_blank_values=True,
                encoding="utf-8",
                errors="strict",
                max_num_fields=MAX_FIELDS,
            )
        except UnicodeDecodeError:
            return unknown("the body is not valid UTF-8")
        except ValueError:
            return unknown(f"the body has more than {MAX_FIELDS} parameters")
        for name, value in fields:
            params.setdefault(name.strip().casefold(), []).append(value)

    client_ids = params.get("client_id", [])
    named_client = client_ids[0].strip() if len(client_ids) == 1 else ""
    client_id = _printable(named_client)
    if any(v.strip() for v in params.get("client_secret", [])):
        return TokenGrant(GrantKind.CLIENT_SECRET, client_id=client_id, tenant=tenant)
    for name in ("client_id", "client_assertion", "client_assertion_type"):
        if len(params.get(name, [])) > 1:
            return unknown(f"'{name}' is given more than once", client_id)
    assertions = params.get("client_assertion", [])
    if not assertions or not assertions[0].strip():
        return unknown("no client credential (client_secret, HTTP Basic or client_assertion)", client_id)
    if params.get("client_assertion_type") != [CLIENT_ASSERTION_TYPE]:
        return unknown(f"client_assertion_type is not {CLIENT_ASSERTION_TYPE}", client_id)
    return _classify_assertion(assertions[0].strip(), named_client, client_id, tenant)


def _classify_assertion(assertion: str, named_client: str, client_id: str, tenant: str) -> TokenGrant:
    def unknown(problem: str) -> TokenGrant:
        return TokenGrant(GrantKind.UNKNOWN, client_id=client_id, tenant=tenant, problem=problem)

    try:
        # Unverified on purpose: this only classifies; Entra verifies the signature.
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        return unknown("client_assertion is not a JWT")
    iss, sub = claims.get("iss"), claims.get("sub")
    if not isinstance(iss, str) or not isinstance(sub, str) or not iss.strip() or not sub.strip():
        return unknown("client_assertion has no iss or sub")
    if iss == sub:
        # A certificate assertion: the client vouches for itself, signed with its certificate.
        if named_client and iss.lower() != named_client.lower():
            return unknown("client_assertion names another client than client_id")
        thumbprint = header.get("x5t#S256") or header.get("x5t")
        if not isinstance(thumbprint, str) or not thumbprint.strip():
            return unknown("certificate client_assertion names no certificate (x5t or x5t#S256)")
        return TokenGrant(GrantKind.CERTIFICATE, client_id=client_id or _printable(iss), tenant=tenant)
    if not iss.startswith("https://"):
        return unknown("client_assertion's issuer is neither the client nor an https issuer")
    return TokenGrant(GrantKind.FEDERATED, client_id=client_id, tenant=tenant, issuer=_printable(iss))


def judge_grant(setting: ClientSecretGrants, decision: Decision, grant: TokenGrant) -> Decision:
    """The rules' allow for a token request, flagged or turned into a refusal by the policy's
    ``identity.client_secret_grants``. The grant (never a credential) goes into ``extra``."""
    extra = {**decision.extra, "grant": grant.to_dict()}
    if setting is ClientSecretGrants.REFUSE and grant.kind not in (GrantKind.CERTIFICATE, GrantKind.FEDERATED):
        if grant.kind is GrantKind.CLIENT_SECRET:
            check = SECRET_GRANT_FLAG
            reason = (
                "the static client secret grant is refused by this gateway's policy "
                "(identity.client_secret_grants: refuse); authenticate with a certificate or a "
                "federated credential (workload identity federation, managed identity) instead"
            )
        else:
            check = UNCLASSIFIED_GRANT_FLAG
            reason = (
                f"the token request could not be classified: {grant.problem}; this gateway's policy "
                "(identity.client_secret_grants: refuse) forwards only certificate and federated "
                "credential grants"
            )
        return Decision.deny(
            Stage.POLICY, 403, REFUSAL_CODE, reason, check=check,
            operation=decision.operation, principal=decision.principal, extra=extra,
        )
    if setting is ClientSecretGrants.FLAG:
        flag = _FLAGS.get(grant.kind)
        if flag is not None:
            extra["flags"] = [*extra.get("flags", ()), flag]
    return decision.but(extra=extra)


def refusal_body(decision: Decision, request_id: str) -> bytes:
    """A refused token request answered as an OAuth error (RFC 6749 5.2): the shape MSAL and
    Azure.Identity read ``error_description`` from and show their users."""
    body = {
        "error": decision.code,
        "error_description": f"nhi-gateway: {decision.reason}",
        "nhi-gateway": {
            "request-id": request_id,
            "stage": str(decision.stage),
            "check": decision.check,
            "grant": (decision.extra.get("grant") or {}).get("kind"),
        },
    }
    return json.dumps(body).encode()


def _header_values(headers: Mapping, name: str) -> list[str]:
    """Every value of a header, by case-insensitive name, from mitmproxy's Headers or a dict."""
    get_all = getattr(headers, "get_all", None)
    if callable(get_all):
        values = get_all(name)
    else:
        values = [v for k, v in headers.items() if isinstance(k, str) and k.lower() == name]
    return [v if isinstance(v, str) else bytes(v).decode("latin-1") for v in values]


def _basic_client_id(credentials: str) -> str:
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return ""
    client_id, sep, _ = decoded.partition(":")
    return _printable(unquote_plus(client_id)) if sep else ""


def _printable(value: str) -> str:
    """``value`` if it is short printable ASCII (a GUID, a domain, an issuer URL), else ``""``:
    what a hostile client sends must not put control characters or megabytes into the audit."""
    value = value.strip()
    return value if _PRINTABLE.fullmatch(value) else ""
