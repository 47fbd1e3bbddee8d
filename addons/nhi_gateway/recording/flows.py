"""Writing a flow to the recordings, annotated for whoever reviews it in mitmweb.

What is written is a redacted copy: credentials never reach disk, and the live flow (which goes
upstream) is untouched. The copy carries:

- ``comment``: decision, principal, operation, rule (or the failed check), approver, reason;
- ``marked``: ``:no_entry:`` on refused flows, ``:white_check_mark:`` on approved ones;
- ``metadata["nhi"]``: the structured decision, plus flat ``nhi.*`` keys for ``~meta`` searches
  (mitmproxy matches ``~meta`` against ``key: value`` lines), e.g. ``~meta "nhi.rule: no-credential"``.

Where the files go, how they rotate and how a crash is survived: :mod:`nhi_gateway.recording.files`.
The gateway's recorder addon and the recording process both write through ``FlowRecorder``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from mitmproxy import http

from nhi_gateway.policy.batch import (
    BATCH_KEY,
    INNER_KEY,
    BatchError,
    decode_body,
    inner_decision,
    inner_flow_id,
    inner_requests_of,
    inner_responses_of,
)
from nhi_gateway.policy.decision import DECISION_KEY, Decision, decision_of
from nhi_gateway.recording.files import (
    DEFAULT_FSYNC_INTERVAL,
    DEFAULT_MAX_BYTES,
    RecordEncoder,
    RecordingWriter,
    encode_with_parts,
    recording_base,
    write_ahead_base,
)
from nhi_gateway.recording.redaction import redacted_state, scrub_text

logger = logging.getLogger(__name__)

REFUSED_MARK = ":no_entry:"
APPROVED_MARK = ":white_check_mark:"


APPROVAL_API_FILE = "approval-api.mitm"


def recording_path(root: Path, decision: Decision | None, when: datetime, hourly: bool = False) -> Path:
    """The first file of the series a flow with this decision is written to. Calls to the approval
    API go to the day's ``approval-api.mitm``: they are people deciding, not Graph traffic of the
    app their token was issued to."""
    if decision is not None and "approvals_api" in decision.extra or (
            decision is not None and " approvals-api " in decision.operation):
        return root / when.astimezone(UTC).strftime("%Y-%m-%d") / APPROVAL_API_FILE
    return recording_base(root, decision.principal if decision else None, when, hourly)


def approver_of(decision: Decision) -> str | None:
    approver = decision.extra.get("approver")
    approval = decision.extra.get("approval")
    if not approver and isinstance(approval, dict):
        approver = approval.get("approver") or approval.get("approved_by")
    return str(approver) if approver else None


def _who(decision: Decision | None) -> str:
    p = (decision.principal if decision else None) or {}
    if not p:
        return "anonymous"
    name = p.get("display_name") or p.get("app_id") or "unnamed app"
    return f"{name} ({p.get('object_id')})"


def flow_comment(decision: Decision | None, flow: http.HTTPFlow | None = None) -> str:
    """One line for mitmweb's Comment column, most telling first: mitmweb shows its first
    characters in the flow list and the whole line in the flow's Comment tab."""
    if decision is None:
        return "DENY · no decision was recorded for this flow"
    parts = [str(decision.action).upper()]
    if decision.rule_id:
        parts.append(f"rule {decision.rule_id}")
    elif not decision.allowed:
        parts.append(f"{decision.stage}" + (f" check {decision.check}" if decision.check else ""))
    parts.append(f"by {_who(decision)}")
    if decision.operation:
        parts.append(decision.operation)
    if approver := approver_of(decision):
        parts.append(f"approver {approver}")
    if decision.reason:
        parts.append(decision.reason)
    if flow is not None and flow.error is not None:
        parts.append(f"error: {flow.error.msg}")
    return " · ".join(parts)


def flow_mark(decision: Decision | None) -> str:
    if decision is None or not decision.allowed:
        return REFUSED_MARK
    if decision.extra.get("approval"):
        return APPROVED_MARK
    return ""


def search_keys(decision: Decision | None) -> dict[str, str]:
    """Flat ``nhi.*`` metadata: one ``key: value`` line each for ``~meta`` (the nested decision
    is matched too, but as a Python dict repr)."""
    if decision is None:
        return {"nhi.decision": "deny"}
    p = decision.principal or {}
    keys = {
        "nhi.decision": str(decision.action),
        "nhi.rule": decision.rule_id or "",
        "nhi.stage": str(decision.stage),
        "nhi.check": decision.check,
        "nhi.operation": decision.operation,
        "nhi.principal": str(p.get("display_name") or p.get("app_id") or ("anonymous" if not p else "")),
        "nhi.object_id": str(p.get("object_id") or ""),
        "nhi.app_id": str(p.get("app_id") or ""),
        "nhi.approver": approver_of(decision) or "",
    }
    return {k: v for k, v in keys.items() if v}


def annotate(disk: dict, decision: Decision | None, live: http.HTTPFlow) -> None:
    """Write the review annotations into the redacted state (never onto the live flow)."""
    disk["comment"] = scrub_text(flow_comment(decision, live))
    disk["marked"] = flow_mark(decision)
    disk["metadata"].update({k: scrub_text(v) for k, v in search_keys(decision).items()})


