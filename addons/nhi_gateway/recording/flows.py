"""Writing a flow to the recordings, annotated for whoever reviews it in mitmweb.

What is written is a redacted copy: credentials never reach disk, and the live flow (which goes
upstream) is untouched. The copy carries:

- ``comment``: decision, principal, operation, rule (or the failed check), approver, reason;
- ``marked``: ``:no_entry:`` on refused flows, ``:white_check_mark:`` on approved ones,
  ``:warning:`` on flows a rule in report mode would have refused or held (forwarded);
- ``metadata["nhi"]``: the structured decision, plus flat ``nhi.*`` keys for ``~meta`` searches
  (mitmproxy matches ``~meta`` against ``key: value`` lines), e.g. ``~meta "nhi.rule: no-credential"``.

Where the files go, how they rotate and how a crash is survived: :mod:`nhi_gateway.recording.files`.
The gateway's recorder addon and the recording process both write through ``FlowRecorder``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
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
from nhi_gateway.policy.decision import DECISION_KEY, Decision, decision_of, set_decision
from nhi_gateway.recording.files import (
    DEFAULT_FSYNC_INTERVAL,
    DEFAULT_MAX_BYTES,
    RecordEncoder,
    RecordingWriter,
    encode_with_parts,
    recording_base,
    write_ahead_base,
)
from nhi_gateway.recording.flowformat import escape_unencodable
from nhi_gateway.recording.redaction import redacted_state, scrub_text

logger = logging.getLogger(__name__)

REFUSED_MARK = ":no_entry:"
APPROVED_MARK = ":white_check_mark:"
REPORT_MARK = ":warning:"  # forwarded, but a rule in report mode would have refused or held it


APPROVAL_API_FILE = "approval-api.mitm"


def recording_path(root: Path, decision: Decision | None, when: datetime, hourly: bool = False,
                   worker: int | None = None) -> Path:
    """The first file of the series a flow with this decision is written to. Calls to the approval
    API go to the day's ``approval-api.mitm``: they are people deciding, not Graph traffic of the
    app their token was issued to."""
    if decision is not None and "approvals_api" in decision.extra or (
            decision is not None and " approvals-api " in decision.operation):
        name = APPROVAL_API_FILE if not worker else APPROVAL_API_FILE.replace(".mitm", f".w{worker}.mitm")
        return root / when.astimezone(UTC).strftime("%Y-%m-%d") / name
    return recording_base(root, decision.principal if decision else None, when, hourly, worker)


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
    report = decision.extra.get("report") if decision.allowed else None
    if isinstance(report, dict):
        would = f"WOULD {str(report.get('would', 'deny')).upper()}"
        parts = [would + (f" by rule {report['rule']}" if report.get("rule") else " (no rule allows it)"),
                 "forwarded (report mode)"]
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
    if decision.extra.get("report"):
        return REPORT_MARK
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
    report = decision.extra.get("report") if decision.allowed else None
    if isinstance(report, dict):
        keys["nhi.would"] = f"{report.get('would', 'deny')} {report.get('rule') or ''}".strip()
    return {k: v for k, v in keys.items() if v}


def annotate(disk: dict, decision: Decision | None, live: http.HTTPFlow) -> None:
    """Write the review annotations into the redacted state (never onto the live flow)."""
    disk["comment"] = scrub_text(flow_comment(decision, live))
    disk["marked"] = flow_mark(decision)
    disk["metadata"].update({k: scrub_text(v) for k, v in search_keys(decision).items()})


class FlowRecorder:
    """Writes flows, in this process, to the series of files under ``directory``."""

    def __init__(self, directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, hourly: bool = False,
                 fsync_interval: float = DEFAULT_FSYNC_INTERVAL, worker: int | None = None,
                 keep_requests: int = 0) -> None:
        self.directory = Path(directory)
        self.hourly = hourly
        self.worker = worker  # run --workers N: this process's number, in file names and each flow
        self.writer = RecordingWriter(max_bytes=max_bytes, fsync_interval=fsync_interval)
        self.encoder = RecordEncoder()
        self.last_path: Path | None = None
        # keep_requests > 0 (the recording process): the request half of the most recent flows
        # written ahead, redacted, by flow id, so that their whole records reuse it (see
        # ``kept_request``) instead of receiving and redacting the same request again.
        self.keep_requests = keep_requests
        self.kept: OrderedDict[str, tuple[http.Request, dict, str | None]] = OrderedDict()

    def kept_request(self, flow_id: str) -> tuple[http.Request, dict, str | None] | None:
        """The request written ahead for ``flow_id`` (the request, its redacted state, why its body
        was withheld), forgotten once asked for; None when it is not kept (never written ahead
        here, or one of more than ``keep_requests`` flows in flight)."""
        return self.kept.pop(flow_id, None)

    def write(self, flow, comment_prefix: str = "", connections: tuple[bytes, bytes] | None = None,
              request_part: tuple[dict, str | None] | None = None) -> Path:
        """Write one flow now, in this process. ``connections``: its connections' record parts,
        already encoded (the recording process gets them so), instead of ``flow``'s own.
        ``request_part``: its request half as redacted for the write-ahead log (``kept_request``)."""
        decision = decision_of(flow)
        disk = redacted_state(flow, request_part)
        record = self._annotated_record(disk, decision, flow, connections, scrub_text(comment_prefix))
        base = recording_path(self.directory, decision, datetime.now(UTC), self.hourly, self.worker)
        path = self.writer.append(base, record)
        self.last_path = path
        return path

    def _annotated_record(self, disk: dict, decision: Decision | None, flow, connections: tuple[bytes, bytes] | None,
                comment_prefix: str = "") -> bytes:
        """The redacted state ``disk``, annotated for review, as one record. One record, one
        write(): a kill never leaves half a flow behind an earlier whole one."""
        annotate(disk, decision, flow)
        if self.worker:
            disk["metadata"]["nhi.worker"] = str(self.worker)
        disk["comment"] = comment_prefix + disk["comment"]
        try:
            return self._encode(disk, flow, connections)
        except UnicodeEncodeError:
            # Text that is not UTF-8 (a host, a header name): recorded escaped, and said so.
            disk = escape_unencodable(disk)
            disk["metadata"]["nhi.escaped"] = "text that was not UTF-8 is written with \\x escapes"
            return self._encode(disk, flow, connections)

    def _encode(self, disk: dict, flow, connections: tuple[bytes, bytes] | None) -> bytes:
        if connections is None:
            return self.encoder.encode(disk, flow.client_conn, flow.server_conn)
        return encode_with_parts(disk, connections)

    def record_now(self, flow, connections: tuple[bytes, bytes] | None = None,
                   request_part: tuple[dict, str | None] | None = None) -> Path:
        """The flow and, for a ``$batch``, each of its inner requests; returns the flow's file."""
        path = self.write(flow, connections=connections, request_part=request_part)
        if isinstance(flow, http.HTTPFlow) and flow.metadata.get(BATCH_KEY):
            for inner, prefix in batch_inner_flows(flow):
                self.write(inner, comment_prefix=prefix, connections=connections)
        return path

    def record_in_part(self, flow, why: str, connections: tuple[bytes, bytes] | None = None) -> Path:
        """The flow without its bodies (and without its batch's inner records), its comment
        saying why: what reached Graph is recorded, in part when it cannot be in full."""
        return self.write(in_part(flow, why), connections=connections)

    def write_ahead(self, flow, connections: tuple[bytes, bytes] | None = None) -> Path:
        """The request half and decision of a flow about to be forwarded, to the day's write-ahead
        log: once this returns, what the gateway lets through is on record even if it dies before
        Graph answers. The whole flow is recorded as usual once answered."""
        decision = decision_of(flow)
        disk = redacted_state(flow)
        if self.keep_requests:
            self.kept[flow.id] = (flow.request, disk["request"],
                                  disk["metadata"].get("nhi_gateway.withheld", {}).get("request"))
            self.kept.move_to_end(flow.id)
            while len(self.kept) > self.keep_requests:
                self.kept.popitem(last=False)
        record = self._annotated_record(disk, decision, flow, connections, "FORWARDING · ")
        return self.writer.append(write_ahead_base(self.directory, datetime.now(UTC), self.worker), record)

    def close(self) -> None:
        try:
            self.writer.close()
        except OSError as e:
            logger.error("closing the recordings in %s: %s", self.directory, e)


