"""What a test needs and the machine lacks: said, never skipped silently in CI."""

from __future__ import annotations

import os

import pytest


def missing(message: str, *, required: bool = False) -> None:
    """A part the test needs is not there (a server, a privilege, a compiler): the test fails in
    CI, or when ``required`` (the machine should have had it), and is skipped saying why elsewhere."""
    if required or os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
