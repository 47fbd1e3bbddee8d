"""Membership: the caller's groups, for policies that name them.

Sits between Identity and Authorization. App-only tokens carry no groups (and overage tokens
carry a pointer instead of them), so when a rule with ``when: {groups: ...}`` could decide the
request, the verified Principal is replaced by one whose groups the gateway resolved from Graph
with its own credential (:mod:`nhi_gateway.identity.groups`). A lookup that fails refuses such a request
with 503; a request that no group rule could affect never waits for Graph.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from mitmproxy import http

from nhi_gateway.policy.decision import Decision, Stage
from nhi_gateway.identity.groups import GroupLookupFailed, GroupResolver, GroupRules, needs_lookup
from nhi_gateway.policy.operation import OperationError
from nhi_gateway.policy.loader import PolicyStore
from nhi_gateway.addons.authorization import operation_of
from nhi_gateway.addons.failclosed import fail_closed, refuse
from nhi_gateway.addons.identity import PRINCIPAL_KEY

logger = logging.getLogger(__name__)


class Membership:
    def __init__(self, policies: PolicyStore, resolver: GroupResolver | None) -> None:
        self.policies = policies
        self.resolver = resolver  # None: no Graph credential configured
        self._rules: GroupRules | None = None
        self.group_rules()  # warns at start when rules on groups have no credential to serve them

    def group_rules(self) -> GroupRules:
        policy = self.policies.current
        if self._rules is None or self._rules.policy is not policy:
            self._rules = GroupRules(policy)
            if self._rules and self.resolver is None:
                logger.warning("the policy has rules on groups but no Graph credential is configured: "
                               "requests those rules could decide are refused (503)")
        return self._rules

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        principal = flow.metadata.get(PRINCIPAL_KEY)
        if principal is None or not any(needs_lookup(p) for p in principal.every_token()):
            return
        rules = self.group_rules()
        if not rules:
            return
        try:
            op = operation_of(flow)
        except OperationError:
            return  # Authorization refuses it, saying why
        if not any(rules.could_apply(p.with_sources(principal.token_sources), op) for p in principal.every_token()):
            return
        try:
            if self.resolver is None:
                raise GroupLookupFailed("no Graph credential is configured for the gateway "
                                        "(--graph-client-id, --graph-tenant-id and a certificate or secret)")
            resolved = await self.resolver.with_groups(principal)
            if principal.presented:
                # Every token is judged on its own, so each gets the groups (one lookup: they
                # name one principal, and the resolver caches by it).
                resolved = replace(resolved, presented=tuple(
                    [await self.resolver.with_groups(p) for p in principal.presented]))
        except GroupLookupFailed as e:
            logger.error("flow %s: groups of %s unavailable: %s", flow.id, principal.label, e)
            refuse(flow, Decision.deny(
                Stage.IDENTITY, 503, "ServiceUnavailable",
                f"the decision depends on the caller's group membership, which the gateway could not "
                f"resolve ({e}); the request was refused (fail closed). Retry later.",
                check="groups_unavailable", operation=str(op), principal=principal.to_dict(),
            ))
            return
        flow.metadata[PRINCIPAL_KEY] = resolved
        logger.debug("flow %s: %s is in %d groups", flow.id, principal.label, len(resolved.groups))
