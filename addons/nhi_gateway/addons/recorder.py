"""Recording: every flow, allowed or refused, appended in mitmproxy's own format.

Layout: ``<dir>/<YYYY-MM-DD>/<tenant>/<app>--<object-id>.mitm`` (``anonymous.mitm`` for callers
without a token), so "app X, today" is one file that ``mitmweb -r`` opens. What is written is a
redacted copy: credentials never reach disk, and the live flow (which goes upstream) is untouched.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from mitmproxy import http, io

from ..decision import Decision, Stage
from ..redaction import redact_flow_for_disk
from .failclosed import REFUSED_KEY, decision_of, fail_closed, refuse
from .guard import Health

logger = logging.getLogger(__name__)

RECORDED_KEY = "nhi.recorded"
MAX_OPEN_FILES = 64
REFUSED_MARK = ":no_entry:"

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe(name: str, fallback: str) -> str:
    cleaned = _UNSAFE.sub("-", name).strip("-.")[:64]
    return cleaned or fallback


def recording_path(root: Path, decision: Decision | None, when: datetime) -> Path:
    day = when.strftime("%Y-%m-%d")
    principal = (decision.principal if decision else None) or {}
    if not principal.get("object_id"):
        return root / day / "anonymous.mitm"
    tenant = _safe(principal.get("tenant_id", ""), "unknown-tenant")
    app = _safe(principal.get("display_name") or principal.get("app_id", ""), "app")
    return root / day / tenant / f"{app}--{_safe(principal['object_id'], 'unknown')}.mitm"


class Recorder:
    def __init__(self, directory: Path, health: Health, on_refusal=None) -> None:
        self.directory = Path(directory)
        self.health = health
        self.on_refusal = on_refusal  # called when the recorder refuses a flow another stage passed
        self._files: OrderedDict[Path, BinaryIO] = OrderedDict()
        self.last_path: Path | None = None

    def _file(self, path: Path) -> BinaryIO:
        f = self._files.get(path)
        if f is not None:
            self._files.move_to_end(path)
            return f
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "ab")  # appending keeps earlier flows valid: one tnetstring record per flow
        self._files[path] = f
        if len(self._files) > MAX_OPEN_FILES:
            self._files.popitem(last=False)[1].close()
        return f

    def write(self, flow) -> Path:
        decision = decision_of(flow)
        copy = redact_flow_for_disk(flow)
        if decision is not None:
            copy.comment = decision.comment()
            if not decision.allowed:
                copy.marked = REFUSED_MARK
        path = recording_path(self.directory, decision, datetime.now(UTC))
        f = self._file(path)
        io.FlowWriter(f).add(copy)
        f.flush()  # the OS has it: a crash of the gateway loses at most the flow in progress
        self.last_path = path
        return path

    def _record(self, flow, live: bool) -> None:
        if flow.metadata.get(RECORDED_KEY):
            return
        try:
            self.write(flow)
        except OSError as e:
            self.health.fail("recording", f"cannot write {self.directory}: {e.strerror or e}")
            if live and isinstance(flow, http.HTTPFlow):
                refuse(flow, Decision.deny(
                    Stage.GUARD, 503, "ServiceUnavailable",
                    "the gateway could not record this request, so it refused it", check="recording"))
                if self.on_refusal is not None:
                    self.on_refusal(flow)
            return
        flow.metadata[RECORDED_KEY] = True
        self.health.recover("recording")

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow, live=not flow.metadata.get(REFUSED_KEY))

    @fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow, live=False)

    @fail_closed
    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._record(flow, live=False)

    def done(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
