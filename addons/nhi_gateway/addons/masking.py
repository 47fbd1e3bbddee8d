"""Masking: what the policy masks never reaches the caller, whatever the body's type or encoding.

The body is decoded from its Content-Encoding (gzip, br, zstd, deflate) strictly, masked by the
flow's mask profile (:func:`nhi_gateway.masking.masks.mask_body`) and encoded again with the same
Content-Encoding. A body that cannot be decoded or parsed as its declared type, or a binary body
under a profile that refuses them, is withheld: 502, never passed on unmasked.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from nhi_gateway.policy.batch import BATCH_KEY, mask_batch_response
from nhi_gateway.policy.decision import Decision, Stage
from nhi_gateway.masking.masks import BodyKind, MaskingError, MaskProfile, body_kind, mask_body, mask_json_bytes, media_type
from nhi_gateway.policy.loader import PolicyStore
from nhi_gateway.addons.failclosed import REFUSED_KEY, decision_of, fail_closed, refuse, set_decision

logger = logging.getLogger(__name__)


def _refusal(reason: str, decision: Decision | None) -> Decision:
    return Decision.deny(
        Stage.MASKING, 502, "BadGateway",
        f"the upstream response was withheld: {reason}",
        check="masking", rule_id=decision.rule_id if decision else None,
        extra={"batch": decision.extra["batch"]} if decision and "batch" in decision.extra else {},
    )


class _MissingProfile(LookupError):
    pass


def mask_response(response: http.Response, profile: MaskProfile) -> int | None:
    """Mask a response body in place; the number of values masked, or ``None`` when the body was
    left exactly as it came (nothing a profile could change, or a binary body it passes).

    Raises :class:`MaskingError` (or ``ValueError``/``TypeError`` from a Content-Encoding that
    does not decode) when the body must be withheld.
    """
    content_type = response.headers.get("Content-Type", "")
    kind = body_kind(content_type)
    if kind is BodyKind.BINARY and not profile.refuses_binary:
        return None  # not even decoded: nothing in it is a field, a path or scanned text
    if kind is BodyKind.TEXT and not profile.scans_text:
        return None  # no field or path names anything in text, and there are no detectors
    # strict: a body that cannot be decoded from its Content-Encoding is refused, not passed.
    body = response.get_content(strict=True)
    if kind is BodyKind.JSON:
        masked, count = mask_json_bytes(body, profile)
    else:
        masked, count = mask_body(body, content_type, profile)
        if masked is body:
            return None
    # JSON is always the re-serialised document, even with nothing masked: a body with a
    # duplicated key ({"value":[...secret...],"value":[]}) must not reach a first-key-wins parser.
    response.set_content(masked)  # re-encodes with the original Content-Encoding
    return count


class Masking:
    def __init__(self, policies: PolicyStore) -> None:
        self.policies = policies

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(REFUSED_KEY) or flow.response is None:
            return
        decision = decision_of(flow)
        if decision is not None and decision.allowed and "batch" in decision.extra:
            self._mask_batch(flow, decision)
            return
        if decision is None or not decision.allowed or not decision.mask_profile:
            return  # the guard answers for flows without an allow; nothing to mask otherwise
        profile = self.policies.current.mask_profiles.get(decision.mask_profile)
        if profile is None:
            # The policy was reloaded without the profile this flow was allowed under.
            refuse(flow, _refusal(f"mask profile {decision.mask_profile!r} no longer exists", decision))
            return
        if not flow.response.raw_content:
            return
        content_type = flow.response.headers.get("Content-Type", "")
        try:
            count = mask_response(flow.response, profile)
        except (MaskingError, ValueError, TypeError) as e:
            logger.warning("flow %s: response withheld: %s", flow.id, e)
            what = media_type(content_type) or "untyped"
            refuse(flow, _refusal(f"a {what} body could not be masked ({e})", decision))
            return
        if count is not None:
            set_decision(flow, decision.but(extra={**decision.extra, "masked_fields": count}))

    def _mask_batch(self, flow: http.HTTPFlow, decision: Decision) -> None:
        """Each inner response of a ``$batch`` masked by its own inner request's profile."""
        entries = [dict(e) for e in decision.extra["batch"]]
        for e in entries:
            e["sent"] = True  # the batch reached Graph: the record must say so, whatever follows
        flow.metadata[BATCH_KEY] = entries
        decision = decision.but(extra={**decision.extra, "batch": entries})
        set_decision(flow, decision)
        profiles = self.policies.current.mask_profiles

        def profile_of(name: str) -> MaskProfile:
            profile = profiles.get(name)
            if profile is None:
                raise _MissingProfile(name)
            return profile

        masks = any(e.get("mask_profile") for e in entries)
        content_type = flow.response.headers.get("Content-Type", "")
        if not flow.response.raw_content:
            return
        if body_kind(content_type) is not BodyKind.JSON:
            if masks:
                logger.warning("flow %s: batch response withheld: %s is not JSON", flow.id, content_type)
                refuse(flow, _refusal(f"a batch answer of type {content_type or 'unknown'!r} cannot be masked",
                                      decision))
            return
        try:
            body = flow.response.get_content(strict=True)
            masked, entries, count = mask_batch_response(body, entries, profile_of)
        except _MissingProfile as e:
            refuse(flow, _refusal(f"mask profile {e.args[0]!r} no longer exists", decision))
            return
        except (MaskingError, ValueError, TypeError) as e:
            logger.warning("flow %s: batch response withheld: %s", flow.id, e)
            refuse(flow, _refusal(f"the batch answer could not be masked ({e})", decision))
            return
        # Always re-serialised: a member repeated in Graph's bytes must not reach the client unmasked.
        flow.response.set_content(masked)  # re-encodes with the original Content-Encoding
        flow.metadata[BATCH_KEY] = entries
        set_decision(flow, decision.but(extra={**decision.extra, "batch": entries, "masked_fields": count}))
