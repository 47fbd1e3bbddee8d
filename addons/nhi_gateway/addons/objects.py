"""Objects: which object a request names when it names it by an alternate key.

Sits between Membership and Authorization. ``applications(appId='...')``, a user's UPN or
``/directoryObjects/{id}`` name an object the policy may name by its id; when a rule could decide
such a request otherwise once the object is known (:func:`nhi_gateway.policy.objects.deciding_rules`),
the key is resolved with the gateway's own Graph credential (cached) and the answer travels with
the flow (``flow.metadata[OBJECTS_KEY]``) for Authorization to judge the object. A key that cannot
be resolved refuses the request here: 503 when Graph or the credential fails (or there is none),
403 when Graph knows no such object. Requests that no rule could decide otherwise never wait.
The inner requests of a ``$batch`` are resolved the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from mitmproxy import http

from nhi_gateway.addons.authorization import operation_of
from nhi_gateway.addons.failclosed import fail_closed, refuse
from nhi_gateway.addons.identity import PRINCIPAL_KEY
from nhi_gateway.policy.batch import BatchError, decode_body, is_batch_endpoint, parse_batch
from nhi_gateway.policy.loader import PolicyStore
from nhi_gateway.policy.model import Policy, Rule
from nhi_gateway.policy.objects import (
    OBJECTS_KEY,
    ObjectKey,
    ObjectLookupFailed,
    ObjectResolver,
    deciding_rules,
    literal_object_rules,
    object_key,
    unresolved,
)
from nhi_gateway.policy.operation import Operation, OperationError

logger = logging.getLogger(__name__)


def keys_to_resolve(policy: Policy, principal, op: Operation, flow: http.HTTPFlow
                    ) -> Iterator[tuple[Operation, ObjectKey, list[Rule]]]:
    """The object keys of the request (and of each inner request of a batch) that matter."""
    ops = [op]
    if is_batch_endpoint(op) and op.method == "POST":
        r = flow.request
        try:
            batch = parse_batch(decode_body(r.raw_content or b"", ",".join(r.headers.get_all("content-encoding"))),
                                op, r.headers.get("content-type", ""))
        except BatchError:
            return  # Authorization refuses it whole, saying why
        ops = [inner.operation for inner in batch.requests if inner.operation is not None]
    for each in ops:
        key = object_key(each)
        if key is not None and (rules := deciding_rules(policy, principal, each, key)):
            yield each, key, rules


class ObjectNames:
    def __init__(self, policies: PolicyStore, resolver: ObjectResolver | None) -> None:
        self.policies = policies
        self.resolver = resolver  # None: no Graph credential configured
        self._warned: Policy | None = None
        self.warn_unresolvable()

    def warn_unresolvable(self) -> None:
        policy = self.policies.current
        if self._warned is policy or self.resolver is not None:
            return
        self._warned = policy
        rules = sorted({rule.id for rule, _ in literal_object_rules(policy)})
        if rules:
            logger.warning("rules %s name objects by id but no Graph credential is configured: requests that "
                           "name those objects by an alternate key (appId, uniqueName, a UPN, directoryObjects) "
                           "are refused (503)", ", ".join(rules))

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        try:
            op = operation_of(flow)
        except OperationError:
            return  # Authorization refuses it, saying why
        if not op.is_graph:
            return
        self.warn_unresolvable()
        principal = flow.metadata.get(PRINCIPAL_KEY)
        resolved: dict[str, list[str]] = {}
        for named, key, rules in keys_to_resolve(self.policies.current, principal, op, flow):
            if key.cache_key in resolved:
                continue
            try:
                if self.resolver is None:
                    raise ObjectLookupFailed("no Graph credential is configured for the gateway "
                                             "(--graph-client-id, --graph-tenant-id and a certificate or secret)")
                resolved[key.cache_key] = list(await self.resolver.resolve(key))
            except ObjectLookupFailed as e:
                logger.error("flow %s: %s: cannot resolve %s: %s", flow.id, named, key.describe(), e)
                refuse(flow, unresolved(named, key, rules, principal, str(e), e.status))
                return
        if resolved:
            flow.metadata[OBJECTS_KEY] = resolved
