"""flowformat.dumps writes exactly the bytes of mitmproxy's tnetstring.dumps, and fails as it does:
both of its encoders, the C one (built at install when a C compiler is there) and the Python one.

Generated values of every type mitmproxy accepts (nested dicts with keys of any of those types,
lists, tuples, floats with inf/nan/-0.0, integers of hundreds of digits, non-ASCII text, empty
containers, subclasses such as IntEnum and StrEnum members), real flow states read back by
mitmproxy, and values it refuses: the bytes, or the exception, are mitmproxy's.
"""

from __future__ import annotations

import collections
import enum
import io
import math
import sys
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import io as mio
from mitmproxy.io import tnetstring
from mitmproxy.test import tflow

from nhi_gateway.recording import flowformat

from ..support.missing import missing

# Without the C encoder, the compiled cases are skipped on a user's machine (it has no compiler),
# and fail in CI (test_the_c_encoder_is_built_where_a_compiler_is below says why).
ENCODERS = [
    pytest.param(flowformat.python_dumps, id="python"),
    pytest.param(flowformat.dumps, id="compiled",
                 marks=pytest.mark.skipif(not flowformat.COMPILED, reason="the C encoder was not built")),
]
encoders = pytest.mark.parametrize("dumps", ENCODERS)


class Color(enum.IntEnum):
    RED = 1
    BLUE = -20


class Mode(enum.StrEnum):
    REGULAR = "regular"
    REVERSE = "révérse"


class Legacy(int, enum.Enum):  # an int enum whose str() is "Legacy.ONE", not "1"
    ONE = 1


class Text(str):
    pass


class Shouting(str):
    def encode(self, *args, **kwargs) -> bytes:
        return super().encode(*args, **kwargs).upper()


class Number(int):
    def __str__(self) -> str:
        return "number"


class Ratio(float):
    def __repr__(self) -> str:
        return "ratio"


class Blob(bytes):
    pass


class Backwards(list):  # mitmproxy walks a list with reversed(), not iter()
    def __iter__(self):
        return reversed(list(super().__iter__()))


class Items(dict):
    def items(self):
        return [("replaced", b"items")]


class Point(collections.namedtuple("Point", "x y")):
    pass


def outcome(dumps, value):
    """What ``dumps(value)`` gives: its bytes, or the type and text of its exception."""
    try:
        return dumps(value)
    except Exception as e:  # noqa: BLE001 - the exception is what is compared
        return type(e), str(e)


def short(value) -> str:
    """A test id for ``value``: its repr, cut short, or its type if the repr cannot be made or
    would change from run to run."""
    try:
        text = repr(value)
    except ValueError:  # an integer with too many digits
        return type(value).__name__
    return type(value).__name__ if " at 0x" in text else text[:40]


def assert_same(dumps, value) -> None:
    expected = outcome(tnetstring.dumps, value)
    assert outcome(dumps, value) == expected


# --- generated values ----------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=("Cs",)))  # no lone surrogates: UTF-8 can write it
integers = st.integers() | st.integers(min_value=-(10**400), max_value=10**400)
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, math.inf, -math.inf, math.nan, sys.float_info.max, -sys.float_info.min, 5e-324, 1e22, 0.1]
)
subclassed = st.sampled_from(
    [Color.RED, Color.BLUE, Mode.REGULAR, Mode.REVERSE, Legacy.ONE, Text("tèxt"), Text(""),
     Shouting("loud"), Number(7), Ratio(0.5), Blob(b"blob"), Point(1, b"y")]
)
leaves = (st.none() | st.booleans() | integers | floats | st.binary() | text | subclassed
          | st.just(Backwards([1, "2"])))
keys = st.none() | st.booleans() | integers | st.floats(allow_nan=False) | st.binary() | text | subclassed


def containers(children):
    return (
        st.lists(children)
        | st.lists(children).map(tuple)
        | st.dictionaries(keys, children)
        | st.dictionaries(text, children).map(collections.OrderedDict)
        | st.dictionaries(keys, children).map(Items)
    )


values = st.recursive(leaves, containers, max_leaves=60)


@settings(max_examples=1000)
@given(values)
@encoders
def test_generated_values_are_written_as_mitmproxy_writes_them(dumps, value) -> None:
    expected = tnetstring.dumps(value)
    assert dumps(value) == expected


@settings(max_examples=300)
@given(st.recursive(leaves | st.sampled_from([set(), object(), bytearray(b"x"), "lone \udcff"]),
                    containers, max_leaves=30))
@encoders
def test_values_with_unsupported_parts_fail_as_in_mitmproxy(dumps, value) -> None:
    assert_same(dumps, value)


@pytest.mark.parametrize(
    "value",
    [
        None, True, False, 0, -1, 10**4200, 1.5, -0.0, math.nan, b"", "", [], (), {},
        [[]], {"": {}}, ((),), {b"k": [b"v"]}, {1: "one", "1": 1, b"1": 1.0, None: None, 2.5: True},
        b"x" * 5000, "é" * 3000, [b"x" * 5000], {"body": "\u20ac" * 2000}, list(range(2000)),
    ],
    ids=short,
)
@encoders
def test_edge_values(dumps, value) -> None:
    expected = tnetstring.dumps(value)
    assert dumps(value) == expected