def in_part(flow, why: str):
    """A copy of ``flow`` for a record in part: bodies left out, the reason in its decision (and so
    in the comment mitmweb shows)."""
    part = flow.copy()
    part.id = flow.id
    if isinstance(part, http.HTTPFlow):
        part.request.raw_content = b""  # raw: an encoded empty body (gzip) is not empty
        if part.response is not None:
            part.response.raw_content = b""
    part.metadata.pop(BATCH_KEY, None)
    decision = decision_of(flow)
    note = f"recorded in part ({why}): the bodies are left out"
    if decision is not None:
        set_decision(part, decision.but(reason=f"{decision.reason} · {note}" if decision.reason else note))
    return part


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
    try:
        requests = inner_requests_of(request_data)
    except Exception as exc:  # noqa: BLE001 - the inner records are still written, without bodies
        logger.error("flow %s: the inner requests of the batch could not be read back: %r", outer.id, exc)
        requests = {}
    responses = {}
    if outer.response is not None and outer.response.raw_content:
        try:
            responses = inner_responses_of(outer.response.get_content(strict=True))
        except Exception:  # noqa: BLE001 - as above: recorded without their answers' bodies
            responses = {}
    outer_decision = decision_of(outer)
    flows = []
    for e in outer.metadata.get(BATCH_KEY) or ():
        try:
            flows.append(_inner_flow(outer, e, requests, responses, outer_decision))
        except Exception as exc:  # noqa: BLE001 - one inner record must not cost the others
            logger.error("flow %s: the record of inner request %r could not be built in full: %r",
                         outer.id, e.get("id"), exc)
            inner, prefix = _inner_flow(outer, e, {}, {}, outer_decision)
            flows.append((in_part(inner, f"it could not be rebuilt: {type(exc).__name__}"), prefix))
    return flows


def _inner_flow(outer: http.HTTPFlow, e, requests, responses, outer_decision) -> tuple[http.HTTPFlow, str]:
    r = outer.request
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
    return inner, f"batch {outer.id}/{label}: {note}"
