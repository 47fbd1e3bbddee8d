"""Hostile input, the masker: it never emits a listed field unmasked, and what it emits is JSON.

Against the public API the masking addon calls, ``mask_json_bytes(body, names)`` with a profile
given as member names. Documents are drawn at random (any nesting of objects and arrays, the
listed names spelt in any letter case among other keys, values of every JSON type), written as
JSON in several ways (ASCII-escaped or not, spaced or compact, key names partly written as
``\\uXXXX`` escapes, members repeated with different values), then masked. Properties:

- the output parses as strict JSON (no NaN/Infinity), UTF-8;
- every member whose name is listed (case-insensitively) holds its value's shape with every string
  ``"[masked]"`` and every other scalar ``null`` (masking keeps JSON types), and no
  value that was under a listed name appears anywhere in the output bytes, however the input
  hid it (duplicate keys, escaped names, nesting under other listed names);
- everything else is kept: the output is the input document with each listed member replaced;
- the count is the number of members masked;
- input that is not JSON (random bytes, truncated documents, nesting far past the limit) raises
  :class:`MaskingError`, never another exception and never a partial output.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nhi_gateway.masking.masks import MASK, MAX_DEPTH, MaskingError, mask_json_bytes

from ..support.masking import leaves, redacted

FIELDS = frozenset({"mail", "secretText", "key", "userPrincipalName", "issuerAssignedId", "@odata.nextLink"})
FOLDED = frozenset(f.casefold() for f in FIELDS)
SECRET = "QZJLEAK"  # every value under a listed name carries it; no other value or key can (no "Q")

listed_names = st.sampled_from(sorted(FIELDS)).flatmap(
    lambda name: st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(c.swapcase() if f else c for c, f in zip(name, flips, strict=True))))
other_names = st.one_of(
    st.sampled_from(["id", "displayName", "value", "responses", "body", "keyCredentials", "owners", "mails",
                     "keyId", "mail ", "e-mail", "@odata.context", "", "\u212aey"]),
    st.text(alphabet="abcdefABCDEF@._$ é\u0130\u212a", max_size=8),
).filter(lambda n: n.casefold() not in FOLDED and SECRET not in n)


def plain_values():
    return st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63),
                     st.floats(allow_nan=False, allow_infinity=False),
                     st.text(alphabet=st.characters(codec="utf-8", exclude_characters="Q"), max_size=10))


def secret_values():
    return st.recursive(
        st.one_of(st.just(SECRET), st.integers().map(lambda i: f"{SECRET}-{i}"), st.just(f"\u00e9{SECRET}\U0001f600")),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(other_names, inner, max_size=3)),
        max_leaves=5,
    )


def documents():
    """Any JSON document; members under listed names hold secrets (of any type and shape)."""
    def objects(inner):
        member = st.one_of(st.tuples(other_names, inner), st.tuples(listed_names, secret_values()))
        return st.lists(member, max_size=5).map(dict)

    return st.recursive(plain_values(), lambda inner: st.one_of(st.lists(inner, max_size=4), objects(inner)),
                        max_leaves=30)


def expected(doc):
    """The model: the document with every listed member's value redacted, keeping its type."""
    if isinstance(doc, dict):
        return {k: (redacted(v) if k.casefold() in FOLDED else expected(v)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [expected(v) for v in doc]
    return doc


def listed_members(doc):
    """(name, value) of every listed member in a parsed output, at any depth."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if k.casefold() in FOLDED:
                    yield k, v
                else:
                    stack.append(v)
        elif isinstance(node, list):
            stack.extend(node)


def strict_json(data: bytes):
    def refuse(name):
        raise AssertionError(f"output holds {name}, which is not JSON")

    return json.loads(data.decode("utf-8"), parse_constant=refuse)


def assert_masked(out: bytes, count: int):
    doc = strict_json(out)
    members = list(listed_members(doc))
    assert all(leaf in (MASK, None) for _, v in members for leaf in leaves(v)), members
    assert count == len(members)
    assert SECRET.encode() not in out
    return doc


# --- writing JSON the ways a hostile upstream might ----------------------------------------------


def escape_name(name: str, picks: list[bool]) -> str:
    """A JSON string literal for ``name`` with some characters written as \\uXXXX escapes."""
    out = []
    for c, pick in zip(name, picks, strict=True):
        if pick or c in '"\\' or ord(c) < 0x20:
            out.extend(f"\\u{u:04x}" for u in _utf16(c))
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _utf16(c: str) -> list[int]:
    data = c.encode("utf-16-be")
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]


@st.composite
def hostile_json(draw, doc):
    """``doc`` as JSON text, members possibly repeated: a listed member is first written with an
    earlier secret value (a first-key-wins parser downstream would see that one)."""
    if not isinstance(doc, (dict, list)):
        return json.dumps(doc, ensure_ascii=draw(st.booleans()))
    if isinstance(doc, list):
        return "[" + ",".join(draw(hostile_json(v)) for v in doc) + "]"
    members = []
    for k, v in doc.items():
        name = escape_name(k, draw(st.lists(st.booleans(), min_size=len(k), max_size=len(k))))
        if k.casefold() in FOLDED and draw(st.booleans()):
            decoy = draw(secret_values())
            members.append(f"{name}:{json.dumps(decoy)}")  # an earlier copy, overridden below
        members.append(f"{name}{draw(st.sampled_from([':', ' : ', ':  ']))}{draw(hostile_json(v))}")
    return "{" + ",".join(members) + "}"


# --- the properties ------------------------------------------------------------------------------


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.booleans(), st.booleans())
def test_listed_fields_never_leave_and_the_rest_is_kept(doc, ascii_only, spaced):
    data = json.dumps(doc, ensure_ascii=ascii_only, separators=(", ", ": ") if spaced else (",", ":")).encode()
    out, count = mask_json_bytes(data, FIELDS)
    assert assert_masked(out, count) == expected(doc)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_duplicate_and_escaped_names_cannot_smuggle_a_value_out(data):
    doc = data.draw(documents(), label="document")
    text = data.draw(hostile_json(doc), label="json")
    out, count = mask_json_bytes(text.encode("utf-8", "surrogatepass"), FIELDS)
    assert assert_masked(out, count) == expected(doc)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_random_bytes_are_masked_json_or_refused(data):
    try:
        out, count = mask_json_bytes(data, FIELDS)
    except MaskingError:
        return
    assert_masked(out, count)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(documents().filter(lambda d: isinstance(d, (dict, list))), st.data())
def test_truncated_or_corrupted_documents_are_refused_or_masked(doc, data):
    text = json.dumps(doc)
    cut = data.draw(st.integers(0, len(text)), label="cut")
    junk = data.draw(st.sampled_from(["", "}", "]", ",", '"', "\\", "\x00", "NaN", "Infinity", "-Infinity",
                                      "\ud800", "//", "'"]), label="junk")
    broken = (text[:cut] + junk).encode("utf-8", "surrogatepass")
    try:
        out, count = mask_json_bytes(broken, FIELDS)
    except MaskingError:
        return
    assert_masked(out, count)


@settings(max_examples=60)
@given(st.integers(1, 3 * MAX_DEPTH), st.sampled_from(["list", "object", "mixed"]), st.booleans())
@example(MAX_DEPTH, "mixed", True)
@example(MAX_DEPTH + 1, "mixed", True)
@example(MAX_DEPTH + 1, "list", False)
def test_any_nesting_is_masked_within_the_limit_and_refused_past_it(depth, shape, secret_inside):
    rng = random.Random(depth)
    doc: object = {"mail": SECRET} if secret_inside else 1
    for _ in range(depth - (1 if secret_inside else 0)):
        kind = shape if shape != "mixed" else rng.choice(["list", "object"])
        doc = [doc] if kind == "list" else {"a": doc}
    # json.dumps would recurse too deep to write the deepest documents: build the text instead.
    data = _dump_iteratively(doc).encode()
    try:
        out, count = mask_json_bytes(data, FIELDS)
    except MaskingError:
        assert depth > MAX_DEPTH, "a document within the limit was refused"
        return
    assert depth <= MAX_DEPTH, "a document past the limit was masked"
    assert SECRET.encode() not in out and count == (1 if secret_inside else 0)


def _dump_iteratively(doc) -> str:
    parts, closing = [], []
    while isinstance(doc, (dict, list)):
        if isinstance(doc, list):
            parts.append("[")
            closing.append("]")
            doc = doc[0]
        elif "a" in doc:
            parts.append('{"a":')
            closing.append("}")
            doc = doc["a"]
        else:
            parts.append(json.dumps(doc))
            doc = None
            break
    else:
        parts.append(json.dumps(doc))
    return "".join(parts) + "".join(reversed(closing))


@pytest.mark.parametrize("body", [b'{"a":1e400}', b"[-1e999]"])
def test_a_number_out_of_float_range_is_a_masking_error(body):
    with pytest.raises(MaskingError):
        mask_json_bytes(body, FIELDS)
