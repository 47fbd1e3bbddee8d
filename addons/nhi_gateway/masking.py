"""Masking sensitive fields in Graph JSON responses.

A mask profile names fields (``secretText``, ``mail``, ``issuerAssignedId`` ...); every value held
under one of those names is replaced by :data:`MASK`, wherever it sits: top level, ``value[]``
collections, ``$expand``ed objects, arrays of objects, ``$batch`` ``responses[].body``. Names match
case-insensitively because Graph's own routing and property names are case-insensitive in practice.

The gateway fails closed: a body that cannot be parsed, or is nested deeper than
:data:`MAX_DEPTH`, raises :class:`MaskingError` and the caller refuses the response instead of
passing it on unmasked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache

MASK = "[masked]"
MAX_DEPTH = 200  # Graph documents are a handful of levels deep; anything near this is hostile


class MaskingError(ValueError):
    """The document cannot be masked: the response must be refused, never passed on as it is."""


@lru_cache(maxsize=64)
def _folded(fields: frozenset[str]) -> frozenset[str]:
    for name in fields:
        if "[" in name or "]" in name:
            # A path spelling would silently match nothing, leaving the value unmasked.
            leaf = name.rsplit("]", 1)[-1].lstrip(".") or name
            raise ValueError(
                f"mask field {name!r}: fields are matched by name wherever they occur; "
                f"write {leaf!r} instead of a path"
            )
    return frozenset(name.casefold() for name in fields)


def mask_fields(names: Iterable[str]) -> frozenset[str]:
    """Check mask field names (as a profile lists them) once, at load time.

    Raises ``ValueError`` naming the bad entry, so a policy typo stops the start, not a request.
    """
    fields = frozenset(names)
    _folded(fields)
    return fields


def mask_document(
    doc: object, fields: frozenset[str], *, max_depth: int = MAX_DEPTH
) -> tuple[object, int]:
    """Return a masked copy of a parsed JSON document and how many values were masked.

    A masked field is replaced whole, whatever its value (string, number, boolean, null, list or
    object): the caller learns that the field exists, never what it held. The input is not
    modified. Iterative, so a deeply nested document cannot exhaust the interpreter's stack.
    """
    wanted = _folded(fields if isinstance(fields, frozenset) else frozenset(fields))
    if not isinstance(doc, (dict, list)):
        return doc, 0
    root: dict | list = {} if isinstance(doc, dict) else [None] * len(doc)
    count = 0
    stack: list[tuple[dict | list, dict | list, int]] = [(doc, root, 1)]
    while stack:
        src, dst, depth = stack.pop()
        if depth > max_depth:
            raise MaskingError(f"document nested deeper than {max_depth} levels")
        if isinstance(src, dict):
            for key, value in src.items():
                if isinstance(key, str) and key.casefold() in wanted:
                    dst[key] = MASK
                    count += 1
                elif isinstance(value, dict):
                    dst[key] = child = {}
                    stack.append((value, child, depth + 1))
                elif isinstance(value, list):
                    dst[key] = child = [None] * len(value)
                    stack.append((value, child, depth + 1))
                else:
                    dst[key] = value
        else:
            for index, value in enumerate(src):
                if isinstance(value, dict):
                    dst[index] = child = {}
                    stack.append((value, child, depth + 1))
                elif isinstance(value, list):
                    dst[index] = child = [None] * len(value)
                    stack.append((value, child, depth + 1))
                else:
                    dst[index] = value
    return root, count


def _refuse_constant(name: str) -> object:
    # Python's json accepts NaN and Infinity; they are not JSON, so the body is not what it claims.
    raise MaskingError(f"not valid JSON: {name} is not a JSON value")


def mask_json_bytes(
    data: bytes, fields: frozenset[str], *, max_depth: int = MAX_DEPTH
) -> tuple[bytes, int]:
    """Parse a JSON body once, mask it, serialise it once (compact UTF-8).

    Duplicate keys are legal JSON and the parser keeps the last one. An attacker cannot hide a
    second copy of a field that way: masking runs on the parsed document and the body is always
    re-serialised from it, so what leaves is exactly what was masked, with one copy of each key.
    An empty body is not JSON either: the caller handles bodiless responses (204, HEAD) before.
    """
    try:
        doc = json.loads(data, parse_constant=_refuse_constant)
    except MaskingError:
        raise
    except RecursionError as e:
        raise MaskingError(f"document nested deeper than {max_depth} levels") from e
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise MaskingError(f"not valid JSON: {e}") from e
    masked, count = mask_document(doc, fields, max_depth=max_depth)
    text = json.dumps(masked, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8"), count
    except UnicodeEncodeError:
        # A lone surrogate escape ("\ud800") parses to a str UTF-8 cannot hold; keep it escaped.
        text = json.dumps(masked, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
        return text.encode("ascii"), count


def is_json_content_type(content_type: str) -> bool:
    """``application/json``, ``application/*+json`` and ``text/json``, with any parameters
    (Graph sends ``application/json;odata.metadata=minimal;odata.streaming=true``)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media in ("application/json", "text/json"):
        return True
    type_, _, subtype = media.partition("/")
    return type_ == "application" and subtype.endswith("+json") and len(subtype) > len("+json")
