"""nhi_gateway.policy.document: the fast YAML reader reads a policy exactly as ruamel.yaml does.

ruamel.yaml's round-trip reader is the reference (its values, its positions, its errors); libyaml
reads the common case ten times faster. Whatever the fast reader accepts must come out the same,
positions included, and whatever it cannot read exactly it must hand back (``Unusual``), so the
loader reads it with ruamel.yaml as before.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from nhi_gateway.policy.document import Unusual, read_fast

POLICIES = Path(__file__).resolve().parents[2] / "policies"
EXAMPLE = (POLICIES / "example.yaml").read_text()


def reference(text: str):
    return YAML(typ="rt").load(text)


def placed(node):
    """Values and every recorded position, as comparable plain data. An empty value (``key:`` or
    ``-`` with nothing after it) is where libyaml says, right after its key or dash, not where
    ruamel.yaml puts it (at the next token, possibly lines further down): a null has no position
    of its own to compare."""
    if isinstance(node, dict):
        lc = node.lc
        return ("map", (lc.line, lc.col), [
            (k, tuple(lc.key(k)), None if v is None else tuple(lc.value(k)), placed(v)) for k, v in node.items()])
    if isinstance(node, list):
        lc = node.lc
        return ("seq", (lc.line, lc.col), [
            (None if v is None else tuple(lc.item(i)), placed(v)) for i, v in enumerate(node)])
    if isinstance(node, date):
        return ("time", node.isoformat())
    return (type(node).__name__ if isinstance(node, bool) else type(node).__mro__[-2].__name__, node)


def assert_same_as_reference(text: str) -> None:
    try:
        fast = read_fast(text)
    except Unusual:
        return  # the loader reads it with ruamel.yaml
    assert placed(fast) == placed(reference(text))


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_policy_is_read_fast_and_the_same(path):
    text = path.read_text()
    assert placed(read_fast(text)) == placed(reference(text))


@pytest.mark.parametrize(
    "text",
    [
        "a: yes\nb: no\nc: on\nd: y\n",  # YAML 1.2: strings, not booleans
        "a: true\nb: False\nc: ~\nd: null\ne:\nf: 12\ng: -3\nh: '1'\n",
        "a: 2025-07-01T00:00:00Z\nb: 2025-07-01\nc: 2025-07-01 08:00:00+02:00\n",
        "a: [https://graph.microsoft.com, x]\nb: {c: [1, {d: e}]}\n",
        "a: &x {b: 1}\nc: *x\n",
        "é: 'ü'\nemoji: \"\U0001f600 x\"\nk: [\U0001f600, y]\n",
        "- a\n- - b\n  - c\n-\n  d: e\n",
    ],
)
def test_plain_documents_are_read_the_same(text):
    assert_same_as_reference(text)
    read_fast(text)  # and they are read fast, not handed back


@pytest.mark.parametrize(
    "text",
    [
        "a: 1\na: 2\n",  # a duplicate key: ruamel.yaml refuses it, libyaml would keep the last
        "a: 1.5\n",
        "a: 0o17\n",
        "a: 1_000\n",
        "a: !!binary aGk=\n",
        "a: !custom x\n",
        "<<: {a: 1}\nb: 2\n",
        "? [a, b]\n: c\n",
        "1: a\n",
        "a: !!int x\n",
        "a: [b\n",
        "a: h\tttps://x\n",  # libyaml reads a tab inside a plain scalar, ruamel.yaml refuses it
        "a: \ud800\n",
        "a: " + "[" * 2000 + "]" * 2000 + "\n",
    ],
)
def test_what_only_ruamel_reads_exactly_is_handed_back(text):
    with pytest.raises(Unusual):
        read_fast(text)


_PIECES = ["", ":", "- ", "{", "}", "[", "]", ",", "'", '"', "\t", "\n", "  ", "*a", "&a ", "!!str ", "<<: ",
           "~", "1", "0x1", "1.5", "yes", "true", "null", "#", "? ", "@", "%", "é", "2025-01-01"]


@st.composite
def mutated(draw):
    out = EXAMPLE
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(out)))
        j = min(len(out), i + draw(st.integers(0, 8)))
        out = out[:i] + draw(st.sampled_from(_PIECES)) + out[j:]
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_policies_are_read_the_same_or_handed_back(text):
    try:
        expected = placed(reference(text))
    except Exception:  # noqa: BLE001 - ruamel.yaml refuses it: the fast reader must not accept it
        with pytest.raises(Unusual):
            read_fast(text)
        return
    try:
        fast = read_fast(text)
    except Unusual:
        return
    assert placed(fast) == expected
