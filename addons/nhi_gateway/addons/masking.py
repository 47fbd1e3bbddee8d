"""Masking: what the policy masks never reaches the caller, whatever the body's type or encoding.

The body is decoded from its Content-Encoding (gzip, br, zstd, deflate) strictly, masked by the
flow's mask profile (:func:`nhi_gateway.masking.masks.mask_body`: by what the body is, not by its
label) and encoded again with the same Content-Encoding; the response headers are masked too
(detectors, and every value the body masked wherever a header repeats it). A body that cannot be
decoded or parsed, an answer with more than one Content-Type, or a body the profile cannot read
(unless it says ``binary: pass``) is withheld: 502, never passed on unmasked.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from nhi_gateway.policy.batch import BATCH_KEY, mask_batch_response
from nhi_gateway.policy.decision import Decision, Stage
from nhi_gateway.masking.masks import (
    BodyKind,
    MaskingError,
    MaskProfile,
    body_kind,
    check_content_type,
    combine,
    mask_body,
    mask_headers,
    media_type,
)
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


def operation_path(decision: Decision | None) -> str | None:
    """The canonical path of the decided operation (``GET host /v1.0/users/x`` -> ``/v1.0/users/x``)."""
    parts = (decision.operation or "").split(" ", 2) if decision is not None else []
    return parts[2] if len(parts) == 3 else None


def mask_response(response: http.Response, profile: MaskProfile, path: str | None = None) -> int | None:
    """Mask a response in place, body and headers; the number of values masked, or ``None``
    when it was left exactly as it came (nothing a profile could change, or a body it passes).

    The body is read for what it is, not for its label (:func:`~nhi_gateway.masking.masks.mask_body`);
    an answer with more than one Content-Type is refused. Raises :class:`MaskingError` (or
    ``ValueError``/``TypeError`` from a Content-Encoding that does not decode) when the response
    must be withheld.
    """
    content_type = check_content_type(response.headers.get_all("Content-Type"))
    collect: dict[str, str] = {}
    count: int | None = None
    if response.raw_content:
        # strict: a body that cannot be decoded from its Content-Encoding is refused, not passed.
        body = response.get_content(strict=True)
        masked, n = mask_body(body, content_type, profile, collect=collect, path=path)
        # JSON is always the re-serialised document, even with nothing masked: a body with a
        # duplicated key ({"value":[...secret...],"value":[]}) must not reach a first-key-wins parser.
        if masked is not body:
            response.set_content(masked)  # re-encodes with the original Content-Encoding
            count = n
    fields = [(k.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for k, v in response.headers.fields]
    headers, n = mask_headers(fields, profile, collect)
    if n:
        response.headers.fields = tuple((k.encode("latin-1"), v.encode("utf-8", "surrogateescape"))
                                        for k, v in headers)
        count = (count or 0) + n
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
        content_type = ",".join(flow.response.headers.get_all("Content-Type"))
        try:
            count = mask_response(flow.response, profile, operation_path(decision))
        except (MaskingError, ValueError, TypeError) as e:
            logger.warning("flow %s: response withheld: %s", flow.id, e)
            what = media_type(content_type) or "untyped"
            refuse(flow, _refusal(f"a {what} body could not be masked ({e})", decision))
            return
        if count is not None:
            set_decision(flow, decision.but(extra={**decision.extra, "masked_fields": count}))

    @staticmethod
    def _mask_batch_headers(flow: http.HTTPFlow, entries: list[dict], profile_of, collect: dict[str, str]) -> int:
        """The outer answer's headers, by every profile of the batch together."""
        names = sorted({e["mask_profile"] for e in entries if e.get("mask_profile")})
        every = combine([profile_of(n) for n in names], "batch")
        fields = [(k.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for k, v in flow.response.headers.fields]
        headers, n = mask_headers(fields, every, collect)
        if n:
            flow.response.headers.fields = tuple((k.encode("latin-1"), v.encode("utf-8", "surrogateescape"))
                                                 for k, v in headers)
        return n

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
        content_types = flow.response.headers.get_all("Content-Type")
        collect: dict[str, str] = {}
        try:
            if not masks:
                if not flow.response.raw_content or len(content_types) != 1 \
                        or body_kind(content_types[0]) is not BodyKind.JSON:
                    return  # nothing to mask; JSON is still re-serialised below (repeated members)
            else:
                check_content_type(content_types)
                if not flow.response.raw_content:
                    self._mask_batch_headers(flow, entries, profile_of, collect)
                    return
            # Read as JSON whatever the label says: a batch answer is JSON or it is withheld.
            body = flow.response.get_content(strict=True)
            masked, entries, count = mask_batch_response(body, entries, profile_of, collect=collect)
            count += self._mask_batch_headers(flow, entries, profile_of, collect) if masks else 0
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