class FlowRecorder:
    """Writes flows, in this process, to the series of files under ``directory``."""

    def __init__(self, directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, hourly: bool = False,
                 fsync_interval: float = DEFAULT_FSYNC_INTERVAL) -> None:
        self.directory = Path(directory)
        self.hourly = hourly
        self.writer = RecordingWriter(max_bytes=max_bytes, fsync_interval=fsync_interval)
        self.encoder = RecordEncoder()
        self.last_path: Path | None = None

    def write(self, flow, comment_prefix: str = "", connections: tuple[bytes, bytes] | None = None) -> Path:
        """Write one flow now, in this process. ``connections``: its connections' record parts,
        already encoded (the recording process gets them so), instead of ``flow``'s own."""
        decision = decision_of(flow)
        disk = redacted_state(flow)
        annotate(disk, decision, flow)
        if comment_prefix:
            disk["comment"] = scrub_text(comment_prefix) + disk["comment"]
        # One record, one write(): a kill never leaves half a flow behind an earlier whole one.
        if connections is None:
            record = self.encoder.encode(disk, flow.client_conn, flow.server_conn)
        else:
            record = encode_with_parts(disk, connections)
        base = recording_path(self.directory, decision, datetime.now(UTC), self.hourly)
        path = self.writer.append(base, record)
        self.last_path = path
        return path

    def record_now(self, flow, connections: tuple[bytes, bytes] | None = None) -> Path:
        """The flow and, for a ``$batch``, each of its inner requests; returns the flow's file."""
        path = self.write(flow, connections=connections)
        if isinstance(flow, http.HTTPFlow) and flow.metadata.get(BATCH_KEY):
            for inner, prefix in batch_inner_flows(flow):
                self.write(inner, comment_prefix=prefix, connections=connections)
        return path

    def write_ahead(self, flow, connections: tuple[bytes, bytes] | None = None) -> Path:
        """The request half and decision of a flow about to be forwarded, to the day's write-ahead
        log: once this returns, what the gateway lets through is on record even if it dies before
        Graph answers. The whole flow is recorded as usual once answered."""
        decision = decision_of(flow)
        disk = redacted_state(flow)
        annotate(disk, decision, flow)
        disk["comment"] = "FORWARDING · " + disk["comment"]
        if connections is None:
            record = self.encoder.encode(disk, flow.client_conn, flow.server_conn)
        else:
            record = encode_with_parts(disk, connections)
        return self.writer.append(write_ahead_base(self.directory, datetime.now(UTC)), record)

    def close(self) -> None:
        try:
            self.writer.close()
        except OSError as e:
            logger.error("closing the recordings in %s: %s", self.directory, e)


# --- $batch: each inner request recorded as if it had been sent alone -----------------------------

# Request targets are written as sent, percent-encoding included; only what a URL cannot hold is encoded.
_TARGET_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


def batch_inner_flows(outer: http.HTTPFlow) -> list[tuple[http.HTTPFlow, str]]:
    """The inner requests of a ``$batch`` (``flow.metadata[BATCH_KEY]``, see :mod:`nhi_gateway.policy.batch`)
    as synthetic flows, each with the comment prefix ``batch <outer-id>/<inner-id>: ``.

    Each carries its own decision in ``metadata["nhi"]`` and ``metadata["nhi.batch"]`` =
    ``{flow_id, id, index, sent}``; the same client and server connections as the outer flow;
    the inner headers and body from the batch; and the inner response the client got (already
    masked), when Graph answered it. Its id is the ``flow_id`` of the inner request's audit line.
    """
    r = outer.request
    try:
        request_data = decode_body(r.raw_content or b"", ",".join(r.headers.get_all("content-encoding")))
    except BatchError:
        request_data = None
    requests = inner_requests_of(request_data)
    responses = {}
    if outer.response is not None and outer.response.raw_content:
        try:
            responses = inner_responses_of(outer.response.get_content(strict=True))
        except ValueError:
            responses = {}
    outer_decision = decision_of(outer)
    flows = []
    for e in outer.metadata.get(BATCH_KEY) or ():
        key = str(e.get("id") or "").casefold()
        sent = bool(e.get("sent"))
        part = requests.get(key) if key else None
        target = quote(str(e.get("target") or "/"), safe=_TARGET_SAFE)
        request = http.Request.make(
            str(e.get("method") or "GET"), f"https://{r.host}:{r.port}{target}",
            part.content if part else b"", [(k.encode(), v.encode()) for k, v in (part.headers if part else ())],
        )
        request.http_version = r.http_version
        request.timestamp_start, request.timestamp_end = r.timestamp_start, r.timestamp_end
        inner = http.HTTPFlow(outer.client_conn, outer.server_conn)
        inner.id = inner_flow_id(outer.id, e)
        inner.timestamp_created = outer.timestamp_created
        inner.request = request
        answer = responses.get(key) if key and sent else None
        if answer is not None:
            inner.response = http.Response.make(answer.status, answer.content,
                                                [(k.encode(), v.encode()) for k, v in answer.headers])
            inner.response.http_version = outer.response.http_version
            inner.response.timestamp_start = outer.response.timestamp_start
            inner.response.timestamp_end = outer.response.timestamp_end
        inner.metadata[DECISION_KEY] = inner_decision(outer_decision, e).to_dict()
        inner.metadata[INNER_KEY] = {"flow_id": outer.id, "id": e.get("id"), "index": e.get("index"), "sent": sent}
        label = e.get("id") or f"#{int(e.get('index') or 0) + 1}"
        if sent:
            note = ""
        elif outer_decision is not None and outer_decision.allowed:
            note = "(no answer from Graph) "
        else:
            note = "(not sent: the batch was refused) "
        flows.append((inner, f"batch {outer.id}/{label}: {note}"))
    return flows
