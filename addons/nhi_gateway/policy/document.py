"""The policy file as YAML data that remembers where each key and value was written.

A policy of thousands of rules must load in well under a second: a reload runs while the gateway
serves, and ``policy lint`` runs in editors and CI. ruamel.yaml's round-trip reader (pure Python,
with comments) takes about 6 s for 5,000 rules, so the common case is read by libyaml (PyYAML's C
parser, about 0.4 s for the same file) with YAML 1.2 scalar resolution taken from ruamel.yaml,
so ``yes`` stays a string and ``0o17`` an octal as the round-trip reader reads them.

The fast reader takes only what it reads exactly as ruamel.yaml would: plain mappings with unique
string keys, lists, strings, whole numbers, booleans, nulls and timestamps, all without explicit
tags. Anything else (a syntax error, a duplicate key, a merge key ``<<``, any tag written in the
file, a float, a tab anywhere)
is read again by ruamel.yaml's round-trip reader, whose errors and values are the reference, so
every message keeps its wording and position.

One difference is kept on purpose: an empty value (``key:`` or ``-`` with nothing after it) is
placed right after its key or dash, where libyaml places it; ruamel.yaml places it at the next
token, which may be lines further down after comments.

Both readers return dicts and lists whose ``.lc`` answers ``line``/``col`` (the container's first
position), ``key(k)``, ``value(k)`` and ``item(i)`` as ruamel.yaml's ``CommentedMap`` and
``CommentedSeq`` do (0-based line and column).
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from ruamel.yaml.constructor import SafeConstructor
from ruamel.yaml.nodes import ScalarNode as RuamelScalar
from ruamel.yaml.resolver import implicit_resolvers

_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_DECIMAL = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_TRUE = frozenset({"true", "True", "TRUE"})
_FALSE = frozenset({"false", "False", "FALSE"})


class Unusual(Exception):
    """The fast reader met something only the round-trip reader reads exactly."""


class _Implicit(str):
    """A tag the resolver chose, not one written in the file (``!!str x``, ``!foo``): explicit tags
    are left to the round-trip reader, whose positions and values for them are the reference."""


_IMPLICIT: dict[str, _Implicit] = {}


class _Loader(yaml.CSafeLoader):
    """libyaml's parser with ruamel.yaml's YAML 1.2 implicit tags (PyYAML's are YAML 1.1)."""

    yaml_implicit_resolvers: dict = {}

    def resolve(self, kind, value, implicit):  # noqa: ANN001, ANN201 - PyYAML's signature
        tag = super().resolve(kind, value, implicit)
        found = _IMPLICIT.get(tag)
        if found is None:
            found = _IMPLICIT[tag] = _Implicit(tag)
        return found


for _versions, _tag, _regexp, _first in implicit_resolvers:
    if (1, 2) in _versions:
        for _ch in _first:
            _Loader.yaml_implicit_resolvers.setdefault(_ch, []).append((_tag, _regexp))


class MapLC:
    """Positions of a mapping, shaped like ruamel.yaml's ``LineCol``."""

    __slots__ = ("line", "col", "data")

    def __init__(self, line: int, col: int) -> None:
        self.line, self.col = line, col
        self.data: dict[Any, tuple[int, int, int, int]] = {}

    def key(self, k: Any) -> tuple[int, int]:
        kl, kc, _, _ = self.data[k]
        return kl, kc

    def value(self, k: Any) -> tuple[int, int]:
        _, _, vl, vc = self.data[k]
        return vl, vc


class SeqLC:
    __slots__ = ("line", "col", "data")

    def __init__(self, line: int, col: int) -> None:
        self.line, self.col = line, col
        self.data: list[tuple[int, int]] = []

    def item(self, i: int) -> tuple[int, int]:
        return self.data[i]


class PlacedMap(dict):
    __slots__ = ("lc",)


class PlacedSeq(list):
    __slots__ = ("lc",)


_TIMESTAMPS = SafeConstructor()


def read_fast(text: str) -> Any:
    """The document, or :class:`Unusual` when the round-trip reader must read it."""
    if "\t" in text:
        # YAML forbids tabs in indentation, and the two readers disagree about them elsewhere
        # (libyaml takes "a\tb" as a plain scalar, ruamel.yaml refuses it): ruamel.yaml decides.
        raise Unusual("a tab")
    try:
        root = yaml.compose(text, Loader=_Loader)
        return None if root is None else _Builder().build(root)
    except Unusual:
        raise
    except Exception as e:  # noqa: BLE001 - syntax, encoding (lone surrogates), depth: the reference reader says
        raise Unusual(str(e)) from e


class _Builder:
    def __init__(self) -> None:
        self.done: dict[int, Any] = {}  # anchored nodes read once, as the round-trip reader shares them

    def build(self, node: yaml.Node) -> Any:
        done = self.done.get(id(node))
        if done is not None:
            return done[0]
        if type(node.tag) is not _Implicit:
            raise Unusual(f"explicit tag {node.tag}")
        if isinstance(node, yaml.ScalarNode):
            value = self.scalar(node)
        elif isinstance(node, yaml.MappingNode):
            if node.tag != _MAP:
                raise Unusual(node.tag)
            mark = node.start_mark
            value = PlacedMap()
            lc = value.lc = MapLC(mark.line, mark.column)
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode) or knode.tag != _STR or type(knode.tag) is not _Implicit:
                    raise Unusual("a key that is not a plain string")
                key = knode.value
                if key in value:
                    raise Unusual("duplicate key")
                value[key] = self.build(vnode)
                km, vm = knode.start_mark, vnode.start_mark
                lc.data[key] = (km.line, km.column, vm.line, vm.column)
        elif isinstance(node, yaml.SequenceNode):
            if node.tag != _SEQ:
                raise Unusual(node.tag)
            mark = node.start_mark
            value = PlacedSeq()
            lc = value.lc = SeqLC(mark.line, mark.column)
            for item in node.value:
                value.append(self.build(item))
                m = item.start_mark
                lc.data.append((m.line, m.column))
        else:  # pragma: no cover - libyaml composes only these three
            raise Unusual(type(node).__name__)
        self.done[id(node)] = (value,)
        return value

    @staticmethod
    def scalar(node: yaml.ScalarNode) -> Any:
        tag, text = node.tag, node.value
        if tag == _STR:
            return text
        if tag == _NULL and text in ("", "~", "null", "Null", "NULL"):
            return None
        if tag == _BOOL:
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
        elif tag == _INT and _DECIMAL.fullmatch(text):
            return int(text)
        elif tag == _TIMESTAMP:
            try:
                return _TIMESTAMPS.construct_yaml_timestamp(RuamelScalar(tag, text))
            except Exception as e:  # noqa: BLE001 - the round-trip reader reports it
                raise Unusual(tag) from e
        raise Unusual(tag)