@encoders
def test_dict_items_are_written_last_first_as_mitmproxy_does(dumps) -> None:
    assert tnetstring.dumps({"a": 1, "b": 2}) == b"16:1:b;1:2#1:a;1:1#}"
    assert dumps({"a": 1, "b": 2}) == b"16:1:b;1:2#1:a;1:1#}"


# --- flows ---------------------------------------------------------------------------------------


def flows():
    plain = tflow.tflow(resp=True, err=True)
    json_body = tflow.tflow(resp=True)
    json_body.response.content = b'{"value": [' + b", ".join(b'{"id": "%d", "name": "app \xc3\xa9"}' % i
                                                             for i in range(50)) + b"]}"
    json_body.response.headers.fields = tuple((b"x-header-%d" % i, b"value %d" % i) for i in range(10))
    json_body.metadata = {"nhi": {"tenant": "t", "allowed": True, "score": 0.25, "rules": ["a", "b"]}}
    return [plain, json_body, tflow.twebsocketflow(), tflow.ttcpflow(), tflow.tdnsflow(resp=True)]


@pytest.mark.parametrize("flow", flows(), ids=lambda f: f.type)
@encoders
def test_flow_states_are_written_as_mitmproxy_writes_them_and_read_back(dumps, flow) -> None:
    state = flow.get_state()
    data = dumps(state)
    assert data == tnetstring.dumps(state)
    assert tnetstring.loads(data) == tnetstring.loads(tnetstring.dumps(state))
    [read] = list(mio.FlowReader(io.BytesIO(data)).stream())
    assert read.get_state() == state


# --- what mitmproxy refuses, and subclasses -------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        set(), frozenset({1}), object(), bytearray(b"x"), memoryview(b"x"), 1j, Decimal("1.5"), print,
        {"a": {"b": [1, {2, 3}]}}, [b"ok", object(), set()], {object(): 1}, {"k": set(), "j": bytearray()},
        "lone surrogate \ud800", {"k": ["\udcff"]}, 10**5000, [10**5000],
    ],
    ids=short,
)
@encoders
def test_unsupported_values_raise_as_in_mitmproxy(dumps, value) -> None:
    with pytest.raises(ValueError) as raised:
        dumps(value)
    with pytest.raises(ValueError) as expected:
        tnetstring.dumps(value)
    assert type(raised.value) is type(expected.value)
    assert str(raised.value) == str(expected.value)


@pytest.mark.parametrize(
    "value",
    [
        True, False, [True, 1, False, 0], {True: 1, 0: False},
        Color.RED, Color.BLUE, Mode.REVERSE, Legacy.ONE, Text("tèxt"), Shouting("loud"), Number(3),
        Ratio(2.0), Blob(b"b"), Point(b"x", 2), Backwards([1, b"2", "3"]), Items(a=1), collections.OrderedDict(a=1, b=2),
        {Color.RED: Mode.REGULAR, Text("k"): [Legacy.ONE, Number(0)]},
    ],
    ids=short,
)
@encoders
def test_subclasses_and_bools_are_written_as_in_mitmproxy(dumps, value) -> None:
    expected = tnetstring.dumps(value)
    assert dumps(value) == expected


@encoders
def test_subclass_quirks_are_mitmproxys(dumps) -> None:
    # Both follow from mitmproxy using str() and the subclass's own methods: kept, not fixed.
    assert dumps(Legacy.ONE) == b"10:Legacy.ONE#"  # not readable back as an integer
    assert dumps(Color.RED) == b"1:1#"
    assert dumps(Mode.REGULAR) == b"7:regular;"
    assert dumps(Shouting("loud")) == b"4:LOUD;"


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value, {"k": value}] if depth < 50 else [value]
    return value


@encoders
def test_deep_nesting_is_written_as_mitmproxy_writes_it_and_too_deep_fails_as_it_does(dumps) -> None:
    value = nested(200)
    assert dumps(value) == tnetstring.dumps(value)
    assert dumps(nested(12)) == tnetstring.dumps(nested(12))
    too_deep = nested(100_000)  # past the interpreter's recursion limits, C's included: no crash
    with pytest.raises(RecursionError):
        tnetstring.dumps(too_deep)
    with pytest.raises(RecursionError):
        dumps(too_deep)

def test_the_c_encoder_is_built_where_a_compiler_is() -> None:
    """The recording process relies on the C encoder for its speed; an install without one still
    records the same bytes, only slower. CI's machines have a compiler, so there it must exist."""
    import os
    import shutil
    import sysconfig
    from pathlib import Path

    if flowformat.COMPILED:
        assert flowformat.dumps is not flowformat.python_dumps
        return
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    headers = Path(sysconfig.get_paths()["include"], "Python.h")
    message = ("nhi_gateway.recording._tnetstring was not built: pip install -e . compiles it when a C compiler "
               f"and Python's headers are there (compiler: {compiler or 'none found'}; "
               f"{headers}: {'there' if headers.exists() else 'missing'})")
    missing(message, required=bool(compiler and headers.exists()))
