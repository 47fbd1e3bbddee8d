"""Where approvals and grants live: ``--state sqlite:///PATH`` (embedded, the default) or
``--state postgresql://...`` (shared by every replica of the gateway).

Plain Python: no mitmproxy import.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
SQLITE_SCHEME = "sqlite:///"


class StateBackend(NamedTuple):
    kind: str  # "sqlite" or "postgresql"
    location: str  # the SQLite file, or the PostgreSQL URL as given (it may carry a password)

    @property
    def shared(self) -> bool:
        return self.kind == "postgresql"


def parse_state(text: str) -> StateBackend:
    """``sqlite:///approvals.sqlite3`` (relative), ``sqlite:////var/lib/nhi/approvals.sqlite3``
    (absolute, as SQLAlchemy spells it) or a libpq URL. Raises ValueError saying what to write."""
    value = str(text).strip()
    if value.startswith(SQLITE_SCHEME) and len(value) > len(SQLITE_SCHEME):
        return StateBackend("sqlite", value[len(SQLITE_SCHEME):])
    if value.startswith(POSTGRES_SCHEMES):
        return StateBackend("postgresql", value)
    raise ValueError(
        f"{_shown(value)!r} is not a state backend: write sqlite:///PATH (sqlite:////abs/path for an "
        "absolute path) or postgresql://USER@HOST:PORT/DATABASE")


def _shown(value: str) -> str:
    """A value for an error message, with anything that looks like a password cut off."""
    head, at, tail = value.partition("@")
    return f"{head.split('://', 1)[0]}://…@{tail[:200]}" if at and "://" in head else value[:200]


def sqlite_path(backend: StateBackend | None, default: Path) -> Path:
    return Path(backend.location) if backend is not None and backend.kind == "sqlite" else default


__all__ = ["StateBackend", "parse_state", "sqlite_path"]
