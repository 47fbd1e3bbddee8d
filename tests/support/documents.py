"""Policy documents as data: every place in one, and hostile edits of one's text."""

from __future__ import annotations

from collections.abc import Iterator

from hypothesis import strategies as st


def places(node, prefix: tuple = ()) -> Iterator[tuple[tuple, object]]:
    """Every place in a parsed document, the root first: (path of keys and indexes, value)."""
    yield prefix, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from places(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from places(v, (*prefix, i))


@st.composite
def text_mutations(draw, text: str, pieces: st.SearchStrategy[str], longest_cut: int) -> str:
    """``text`` with one to four spans (each up to ``longest_cut`` characters, maybe empty) replaced
    by a drawn piece: YAML syntax, tags, control characters, values of the wrong type."""
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = min(len(text), i + draw(st.integers(0, longest_cut)))
        text = text[:i] + draw(pieces) + text[j:]
    return text
