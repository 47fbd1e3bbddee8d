"""The policy's decision for a request that presented more than one token.

A request may carry a token in the proxy credentials and another in ``Authorization: Bearer``.
Both name the same principal (identity refuses otherwise), but they can differ in everything a
rule looks at: how the client authenticated (certificate or secret), app-only or delegated,
managed identity, roles (each token holds the roles of its own audience). Every token must pass
every rule condition: the request is decided for each token on its own, and

- any refusal refuses the request, naming the token it was for ("the proxy token: ...");
- an approval needed for either token is needed for the request;
- otherwise every token is allowed, and the request gets the one decision they share. Rules that
  mask differently cannot both apply to one answer: such a request is refused (``check: tokens``)
  rather than masked by the weaker profile. In report mode, the report of a token that a rule
  would refuse or hold is the one the decision carries.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from nhi_gateway.identity.principal import Principal
from nhi_gateway.policy.decision import Decision, Stage
from nhi_gateway.policy.operation import Operation

REFUSAL_STATUS = 403
REFUSAL_CODE = "Authorization_RequestDenied"


class Decider(Protocol):
    def decide(self, principal: Principal | None, op: Operation, at: datetime | None = None) -> Decision: ...


class EveryPresentedToken:
    """A decider (like :class:`~nhi_gateway.policy.model.Policy`) that judges ``principal``'s every
    presented token; the ``principal`` passed to :meth:`decide` is ignored (a batch passes the
    request's own)."""

    def __init__(self, policy: Decider, principal: Principal) -> None:
        self.policy = policy
        self.principal = principal
        self.who = principal.to_dict()

    def decide(self, _principal: Principal | None, op: Operation, at: datetime | None = None) -> Decision:
        # `when.token_sources` is about the request (where it carried tokens), not one token.
        sources = self.principal.token_sources
        judged = [(p, self.policy.decide(p.with_sources(sources), op, at)) for p in self.principal.every_token()]
        for p, d in judged:
            if not d.allowed and not d.needs_approval:
                return d.but(reason=f"the {_source(p)} token ({p.auth_method}): {d.reason}", principal=self.who)
        for _, d in judged:
            if d.needs_approval:
                return d.but(principal=self.who)
        profiles = {d.mask_profile for _, d in judged}
        if len(profiles) > 1:
            why = "; ".join(f"the {_source(p)} token by rule '{d.rule_id}' (mask {d.mask_profile or 'none'})"
                            for p, d in judged)
            return Decision.deny(
                Stage.POLICY, REFUSAL_STATUS, REFUSAL_CODE,
                f"the request's tokens are allowed by rules that mask the answer differently ({why}); "
                "one answer gets one mask: let one rule cover every token of the request",
                check="tokens", rule_id=judged[0][1].rule_id, operation=str(op), principal=self.who)
        # Report mode: a token a reporting rule would refuse or hold is forwarded, and its report
        # (not the other token's clean allow) is what the decision and the audit line carry.
        reported = [(p, d) for p, d in judged if d.reported]
        if reported:
            p, d = reported[0]
            report = {**d.reported, "reason": f"the {_source(p)} token ({p.auth_method}): {d.reported.get('reason', '')}"}
            return d.but(principal=self.who, extra={**d.extra, "report": report})
        return judged[-1][1].but(principal=self.who)


def _source(p: Principal) -> str:
    return str(p.token_sources[0]) if p.token_sources else "presented"


def decider_for(policy: Decider, principal: Principal | None) -> Decider:
    """The policy itself for a request with at most one token; every token judged otherwise."""
    if principal is None or not principal.presented:
        return policy
    return EveryPresentedToken(policy, principal)
