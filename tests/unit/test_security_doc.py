"""SECURITY.md names, for each promise, the tests that prove it: every one of them must exist, so
a renamed or deleted test cannot leave a promise silently unproven."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test_")}


def test_every_test_security_md_names_exists():
    text = (REPO / "SECURITY.md").read_text()
    references = REFERENCE.findall(text)
    assert len(references) > 50, "SECURITY.md should name the tests behind its promises"
    missing = []
    cache: dict[str, set[str]] = {}
    for file, name in references:
        path = REPO / file
        if not path.exists():
            missing.append(f"{file} (no such file)")
            continue
        if name not in cache.setdefault(file, _tests_in(path)):
            missing.append(f"{file}::{name}")
    assert not missing, "SECURITY.md names tests that do not exist: " + ", ".join(missing)


def test_every_promise_names_at_least_one_test():
    text = (REPO / "SECURITY.md").read_text()
    promises = re.split(r"\n\*\*(?=[FRX]\d+\. )", text)[1:]
    assert len(promises) >= 15
    for promise in promises:
        body = re.split(r"\n##", promise, maxsplit=1)[0]  # up to the next section
        assert REFERENCE.search(body), f"promise without a test: {promise[:80]!r}"
