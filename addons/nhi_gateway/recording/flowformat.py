"""A faster ``mitmproxy.io.tnetstring.dumps``, for writing recordings.

Every recorded flow is written in mitmproxy's format (tnetstring). mitmproxy's ``dumps`` is a
generic recursive function that goes through a chain of ``isinstance`` tests for every value and
pushes each piece onto a deque; for a typical flow state it became the largest single cost of
writing a recording. :func:`dumps` here writes the same bytes about two and a half times faster:
it tests the exact type of each value, commonest first (bytes, str, dict, tuple), appends the
pieces of each container to a list joined once, and takes the length prefixes of short values
from a table.

The output is byte-identical to mitmproxy's (``tests/unit/test_flowformat.py`` checks it on
generated values and on real flow states), quirks included:

* a dict's items are written in *reverse* insertion order (mitmproxy builds its output last piece
  first, which reverses them; reading them back reverses them again);
* keys are encoded like any other value (a str key is a ``;`` string, an int key an integer);
* tuples are written as lists; ``True``/``False`` are ``4:true!``/``5:false!``, ``None`` is
  ``0:~``; floats are written with ``repr`` (so ``inf``, ``nan`` and ``-0.0`` too).

Only the exact built-in types are encoded here. A value of any other type (a subclass of str, int,
dict... such as a StrEnum or IntEnum member or an OrderedDict) is encoded by mitmproxy's own
``dumps``, so whatever mitmproxy does with it stays what happens. If anything goes wrong (an
unsupported value, a string with a lone surrogate, an integer too long to print), the whole value
is handed to mitmproxy's ``dumps``, so the exception raised is mitmproxy's own (``ValueError`` for
an unsupported value).

The same encoder is also written in C (``_tnetstring.c``, built by ``pip install`` when a C compiler
is there): encoding was still about a fifth of the recording process's CPU in Python, some 150
calls per record. :func:`dumps` uses it when it was built (:data:`COMPILED`) and the Python
encoder otherwise; the tests hold both to mitmproxy's bytes.
"""

from __future__ import annotations

from mitmproxy.io import tnetstring

try:
    from nhi_gateway.recording import _tnetstring
except ImportError:  # installed without a C compiler: the Python encoder below, same bytes
    _tnetstring = None

__all__ = ["COMPILED", "dumps", "escape_unencodable", "python_dumps"]

COMPILED = _tnetstring is not None

# Length prefixes (b"0:", b"1:", ...) of values shorter than this, made once.
_SHORT = 4096
_PREFIXES = [b"%d:" % n for n in range(_SHORT)]


def dumps(value) -> bytes:
    """``value`` as a tnetstring, exactly as ``mitmproxy.io.tnetstring.dumps`` writes it."""
    if _tnetstring is None:
        return python_dumps(value)
    try:
        return _tnetstring.dumps(value, tnetstring.dumps)
    except Exception:
        return tnetstring.dumps(value)  # mitmproxy's own exception, as python_dumps raises it


def python_dumps(value) -> bytes:
    """:func:`dumps` in Python (without the C encoder)."""
    parts: list[bytes] = []
    try:
        _write(value, parts.append)
    except Exception:
        # Let mitmproxy raise its own exception: which one, for a container holding several bad
        # values, depends on the order in which it visits them.
        return tnetstring.dumps(value)
    return b"".join(parts)


def _write(value, append) -> None:
    """Append the pieces of ``value``'s tnetstring with ``append``."""
    cls = type(value)
    if cls is bytes:
        n = len(value)
        append(_PREFIXES[n] if n < _SHORT else b"%d:" % n)
        append(value)
        append(b",")
    elif cls is str:
        data = value.encode()
        n = len(data)
        append(_PREFIXES[n] if n < _SHORT else b"%d:" % n)
        append(data)
        append(b";")
    elif cls is dict:
        parts: list[bytes] = []
        add = parts.append
        for key, item in reversed(value.items()):  # mitmproxy writes the last item first
            _write(key, add)
            _write(item, add)
        data = b"".join(parts)
        n = len(data)
        append(_PREFIXES[n] if n < _SHORT else b"%d:" % n)
        append(data)
        append(b"}")
    elif cls is tuple or cls is list:
        parts = []
        add = parts.append
        for item in value:
            _write(item, add)
        data = b"".join(parts)
        n = len(data)
        append(_PREFIXES[n] if n < _SHORT else b"%d:" % n)
        append(data)
        append(b"]")
    elif cls is int:
        data = b"%d" % value
        n = len(data)
        append(_PREFIXES[n] if n < _SHORT else b"%d:" % n)
        append(data)
        append(b"#")
    elif value is None:
        append(b"0:~")
    elif cls is float:
        data = repr(value).encode()
        append(_PREFIXES[len(data)])  # at most 24 characters
        append(data)
        append(b"^")
    elif cls is bool:
        append(b"4:true!" if value else b"5:false!")
    else:
        # Subclasses and anything else: mitmproxy's encoding of one value does not depend on
        # where it stands, so its dumps of this value alone is the right piece (or raises).
        append(tnetstring.dumps(value))


def _escaped(text: str) -> str:
    try:
        # mitmproxy keeps bytes that are not UTF-8 as lone surrogates (surrogateescape): write
        # the bytes that were sent, as \xNN.
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def escape_unencodable(value):
    """``value`` with every string that UTF-8 cannot encode (a host, an SNI or a header name that
    held bytes that are not UTF-8) written with backslash escapes, so that the record can be
    written at all: tnetstring strings are UTF-8, and a flow that cannot be written would be
    refused and left unrecorded, which is what a hostile client sending such bytes wants."""
    cls = type(value)
    if cls is str:
        try:
            value.encode()
        except UnicodeEncodeError:
            return _escaped(value)
        return value
    if cls is dict:
        return {escape_unencodable(k): escape_unencodable(v) for k, v in value.items()}
    if cls is list or cls is tuple:
        return cls(escape_unencodable(v) for v in value)
    return value
