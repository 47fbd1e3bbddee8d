"""The gateway's log lines, for people and for log shippers.

Every line carries an ISO 8601 time with its zone (UTC), the level and the logger; ``json`` writes
one object per line, with the flow's id, principal, operation and decision as fields when the
line is about a flow. Every line is scrubbed as it is formatted, whoever logged it (the gateway,
mitmproxy, a library): anything shaped like a JWT, an Entra client secret or an HTTP credential
(``Bearer ...``, ``Basic ...``) is replaced, so no token or secret reaches a log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from nhi_gateway.recording.redaction import REDACTED, scrub_text

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
FLOW_KEY = "nhi"  # LogRecord attribute (``extra={"nhi": {...}}``): the flow's fields
_CREDENTIAL = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9+/=._~-]{6,}")


def scrub(text: str) -> str:
    return _CREDENTIAL.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", scrub_text(text))


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_time(record)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _time(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        fields = getattr(record, FLOW_KEY, None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return scrub(json.dumps(entry, ensure_ascii=False, default=str))


class GatewayLogHandler(logging.StreamHandler):
    """Replaces mitmproxy's terminal log (``with_termlog=False``): same records, our format."""


def configure(log_format: str = "text", level: str = "info", stream=None) -> logging.Handler:
    if log_format not in FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}")
    if level not in LEVELS:
        raise ValueError(f"--log-level must be one of {', '.join(LEVELS)}")
    handler = GatewayLogHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.setLevel(level.upper())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, GatewayLogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("nhi_gateway").setLevel(level.upper())
    # httpx logs every request's full URL at INFO: a webhook URL's path is its secret, and the
    # gateway logs its own outbound calls (by host) itself.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    return handler
