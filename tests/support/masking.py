"""The model of a mask: what ``redact`` leaves of a matched JSON value, written without the code
under test, and the leaves of a value to check that no original is left."""

from __future__ import annotations

from nhi_gateway.masking.masks import MASK


def redacted(value):
    """The model of ``redact`` on a matched value: same JSON type, no original left (a string is
    the mask, a number or boolean becomes null, containers keep their shape)."""
    if isinstance(value, str):
        return MASK
    if isinstance(value, list):
        return [redacted(v) for v in value]
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    return None


def leaves(value):
    """Every scalar below a value."""
    if isinstance(value, list):
        return [leaf for v in value for leaf in leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in leaves(v)]
    return [value]
