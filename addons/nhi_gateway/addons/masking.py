"""Masking: sensitive fields never reach the caller in a response the policy masks."""

from __future__ import annotations

import logging

from mitmproxy import http

from ..decision import Decision, Stage
from ..masking import MaskingError, is_json_content_type, mask_json_bytes
from ..policy import PolicyStore
from .failclosed import REFUSED_KEY, decision_of, fail_closed, refuse, set_decision

logger = logging.getLogger(__name__)


def _refusal(reason: str, decision: Decision | None) -> Decision:
    return Decision.deny(
        Stage.MASKING, 502, "BadGateway",
        f"the upstream response was withheld: {reason}",
        check="masking", rule_id=decision.rule_id if decision else None,
    )


class Masking:
    def __init__(self, policies: PolicyStore) -> None:
        self.policies = policies

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(REFUSED_KEY) or flow.response is None:
            return
        decision = decision_of(flow)
        if decision is None or not decision.allowed or not decision.mask_profile:
            return  # the guard answers for flows without an allow; nothing to mask otherwise
        profile = self.policies.current.mask_profiles.get(decision.mask_profile)
        if profile is None:
            # The policy was reloaded without the profile this flow was allowed under.
            refuse(flow, _refusal(f"mask profile {decision.mask_profile!r} no longer exists", decision))
            return
        content_type = flow.response.headers.get("Content-Type", "")
        if not flow.response.raw_content or not is_json_content_type(content_type):
            return
        try:
            # strict: a body that cannot be decoded from its Content-Encoding is refused, not passed.
            body = flow.response.get_content(strict=True)
            masked, count = mask_json_bytes(body, profile.fields)
        except (MaskingError, ValueError) as e:
            logger.warning("flow %s: response withheld: %s", flow.id, e)
            refuse(flow, _refusal(f"a {content_type or 'JSON'} body could not be masked ({e})", decision))
            return
        if count:
            flow.response.set_content(masked)  # re-encodes with the original Content-Encoding
        set_decision(flow, decision.but(extra={**decision.extra, "masked_fields": count}))
