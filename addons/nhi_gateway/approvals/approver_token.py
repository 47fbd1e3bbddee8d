"""What an approver's token must be: a person's delegated token for the gateway's own API.

An approver who could answer with their Graph token would hand that power to every app that holds
one of their Graph tokens: an MCP server acting on the person's behalf (delegated permissions,
on-behalf-of) could approve its own held request as that person, and no self-approval check would
notice, since the requester is the agent's app and the approver is the person. So the approval API
trusts the policy's tenants and issuers, but only for tokens

- whose ``aud`` is the gateway's own app registration (``approvals.client_id`` for v2 tokens, its
  App ID URI for v1 tokens);
- that are delegated tokens of a person: ``scp`` present and holding ``approvals.scope``; no
  app-only token (``idtyp: app``, or no ``scp``), no managed identity (``xms_mirid``);
- that a public client obtained (``appidacr``/``azpacr`` "0": the person signed in on their own
  device, with ``nhi-gateway approvals login`` or the Azure CLI). On-behalf-of needs a confidential
  client, so a service that exchanges a person's token for one of the approval API's (an MCP server
  acting for the person) presents "1" or "2" and is refused;
- that carry the step-up the policy asks for: ``approvals.require_auth_context`` in ``acrs`` (a
  Conditional Access authentication context, which Entra issues only after the step-up the tenant
  binds to it), ``approvals.require_mfa`` as ``mfa`` in ``amr`` (v1 tokens; v2 tokens have no ``amr``).

Each refusal names its check (``ApproverRefused.check``), so the 401 says what to fix.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, replace

from nhi_gateway.identity.principal import AuthMethod, Principal
from nhi_gateway.identity.tokens import TrustSettings
from nhi_gateway.policy.model import ApprovalsConfig

LOGIN_HINT = "sign in with: nhi-gateway approvals login"


class ApproverRefused(Exception):
    """The token is valid, but not an approver's token for this gateway."""

    def __init__(self, check: str, message: str, claims_challenge: str | None = None) -> None:
        super().__init__(message)
        self.check = check
        self.message = message
        # For a missing authentication context: the claims an MSAL client asks Entra for.
        self.claims_challenge = claims_challenge


@dataclass(frozen=True)
class ApproverRequirements:
    """The ``approvals`` section as the approval API applies it."""

    audiences: frozenset[str]
    scope: str
    auth_context: str | None = None
    mfa: bool = False

    @classmethod
    def of(cls, section: ApprovalsConfig | None) -> ApproverRequirements:
        section = section or ApprovalsConfig()
        return cls(section.audiences, section.scope, section.require_auth_context, section.require_mfa)

    def check_configured(self) -> None:
        if not self.audiences:
            raise ApproverRefused(
                "approver_audience",
                "the policy names no app registration for the approval API (approvals.client_id), so no "
                "token can prove an approver: ask the gateway's administrator to set approvals.client_id, "
                "app_id_uri and scope")

    def trust(self, base: TrustSettings) -> TrustSettings:
        """The policy's token trust with the approval API's audiences in place of Graph's."""
        return replace(base, audiences=self.audiences)


def auth_context_claims(context: str) -> str:
    """The ``claims`` request parameter that asks Entra for an authentication context."""
    return json.dumps({"access_token": {"acrs": {"essential": True, "value": context}}}, separators=(",", ":"))


def claims_challenge(context: str) -> str:
    """The ``WWW-Authenticate`` value of a claims challenge (MSAL clients answer it)."""
    encoded = base64.b64encode(auth_context_claims(context).encode()).decode()
    return (f'Bearer realm="nhi-gateway", error="insufficient_claims", '
            f'error_description="the approval API requires authentication context {context}", '
            f'claims="{encoded}"')


def _strings(claims: dict, name: str) -> list[str]:
    value = claims.get(name)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def check_approver_token(claims: dict, principal: Principal, needs: ApproverRequirements) -> None:
    """Raise :class:`ApproverRefused` unless the (verified) token is a person's delegated token
    with the scope and step-up the policy asks for. ``claims`` are the verified token's payload."""
    idtyp = claims.get("idtyp")
    if principal.app_only or idtyp == "app" or not isinstance(claims.get("scp"), str):
        raise ApproverRefused(
            "approver_person",
            "the approval API accepts a person's own delegated token only, not an app-only token "
            f"(no scp, or idtyp app): {LOGIN_HINT}")
    if principal.managed_identity or "xms_mirid" in claims:
        raise ApproverRefused("approver_person", "a managed identity's token cannot approve")
    if idtyp is not None and idtyp != "user":
        raise ApproverRefused("approver_person", f"a token with idtyp {str(idtyp)[:20]!r} is not a person's")
    if principal.auth_method is not AuthMethod.PUBLIC_CLIENT:
        raise ApproverRefused(
            "approver_client",
            f"the token was obtained by a confidential client ({principal.auth_method}), i.e. by a service on the "
            f"person's behalf (on-behalf-of), not by the person signing in: {LOGIN_HINT}")
    if needs.scope not in principal.scopes:
        raise ApproverRefused(
            "approver_scope",
            f"the token does not carry the scope {needs.scope} of the approval API: {LOGIN_HINT}")
    if needs.auth_context and needs.auth_context not in _strings(claims, "acrs"):
        raise ApproverRefused(
            "approver_auth_context",
            f"the approval API requires authentication context {needs.auth_context} (a step-up such as MFA); "
            f"the token does not carry it in acrs: {LOGIN_HINT}",
            claims_challenge(needs.auth_context))
    if needs.mfa and "mfa" not in _strings(claims, "amr"):
        raise ApproverRefused(
            "approver_mfa",
            "the approval API requires multi-factor sign-in; the token's amr does not contain mfa "
            f"(v2 tokens carry no amr: use approvals.require_auth_context instead): {LOGIN_HINT}")


__all__ = ["ApproverRefused", "ApproverRequirements", "auth_context_claims", "check_approver_token",
           "claims_challenge"]
