"""Masking what Graph answers: mask profiles, compiled once at load, applied in one walk.

A :class:`MaskProfile` (``masking.profiles.<name>`` in the policy, see :mod:`nhi_gateway.policy.model`)
says what to hide and how. What to match:

- **fields**: JSON member names, matched case-insensitively (Graph's property names are
  case-insensitive in practice) wherever they occur: top level, ``value[]`` collections,
  ``$expand``ed objects, arrays of objects, pages, ``$batch`` ``responses[].body``.
- **paths**: JSON paths in a small subset of JSONPath (RFC 9535), see :func:`compile_path`:
  ``$.value[*].identities[*].issuerAssignedId``, ``$..keyCredentials[*].key``. ``$`` is the
  root of the body (of each inner body, in a ``$batch``); names match case-insensitively too.
- **detectors** (:class:`Detector`): shapes found *inside* any string value, whatever its member
  name, and inside text bodies: e-mail addresses, phone numbers, JWTs, ``Bearer``/``Basic``
  credentials, Graph secrets (Entra client secrets ``abc8Q~...``, DER certificates ``MII...``,
  PEM blocks, and the members :data:`GRAPH_SECRET_FIELDS` by name) and high-entropy tokens.

How (:class:`Style`): ``redact`` replaces the value with :data:`MASK`; ``partial`` keeps a hint
(``a***@contoso.com``, ``***09`` for a phone number, ``abc***`` otherwise: never more than three
characters of the value, besides an address's domain); ``pseudonym`` replaces it with ``pseudonym:<16 hex>``, a keyed
HMAC-SHA256 of the value, so the same value gives the same token everywhere within a deployment
(an agent can still tell that two records name the same person) and nobody without the key can
reverse or confirm a guess. E-mail addresses are case-folded first (``Adele@X`` and ``adele@x``
are one address). The key comes from the environment (:class:`PseudonymKey`), never from the
policy file, and no repr, log line or error message shows it.

A member matched by a field or a path keeps its JSON type, so that typed clients (msgraph-sdk's
models, which expect ``businessPhones`` to be a list of strings) still read the answer: a string
becomes the masked string (``redact``: ``"[masked]"``; ``partial``; ``pseudonym``), a list keeps
its length with each item masked, an object keeps its keys with each value masked, ``null`` stays
``null``, and a number or a boolean becomes ``null``. Nothing of the original value is left.
A member matched by both, or by several paths, gets the strongest style
(redact > pseudonym > partial).

Detectors skip OData's own annotations (``@odata.nextLink``, ``@odata.deltaLink``,
``members@odata.nextLink``, ``@odata.context``, ``@odata.type``, ``@odata.etag`` ...: links must
stay followable, and their skip tokens look random by design); any other member is scanned. The
high-entropy detector also skips identifiers (``id``, ``...Id``, ``...Ids``, ``eTag``, ``cTag``,
``changeKey``): Graph ids of messages and drive items are long base64 strings, not secrets.
Member names themselves are never scanned.

High entropy: a run of at least :data:`ENTROPY_MIN_LENGTH` characters of ``A-Za-z0-9+/=_-.~``
that has a letter and a digit, is not a GUID and contains none, and whose Shannon entropy is at
least :data:`ENTROPY_THRESHOLD` bits per character; a token that starts with ``/`` (a path, or a
URL after its scheme) is judged segment by segment. Hex strings (GUIDs, thumbprints) stay below
4.0 bits by construction and are never masked by it: name such fields instead.

Where (:func:`mask_body`): JSON bodies get fields, paths and detectors; form bodies
(``application/x-www-form-urlencoded``) get fields (by parameter name) and detectors; text bodies
(``text/*``, XML, JavaScript, YAML, and bodies without a type that are UTF-8 text) get the
detectors, in place; a body without a type that starts with ``{`` or ``[`` is read as JSON. A
body that is not what it claims to be is refused (:class:`MaskingError`; the gateway answers
502), never passed on: JSON that does not parse, text that does not decode in its charset (UTF-8
when none is named), a form that does not parse. Binary bodies (images, PDFs,
``application/octet-stream`` and every other type) cannot be scanned: a profile with detectors
refuses them unless it says ``binary: pass``; a profile without detectors passes them, since no
field or path can name anything in them.

Performance: a JSON body is parsed once, masked in place (the freshly parsed document is ours to
change, so nothing is copied) and serialised once. Paths run as a small automaton inside the same
walk, so a profile with paths costs one walk, not one per path. The walk is iterative and bounded
by :data:`MAX_DEPTH`, so a deeply nested document cannot exhaust the interpreter's stack.

Why not a JSONPath library: jsonpath-ng and python-jsonpath evaluate one expression per
traversal, allocate a context object per visited node, match names case-sensitively (Graph does
not) and parse filters and arithmetic that a masking policy must refuse anyway. The subset
here is a dozen lines of grammar that run inside the masking walk itself.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from types import MappingProxyType
from urllib.parse import parse_qsl, quote, urlencode

MASK = "[masked]"
MAX_DEPTH = 200  # Graph documents are a handful of levels deep; anything near this is hostile
PSEUDONYM_PREFIX = "pseudonym:"
MIN_KEY_BYTES = 16
ENTROPY_MIN_LENGTH = 32
ENTROPY_THRESHOLD = 4.0  # bits per character; random base64 of 32+ characters is above 4.2
# A value masked in the body is masked in the response headers too, when it is at least this long:
# shorter ones ("WA", "12") would match inside unrelated header values.
MIN_REPEATED_LENGTH = 4


class MaskingError(ValueError):
    """The body cannot be masked: the response must be refused, never passed on as it is."""


class Style(StrEnum):
    """How a matched value is replaced."""

    REDACT = "redact"
    PARTIAL = "partial"
    PSEUDONYM = "pseudonym"


_STRENGTH = {Style.PARTIAL: 0, Style.PSEUDONYM: 1, Style.REDACT: 2}


def _strongest(a: Style | None, b: Style) -> Style:
    return b if a is None or _STRENGTH[b] > _STRENGTH[a] else a


class Detector(StrEnum):
    """What is found inside string values and text bodies."""

    EMAIL = "email"
    PHONE = "phone"
    JWT = "jwt"
    BEARER = "bearer"
    GRAPH_SECRET = "graph_secret"
    HIGH_ENTROPY = "high_entropy"


class BinaryBodies(StrEnum):
    """What happens to a body the profile cannot read: binary bodies (images, PDFs, octet streams
    that are not JSON), and text bodies under a profile without detectors."""

    PASS = "pass"
    REFUSE = "refuse"


# Graph members that hold secrets, masked by name when the graph_secret detector is on:
# addPassword's secretText and hint, keyCredentials[].key and BitLocker's key, LAPS passwords,
# passwordProfile.password, and the pre-authenticated download URLs of drive items.
GRAPH_SECRET_FIELDS = (
    "secretText",
    "hint",
    "key",
    "passwordBase64",
    "password",
    "@microsoft.graph.downloadUrl",
    "@content.downloadUrl",
)


# Graph properties that hold what a detector exists to hide. A profile with the detector masks
# their values wherever they appear, so a filter, sort or search on them would test what it masks
# (startswith(otherMails,'a')): they count as hidden by name too (see MaskProfile.hidden).
DETECTED_PROPERTIES = {
    Detector.EMAIL: ("mail", "otherMails", "proxyAddresses", "userPrincipalName", "imAddresses",
                     "issuerAssignedId"),
    Detector.PHONE: ("mobilePhone", "businessPhones", "faxNumber"),
}


# --- the pseudonym key ----------------------------------------------------------------------------


class PseudonymKey:
    """The HMAC key of ``pseudonym`` masking. Never shown: not by repr, str, or pickling.

    ``source`` says where the key came from (``$NHI_MASK_KEY``), for messages.
    """

    __slots__ = ("_mac", "source")

    def __init__(self, key: bytes, source: str) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the pseudonym key from {source} is {len(key)} bytes long; "
                             f"it must be at least {MIN_KEY_BYTES}")
        self._mac = hmac.new(key, digestmod="sha256")
        self.source = source

    def pseudonym(self, value: str) -> str:
        mac = self._mac.copy()
        mac.update(value.encode("utf-8", "surrogatepass"))
        return PSEUDONYM_PREFIX + mac.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"<PseudonymKey from {self.source}>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a pseudonym key is never serialised")


# --- JSON paths -----------------------------------------------------------------------------------


class JSONPathError(ValueError):
    """A path outside the supported subset; ``offset`` is the 0-based character at fault."""

    def __init__(self, path: str, offset: int, message: str, hint: str = "") -> None:
        self.path = path
        self.offset = offset
        self.message = message
        self.hint = hint
        super().__init__(f"JSON path {path!r}, character {offset + 1}: {message}")


_CHILD, _ANY, _INDEX, _DESCENDANT = range(4)


@dataclass(frozen=True)
class _Step:
    kind: int
    name: str | None = None  # case-folded member name (_CHILD, _DESCENDANT)
    index: int | None = None  # _INDEX


@dataclass(frozen=True)
class JSONPath:
    text: str
    steps: tuple[_Step, ...]


_DIGITS = re.compile(r"[0-9]+")
_SHORTHAND = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_\u0080-\U0010ffff]*")
_QUOTED = re.compile(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)\"""")
_UNSUPPORTED = {
    "?": "filters ([?...]) are not supported",
    ":": "slices ([a:b]) are not supported",
    ",": "unions ([a,b]) are not supported: write one path per entry",
    "-": "negative indexes are not supported",
    "(": "script expressions are not supported",
}


def compile_path(text: str) -> JSONPath:
    """Compile a JSON path of this subset of RFC 9535 (raises :class:`JSONPathError`):

    - ``$`` the root, followed by at least one segment;
    - ``.name`` or ``['name']`` / ``["name"]`` a member (the bracket form for names such as
      ``@odata.type`` or ``@microsoft.graph.downloadUrl``);
    - ``.*`` or ``[*]`` every member of an object or element of an array;
    - ``[0]`` one element of an array;
    - ``..name`` or ``..['name']`` the member at any depth below.

    Names match case-insensitively. Filters, slices, unions, negative indexes and ``..*`` are
    refused, not ignored: a path that matched less than it says would leave values unmasked.
    """
    if not text.startswith("$"):
        raise JSONPathError(text, 0, "a path starts with '$' (the root of the body)",
                            "e.g. $.value[*].mail; to match a name anywhere, list it under fields")
    steps: list[_Step] = []
    i, n = 1, len(text)
    while i < n:
        c = text[i]
        if text.startswith("..", i):
            i += 2
            if i < n and text[i] == "[":
                name, i = _bracket_name(text, i)
            elif i < n and text[i] == "*":
                raise JSONPathError(text, i, "'..*' matches every value of the document",
                                    "name the member: $..keyCredentials[*].key")
            else:
                name, i = _shorthand(text, i)
            steps.append(_Step(_DESCENDANT, name=name.casefold()))
        elif c == ".":
            i += 1
            if i < n and text[i] == "*":
                steps.append(_Step(_ANY))
                i += 1
            else:
                name, i = _shorthand(text, i)
                steps.append(_Step(_CHILD, name=name.casefold()))
        elif c == "[":
            inner = text[i + 1:i + 2]
            if inner == "*":
                if text[i + 2:i + 3] != "]":
                    raise JSONPathError(text, i + 2, "expected ']' after '[*'")
                steps.append(_Step(_ANY))
                i += 3
            elif inner.isdigit():
                m = _DIGITS.match(text, i + 1)
                end = m.end()
                if text[end:end + 1] != "]":
                    bad = text[end:end + 1]
                    raise JSONPathError(text, end, _UNSUPPORTED.get(bad, f"expected ']', not {bad or 'the end'!r}"))
                if len(m.group()) > 1 and m.group().startswith("0"):
                    raise JSONPathError(text, i + 1, "an index has no leading zeros")
                steps.append(_Step(_INDEX, index=int(m.group())))
                i = end + 1
            elif inner in ("'", '"'):
                name, i = _bracket_name(text, i)
                steps.append(_Step(_CHILD, name=name.casefold()))
            else:
                raise JSONPathError(text, i + 1, _UNSUPPORTED.get(inner, f"unexpected {inner or 'end'!r} after '['"),
                                    "use [*], [0] or ['name']")
        else:
            raise JSONPathError(text, i, f"unexpected {c!r}", "segments start with '.', '..' or '['")
    if not steps:
        raise JSONPathError(text, 0, "'$' alone is the whole body", "name what to mask below it: $.value[*].mail")
    return JSONPath(text, tuple(steps))


def _shorthand(text: str, i: int) -> tuple[str, int]:
    m = _SHORTHAND.match(text, i)
    if not m:
        found = text[i:i + 1]
        hint = "quote names with other characters: ['@odata.type']" if found else ""
        raise JSONPathError(text, i, f"expected a member name, not {found or 'the end'!r}", hint)
    return m.group(), m.end()


def _bracket_name(text: str, i: int) -> tuple[str, int]:
    m = _QUOTED.match(text, i + 1)
    if not m or text[m.end():m.end() + 1] != "]":
        raise JSONPathError(text, i, "expected ['name'] or [\"name\"]")
    raw = m.group(1) if m.group(1) is not None else m.group(2)
    name = re.sub(r"\\(.)", r"\1", raw)
    if not name:
        raise JSONPathError(text, i, "an empty member name")
    return name, m.end() + 1


# --- detectors ------------------------------------------------------------------------------------

# The local part is narrower than RFC 5322 allows (no quotes, slashes or "=" at its start), so
# that "'adele@contoso.com'" or "path/adele@contoso.com" masks the address, not what surrounds it.
_EMAIL = (
    r"[A-Za-z0-9_%+#-][A-Za-z0-9._%+'#&!$*^`{|}~-]{0,63}"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,63}(?![A-Za-z0-9-])"
)
# International numbers with a country code (any country), and NANP-style national numbers
# (425-555-0109, (425) 555 0109). Digits glued to letters, dashes or dots (SIDs, GUIDs, dates,
# version numbers) never start or end one.
_PHONE = (
    r"(?<![\w+])\+[1-9](?:[ .\-]?\(?\d\)?){7,14}(?![\w])"
    r"|(?<![\w+\-.])(?:\(\d{3}\)|\d{3})[ .\-]?\d{3}[ .\-]\d{4}(?![\w\-])"
)
_JWT = r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*)?"
_BEARER = r"(?i:\b(?:bearer|pop|basic)[ \t]+)(?=[A-Za-z0-9\-._~+/]*[0-9\-._~+/])[A-Za-z0-9\-._~+/]{16,}=*"
_GRAPH_SECRET = (
    # Entra client secrets: three characters, a digit, "Q~", 31 to 34 more (40 in all today).
    # A "." may end a sentence right after one: it ends the secret unless more of it follows.
    r"(?<![A-Za-z0-9_~.-])[A-Za-z0-9_~.-]{3}[0-9]Q~[A-Za-z0-9_~.-]{31,34}(?![A-Za-z0-9_~-]|\.[A-Za-z0-9_~.-])"
    # DER in base64 (certificates, keys: a SEQUENCE with a long length starts "MII").
    # Not inside a longer token (a JWT segment may hold "MII" by chance).
    r"|(?<![A-Za-z0-9+/_.~-])MII[A-Za-z0-9+/]{60,}={0,2}(?![A-Za-z0-9_.~-])"
    r"|-----BEGIN [A-Z0-9 ]{1,40}-----[\s\S]{1,200000}?-----END [A-Z0-9 ]{1,40}-----"
)
_PATTERNS = {  # tried in this order at each position
    Detector.JWT: _JWT,
    Detector.GRAPH_SECRET: _GRAPH_SECRET,
    Detector.BEARER: _BEARER,
    Detector.EMAIL: _EMAIL,
    Detector.PHONE: _PHONE,
}
_EMAIL_FULL = re.compile(r"(?P<local>[^@\s]+)@(?P<domain>[^@\s]+\.[^@\s]+)")
_PHONE_FULL = re.compile(_PHONE)
_TOKEN = re.compile(r"[A-Za-z0-9+/=_\-.~]{%d,}" % ENTROPY_MIN_LENGTH)
_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HAS_LETTER = re.compile(r"[A-Za-z]")
_HAS_DIGIT = re.compile(r"[0-9]")
_SCHEME = re.compile(r"(?i)(bearer|pop|basic)([ \t]+)")


def shannon_entropy(text: str) -> float:
    """Bits per character of ``text``'s own character distribution."""
    n = len(text)
    if not n:
        return 0.0
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def is_high_entropy(token: str) -> bool:
    """Whether a token looks like a random secret (see the module docstring for the rules)."""
    if len(token) < ENTROPY_MIN_LENGTH:
        return False
    if token.startswith("/"):
        # A path, or the rest of a URL after its scheme ("//graph.microsoft.com/v1.0/users"):
        # each segment on its own.
        return any(is_high_entropy(segment) for segment in token.split("/") if segment)
    if not _HAS_LETTER.search(token) or not _HAS_DIGIT.search(token) or _GUID.search(token):
        return False
    return shannon_entropy(token) >= ENTROPY_THRESHOLD


def partial(value: str, kind: Detector | None = None) -> str:
    """A hint of ``value``: ``a***@contoso.com`` for an e-mail address, ``***09`` for a phone
    number, otherwise its first three characters (fewer for a value shorter than 12) and ``***``."""
    if kind in (None, Detector.EMAIL):
        m = _EMAIL_FULL.fullmatch(value)
        if m:
            return f"{m['local'][:1]}***@{m['domain']}"
    if kind is Detector.PHONE or (kind is None and _PHONE_FULL.fullmatch(value)):
        return "***" + re.sub(r"\D", "", value)[-2:]
    keep = 3 if kind is not None else min(3, len(value) // 4)
    return value[:keep] + "***"


@lru_cache(maxsize=256)
def _combined(detectors: tuple[Detector, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?P<{d.value}>{_PATTERNS[d]})" for d in detectors))


class _Scanner:
    """The detectors of one profile: one combined regex of the detectors that can apply to a
    string, then the high-entropy pass."""

    __slots__ = ("styles", "key", "_jwt", "_secret", "_bearer", "_email", "_phone", "_entropy", "_patterns")

    def __init__(self, styles: Mapping[Detector, Style], key: PseudonymKey | None) -> None:
        self.styles = styles
        self.key = key
        self._jwt = Detector.JWT in styles
        self._secret = Detector.GRAPH_SECRET in styles
        self._bearer = Detector.BEARER in styles
        self._email = Detector.EMAIL in styles
        self._phone = Detector.PHONE in styles
        self._entropy = styles.get(Detector.HIGH_ENTROPY)
        self._patterns: dict[int, re.Pattern[str]] = {}

    def _pattern(self, text: str) -> re.Pattern[str] | None:
        # Cheap substring tests first: most strings hold no "@", "eyJ" or "Q~", so most never
        # meet a regex, and the ones that do meet only the detectors that can match them.
        mask = 0
        if self._jwt and "eyJ" in text:
            mask |= 1
        if self._secret and ("Q~" in text or "MII" in text or "-----BEGIN" in text):
            mask |= 2
        if self._bearer and (" " in text or "\t" in text):
            mask |= 4
        if self._email and "@" in text:
            mask |= 8
        if self._phone and _HAS_DIGIT.search(text) is not None:
            mask |= 16
        if not mask:
            return None
        pattern = self._patterns.get(mask)
        if pattern is None:
            order = (Detector.JWT, Detector.GRAPH_SECRET, Detector.BEARER, Detector.EMAIL, Detector.PHONE)
            pattern = self._patterns[mask] = _combined(tuple(d for i, d in enumerate(order) if mask & (1 << i)))
        return pattern

    def _replace(self, text: str, kind: Detector) -> str:
        style = self.styles[kind]
        if kind is Detector.BEARER:
            scheme = _SCHEME.match(text)
            if scheme:
                return scheme.group() + self._replace_token(text[scheme.end():], kind, style)
        return self._replace_token(text, kind, style)

    def _replace_token(self, text: str, kind: Detector, style: Style) -> str:
        if style is Style.REDACT:
            return MASK
        if style is Style.PARTIAL:
            return partial(text, kind)
        assert self.key is not None  # checked when the profile was built
        return self.key.pseudonym(text.casefold() if kind is Detector.EMAIL else text)

    def scan(self, text: str, member: str | None = None) -> tuple[str, int]:
        """``text`` with every detected span replaced, and how many were. ``member`` is the name
        the value is held under: the high-entropy detector leaves identifiers alone."""
        count = 0
        pattern = self._pattern(text)
        if pattern is not None:
            def sub(m: re.Match[str]) -> str:
                nonlocal count
                count += 1
                return self._replace(m.group(), Detector(m.lastgroup))

            text = pattern.sub(sub, text)
        style = self._entropy
        if style is not None and len(text) >= ENTROPY_MIN_LENGTH and not (member and _is_identifier(member)):
            def sub_token(m: re.Match[str]) -> str:
                nonlocal count
                token = m.group()
                if not is_high_entropy(token):
                    return token
                count += 1
                return self._replace_token(token, Detector.HIGH_ENTROPY, style)

            text = _TOKEN.sub(sub_token, text)
        return text, count


# --- profiles -------------------------------------------------------------------------------------


def _styles(spec: Mapping[str, Style | str] | Iterable[str] | None) -> dict[str, Style]:
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): Style(v) for k, v in spec.items()}
    if isinstance(spec, str):
        raise TypeError("give a list of names, not one string")
    return {str(k): Style.REDACT for k in spec}


# OData control information (case-folded), as members (@odata.nextLink) or on a property
# (members@odata.nextLink); "odata.nextLink" is the older odata.metadata=full spelling. Only
# these are exempt: an "@odata.anything" that Graph does not send is scanned like any member.
_ANNOTATION_NAMES = frozenset({
    "context", "nextlink", "deltalink", "type", "id", "etag", "count", "editlink", "readlink",
    "navigationlink", "associationlink", "mediareadlink", "mediaeditlink", "mediaetag", "mediacontenttype",
})


def _is_annotation(folded: str) -> bool:
    if "odata." not in folded:
        return False
    at = folded.rfind("odata.")
    return (at == 0 or folded[at - 1] == "@") and folded[at + 6:] in _ANNOTATION_NAMES


def _is_identifier(key: str) -> bool:
    return (key in ("id", "ID", "Id") or key.endswith(("Id", "Ids", "ID", "IDs", "Tag"))
            or key.casefold() in ("etag", "ctag", "changekey"))


class MaskProfile:
    """A compiled mask profile. Build it once (the policy loader does, at load time).

    ``fields``, ``paths`` and ``detectors`` map what was written to its :class:`Style`; a list
    means ``redact`` for each. Raises ``ValueError`` (:class:`JSONPathError` for a path) naming
    the bad entry, so a mistake stops the start, not a request.
    """

    __slots__ = ("name", "fields", "paths", "detectors", "binary", "pseudonym_key",
                 "_names", "_paths", "_scanner", "_root_states", "_indexed", "_hidden")

    def __init__(
        self,
        name: str,
        fields: Mapping[str, Style | str] | Iterable[str] | None = None,
        *,
        paths: Mapping[str, Style | str] | Iterable[str] | None = None,
        detectors: Mapping[Detector | str, Style | str] | Iterable[Detector | str] | None = None,
        binary: BinaryBodies | str | None = None,
        pseudonym_key: PseudonymKey | None = None,
    ) -> None:
        self.name = name
        self.fields = MappingProxyType(_styles(fields))
        self.paths = MappingProxyType(_styles(paths))
        self.detectors = MappingProxyType({Detector(k): s for k, s in _styles(detectors).items()})
        # A body the profile cannot read (binary; text without detectors) is refused unless the
        # profile says otherwise: what it cannot read, it cannot show to be free of what it hides.
        self.binary = BinaryBodies(binary) if binary else BinaryBodies.REFUSE
        self.pseudonym_key = pseudonym_key
        for what, styles in (("field", self.fields), ("path", self.paths), ("detector", self.detectors)):
            for k, style in styles.items():
                if style is Style.PSEUDONYM and pseudonym_key is None:
                    raise ValueError(f"mask profile {name!r}: {what} {str(k)!r} asks for pseudonyms, "
                                     "but no pseudonym key is configured")
        names: dict[str, Style] = {}
        for k, style in self.fields.items():
            if "[" in k or "]" in k or k.startswith("$"):
                # A path spelt as a name would silently match nothing, leaving the value unmasked.
                leaf = re.split(r"[.\[\]*$]+", k.rstrip(".[]*"))[-1] or k
                raise ValueError(f"mask field {k!r}: fields are member names, matched wherever they "
                                 f"occur; write a JSON path under paths instead "
                                 f"(e.g. {_as_path(k)!r}), or the last name alone ({leaf!r})")
            names[k.casefold()] = _strongest(names.get(k.casefold()), style)
        if Detector.GRAPH_SECRET in self.detectors:
            for k in GRAPH_SECRET_FIELDS:
                names[k.casefold()] = _strongest(names.get(k.casefold()), self.detectors[Detector.GRAPH_SECRET])
        self._names = names
        self._paths = tuple((compile_path(p), style) for p, style in self.paths.items())
        self._root_states = tuple((i, 0) for i in range(len(self._paths)))
        self._indexed = any(s.kind == _INDEX for path, _ in self._paths for s in path.steps)
        self._scanner = _Scanner(self.detectors, pseudonym_key) if self.detectors else None
        self._hidden: Mapping[str, str] | None = None

    def __repr__(self) -> str:
        parts = [f"fields={len(self.fields)}", f"paths={len(self.paths)}",
                 f"detectors={','.join(d.value for d in self.detectors) or '-'}", f"binary={self.binary.value}"]
        return f"<MaskProfile {self.name} {' '.join(parts)}>"

    @property
    def scans_text(self) -> bool:
        """Whether the profile has detectors: text bodies are scanned only then."""
        return self._scanner is not None

    @property
    def refuses_binary(self) -> bool:
        return self.binary is BinaryBodies.REFUSE

    def scan_text(self, text: str) -> tuple[str, int]:
        """A text (a body, a form value) with the profile's detectors applied."""
        return self._scanner.scan(text) if self._scanner is not None else (text, 0)

    @property
    def hidden(self) -> Mapping[str, str]:
        """The properties this profile hides, by case-folded name, with the name to show: its
        fields, the names its paths end on, the members its graph_secret detector masks by name,
        and :data:`DETECTED_PROPERTIES` of its other detectors. A caller under this profile may
        not filter, sort or search on them (the policy refuses such requests)."""
        cached = getattr(self, "_hidden", None)
        if cached is not None:
            return cached
        out: dict[str, str] = {}
        for name in self.fields:
            out.setdefault(name.casefold(), name)
        for path, _ in self._paths:
            name = _path_property(path)
            if name is not None:
                at = path.text.casefold().find(name)
                out.setdefault(name, path.text[at:at + len(name)] if at >= 0 else name)
        for detector in self.detectors:
            names = GRAPH_SECRET_FIELDS if detector is Detector.GRAPH_SECRET else DETECTED_PROPERTIES.get(detector, ())
            for name in names:
                out.setdefault(name.casefold(), name)
        self._hidden = MappingProxyType(out)
        return self._hidden

    def property_style(self, name: str) -> Style | None:
        """How this profile masks a property asked for by its own path (``/users/{id}/mobilePhone``):
        the style of the field of that name, or of a path that ends on that name, the strongest."""
        folded = name.casefold()
        style = self._names.get(folded)
        for path, path_style in self._paths:
            if _path_property(path) == folded:
                style = _strongest(style, path_style)
        return style

    def scan_text_as(self, text: str, member: str) -> tuple[str, int]:
        """A value held under ``member`` (a header's name): identifiers skip the entropy check."""
        return self._scanner.scan(text, member) if self._scanner is not None else (text, 0)

    def replace(self, value: object, style: Style, depth: int = 1,
                collect: dict[str, str] | None = None) -> object:
        """The masked form of a value matched by a field or path, of the same JSON type, so that
        typed clients (msgraph-sdk's models) still read the answer: a string becomes a string
        without the original, a list a list of masked items, an object the same keys with masked
        values; ``null`` stays ``null`` and a number or a boolean becomes ``null`` (no string
        could stand in for it, and ``0`` or ``false`` would be a lie a client might act on)."""
        if isinstance(value, str):
            if style is Style.PARTIAL:
                masked = partial(value)
            elif style is Style.PSEUDONYM:
                assert self.pseudonym_key is not None
                key = value.casefold() if _EMAIL_FULL.fullmatch(value) else value
                masked = self.pseudonym_key.pseudonym(key)
            else:
                masked = MASK
            if collect is not None and len(value) >= MIN_REPEATED_LENGTH:
                collect[value] = masked
            return masked
        if depth > MAX_DEPTH:
            raise MaskingError(f"document nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, list):
            return [self.replace(v, style, depth + 1, collect) for v in value]
        if isinstance(value, dict):
            return {k: self.replace(v, style, depth + 1, collect) for k, v in value.items()}
        return None


def _path_property(path: JSONPath) -> str | None:
    """The entity property a path masks (all of it or a part): its first name, past a collection's
    ``value[*]``; ``$.value[*].identities[*].issuerAssignedId`` -> ``identities``,
    ``$..passwordCredentials[*].displayName`` -> ``passwordcredentials``, ``$..mobilePhone`` ->
    ``mobilephone``. Case-folded; ``None`` for a path that names none."""
    steps = path.steps
    if len(steps) > 2 and steps[0].kind == _CHILD and steps[0].name == "value" and steps[1].kind in (_ANY, _INDEX):
        steps = steps[2:]
    first = steps[0] if steps else None
    return first.name if first is not None and first.kind in (_CHILD, _DESCENDANT) else None


def _as_path(name: str) -> str:
    return name if name.startswith("$") else "$.." + name.lstrip(".").replace("[]", "[*]")


def combine(profiles: Iterable[MaskProfile], name: str = "combined") -> MaskProfile:
    """One profile doing what each of ``profiles`` does, the strongest style winning. Built once
    per set of profiles (a batch's members beside ``responses`` need one per response)."""
    profiles = tuple(profiles)
    if len(profiles) == 1:
        return profiles[0]
    return _combine(profiles, name)


@lru_cache(maxsize=64)
def _combine(profiles: tuple[MaskProfile, ...], name: str) -> MaskProfile:
    fields: dict[str, Style] = {}
    paths: dict[str, Style] = {}
    detectors: dict[Detector, Style] = {}
    for p in profiles:
        for target, source in ((fields, p.fields), (paths, p.paths), (detectors, p.detectors)):
            for k, style in source.items():
                target[k] = _strongest(target.get(k), style)
    binary = BinaryBodies.REFUSE if any(p.refuses_binary for p in profiles) else BinaryBodies.PASS
    key = next((p.pseudonym_key for p in profiles if p.pseudonym_key is not None), None)
    return MaskProfile(name, fields, paths=paths, detectors=detectors, binary=binary, pseudonym_key=key)


@lru_cache(maxsize=64)
def _fields_profile(names: frozenset[str]) -> MaskProfile:
    return MaskProfile("fields", names)


def as_profile(spec: MaskProfile | Mapping[str, Style | str] | Iterable[str]) -> MaskProfile:
    """A profile as given, or a redact-only profile of member names (the older form)."""
    if isinstance(spec, MaskProfile):
        return spec
    if isinstance(spec, Mapping):
        return MaskProfile("fields", spec)
    return _fields_profile(frozenset(spec))


# --- the walk -------------------------------------------------------------------------------------


def mask_document(
    doc: object, profile: MaskProfile | Iterable[str], *, max_depth: int = MAX_DEPTH,
    collect: dict[str, str] | None = None,
) -> tuple[object, int]:
    """Mask a parsed JSON document **in place**; return it and how many values were masked.

    The document is changed, not copied: pass a freshly parsed one (or a copy). The returned
    value is the document itself, except when its root is a string that a detector changed.
    ``collect`` receives each string a field or path masked, with its masked form, so that the
    same value can be masked where else the answer repeats it (its headers).
    """
    profile = as_profile(profile)
    scanner = profile._scanner
    if isinstance(doc, str):
        return scanner.scan(doc) if scanner is not None else (doc, 0)
    if not isinstance(doc, (dict, list)):
        return doc, 0
    names = profile._names
    paths = profile._paths
    # The same members and path states recur in every object of a collection: remember them.
    folds: dict[str, str] = {}
    steps: dict[tuple, tuple[tuple, Style | None]] = {}
    count = 0
    # (container, depth, active path states, the member name holding a list)
    stack: list[tuple[dict | list, int, tuple, str]] = [(doc, 1, profile._root_states, "")]
    while stack:
        node, depth, states, holder = stack.pop()
        if depth > max_depth:
            raise MaskingError(f"document nested deeper than {max_depth} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                folded = folds.get(key)
                if folded is None:
                    folded = folds[key] = key.casefold()
                style = names.get(folded)
                child_states: tuple = ()
                if states:
                    memo = (states, folded)
                    step = steps.get(memo)
                    if step is None:
                        step = steps[memo] = _advance(paths, states, folded, None)
                    child_states, path_style = step
                    if path_style is not None:
                        style = _strongest(style, path_style)
                if style is not None:
                    node[key] = profile.replace(value, style, depth, collect)
                    count += 1
                elif isinstance(value, str):
                    if scanner is not None and not _is_annotation(folded):
                        masked, n = scanner.scan(value, key)
                        if n:
                            node[key] = masked
                            count += n
                elif isinstance(value, (dict, list)):
                    stack.append((value, depth + 1, child_states, key))
        else:
            annotation = _is_annotation(holder.casefold())
            child_states = ()
            for index, value in enumerate(node):
                if states:
                    memo = (states, index if profile._indexed else None)
                    step = steps.get(memo)
                    if step is None:
                        step = steps[memo] = _advance(paths, states, None, index)
                    child_states, path_style = step
                    if path_style is not None:
                        node[index] = profile.replace(value, path_style, depth, collect)
                        count += 1
                        continue
                if isinstance(value, str):
                    if scanner is not None and not annotation:
                        masked, n = scanner.scan(value, holder)
                        if n:
                            node[index] = masked
                            count += n
                elif isinstance(value, (dict, list)):
                    stack.append((value, depth + 1, child_states, holder))
    return doc, count


def _advance(paths: tuple, states: tuple, folded: str | None, index: int | None) -> tuple[tuple, Style | None]:
    """The path states of a child (a member ``folded`` or element ``index``), and the style of
    the strongest path that ends on it."""
    out: list[tuple[int, int]] = []
    style: Style | None = None
    for p, s in states:
        path, path_style = paths[p]
        step = path.steps[s]
        kind = step.kind
        if kind == _DESCENDANT:
            out.append((p, s))  # still looking further down
            hit = folded is not None and folded == step.name
        elif kind == _CHILD:
            hit = folded is not None and folded == step.name
        elif kind == _ANY:
            hit = True
        else:
            hit = index is not None and index == step.index
        if hit:
            if s + 1 == len(path.steps):
                style = _strongest(style, path_style)
            else:
                out.append((p, s + 1))
    return (tuple(dict.fromkeys(out)) if len(out) > 1 else tuple(out)), style


# --- bodies ---------------------------------------------------------------------------------------


def _refuse_constant(name: str) -> object:
    # Python's json accepts NaN and Infinity; they are not JSON, so the body is not what it claims.
    raise MaskingError(f"not valid JSON: {name} is not a JSON value")


_UTF8 = frozenset({"utf-8", "utf8"})
# Made once: json.loads and json.dumps build a new decoder or encoder on every call given options.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def parse_json(data: bytes, *, max_depth: int = MAX_DEPTH, charset: str | None = None) -> object:
    """Parse a JSON body strictly, or raise :class:`MaskingError`. ``charset`` is the declared
    one (none, or UTF-8: the bytes are read as JSON reads them, UTF-8/16/32 by their pattern)."""
    try:
        if charset and charset not in _UTF8:
            try:
                text = data.decode(charset)
            except LookupError as e:
                raise MaskingError(f"unknown charset {charset!r}") from e
            except UnicodeDecodeError as e:
                raise MaskingError(f"not valid {charset} text at byte {e.start}") from e
            return _DECODER.decode(text.removeprefix("\ufeff"))
        # As json.loads reads bytes: UTF-8, -16 or -32 by their pattern, a UTF-8 BOM skipped.
        return _DECODER.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
    except MaskingError:
        raise
    except RecursionError as e:
        raise MaskingError(f"document nested deeper than {max_depth} levels") from e
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise MaskingError(f"not valid JSON: {e}") from e


def dump_json(doc: object, charset: str | None = None) -> bytes:
    """Compact, in ``charset`` (UTF-8 when none is named); a character the charset cannot hold,
    and a lone surrogate escape ("\\ud800") that UTF-8 cannot hold, stay escaped.

    A number beyond a float's range (``1e400``) parses to infinity, which is not JSON: such a
    document is refused (:class:`MaskingError`) rather than written as something else."""
    encoding = charset or "utf-8"
    try:
        text = _ENCODER.encode(doc)
    except ValueError as e:
        raise MaskingError(f"not valid JSON: a number is out of range ({e})") from e
    try:
        return text.encode(encoding)
    except UnicodeEncodeError:
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode(encoding)
    except LookupError as e:
        raise MaskingError(f"unknown charset {charset!r}") from e


def mask_json_bytes(
    data: bytes, profile: MaskProfile | Iterable[str], *, max_depth: int = MAX_DEPTH,
    charset: str | None = None, collect: dict[str, str] | None = None,
) -> tuple[bytes, int]:
    """Parse a JSON body once, mask it in place, serialise it once (compact, in its declared
    ``charset``; UTF-8 when none is named).

    Duplicate keys are legal JSON and the parser keeps the last one. An attacker cannot hide a
    second copy of a field that way: masking runs on the parsed document and the body is always
    re-serialised from it, so what leaves is exactly what was masked, with one copy of each key.
    An empty body is not JSON either: the caller handles bodiless responses (204, HEAD) before.
    """
    doc = parse_json(data, max_depth=max_depth, charset=charset)
    masked, count = mask_document(doc, profile, max_depth=max_depth, collect=collect)
    return dump_json(masked, charset), count


class BodyKind(StrEnum):
    JSON = "json"
    FORM = "form"
    TEXT = "text"
    BINARY = "binary"
    UNTYPED = "untyped"  # no Content-Type: decided by looking at the bytes


_TEXT_APPLICATION_TYPES = frozenset({
    "xml", "javascript", "ecmascript", "x-javascript", "yaml", "x-yaml", "csv", "x-ndjson",
    "graphql", "sql", "xhtml+xml", "x-sh",
})


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def charset_of(content_type: str) -> str | None:
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower() or None
    return None


def is_json_content_type(content_type: str) -> bool:
    """``application/json``, ``application/*+json`` and ``text/json``, with any parameters
    (Graph sends ``application/json;odata.metadata=minimal;odata.streaming=true``)."""
    media = media_type(content_type)
    if media in ("application/json", "text/json"):
        return True
    type_, _, subtype = media.partition("/")
    return type_ == "application" and subtype.endswith("+json") and len(subtype) > len("+json")


def body_kind(content_type: str) -> BodyKind:
    """What a body is, by its declared type alone."""
    media = media_type(content_type)
    if not media:
        return BodyKind.UNTYPED
    if is_json_content_type(content_type):
        return BodyKind.JSON
    if media == "application/x-www-form-urlencoded":
        return BodyKind.FORM
    type_, _, subtype = media.partition("/")
    if type_ == "text" or subtype.endswith("+xml") or (type_ == "application" and subtype in _TEXT_APPLICATION_TYPES):
        return BodyKind.TEXT
    return BodyKind.BINARY


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def sniff(data: bytes) -> BodyKind:
    """An untyped body: JSON if it starts like a JSON document (it must then parse as one: a
    body that looks like JSON is never let through as text), text if it is UTF-8 without control
    characters, binary otherwise."""
    if data.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] in (b"{", b"["):
        return BodyKind.JSON
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return BodyKind.BINARY
    return BodyKind.BINARY if _CONTROL.search(text) else BodyKind.TEXT


def _decode_text(data: bytes, content_type: str) -> tuple[str, str]:
    charset = charset_of(content_type) or "utf-8"
    try:
        return data.decode(charset), charset
    except LookupError as e:
        raise MaskingError(f"unknown charset {charset!r}") from e
    except UnicodeDecodeError as e:
        raise MaskingError(f"not valid {charset} text at byte {e.start}") from e


def mask_text_bytes(data: bytes, content_type: str, profile: MaskProfile) -> tuple[bytes, int]:
    """A text body scanned by the profile's detectors and masked in place, in its own charset."""
    text, charset = _decode_text(data, content_type)
    masked, count = profile.scan_text(text)
    if not count:
        return data, 0
    try:
        return masked.encode(charset), count
    except UnicodeEncodeError:  # pragma: no cover - every replacement is ASCII
        raise MaskingError(f"the masked text cannot be written in {charset}") from None


def mask_form_bytes(data: bytes, content_type: str, profile: MaskProfile) -> tuple[bytes, int]:
    """A form body: each value masked by its parameter's name (fields) and the detectors."""
    text, charset = _decode_text(data, content_type)
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), encoding=charset,
                          errors="strict", max_num_fields=10_000)
    except (ValueError, UnicodeDecodeError) as e:
        raise MaskingError(f"not a valid form body: {e}") from e
    count = 0
    out = []
    for name, value in pairs:
        style = profile._names.get(name.casefold())
        if style is not None:
            value = str(profile.replace(value, style))
            count += 1
        else:
            value, n = profile.scan_text(value)
            count += n
        out.append((name, value))
    if not count:
        return data, 0
    return urlencode(out, encoding=charset).encode(charset), count


# The first character of a JSON document (objects, arrays, strings, numbers, true/false/null).
_JSON_START = frozenset(b'{["-0123456789tfn')


def looks_like_json(data: bytes, charset: str | None = None) -> bool:
    """Whether a body starts like a JSON document (after a BOM and whitespace), whatever its
    label: such a body is tried as JSON first."""
    if charset and charset not in _UTF8:
        try:
            head = data[:64].decode(charset, errors="ignore")
        except LookupError:
            return False
        head = head.removeprefix("\ufeff").lstrip(" \t\r\n")
        return bool(head) and ord(head[0]) < 128 and ord(head[0]) in _JSON_START
    if b"\x00" in data[:4]:
        return True  # UTF-16 or UTF-32, which JSON's own reader recognises by this pattern
    head = data[:4096].removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    return bool(head) and head[0] in _JSON_START


def check_content_type(values: list[str]) -> str:
    """The one Content-Type of an answer; :class:`MaskingError` when it has several headers or
    one that names several types, since client and gateway could then read the body differently."""
    if len(values) > 1:
        raise MaskingError(f"the answer has {len(values)} Content-Type headers ({', '.join(map(repr, values))}); "
                           "a body with more than one declared type is not passed on")
    content_type = values[0] if values else ""
    quoted = False
    for c in content_type:
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            raise MaskingError(f"the answer's Content-Type {content_type!r} names more than one type")
    return content_type


def property_of(path: str) -> tuple[str, bool] | None:
    """The property a canonical request path asks for by its own path, and whether it asks for
    its raw value: ``/v1.0/users/x/mobilephone`` -> ``("mobilephone", False)``,
    ``.../mobilephone/$value`` -> ``("mobilephone", True)``; ``None`` for a path of one segment
    after its version (an entity set) or ending in another ``$`` segment."""
    segments = [s for s in path.split("/") if s]
    if segments and segments[0].casefold() in ("v1.0", "beta"):
        segments = segments[1:]
    raw = bool(segments) and segments[-1].casefold() == "$value"
    if raw:
        segments = segments[:-1]
    if len(segments) < 2 or segments[-1].startswith("$"):
        return None
    return segments[-1], raw


def mask_property_document(doc: object, profile: MaskProfile, style: Style,
                           collect: dict[str, str] | None = None) -> tuple[object, int]:
    """The answer to a property path whose property the profile hides: ``{"value": ...}`` (or a
    complex property's own members) masked whole, keeping JSON types; OData's annotations stay."""
    if not isinstance(doc, dict):
        return profile.replace(doc, style, 1, collect), 1
    count = 0
    for key, value in doc.items():
        if _is_annotation(key.casefold()):
            continue
        doc[key] = profile.replace(value, style, 1, collect)
        count += 1
    return doc, count


def _mask_property_body(data: bytes, content_type: str, profile: MaskProfile, style: Style, raw: bool,
                        collect: dict[str, str] | None) -> tuple[bytes, int]:
    if raw:  # .../$value: the body is the value itself, as text
        text, charset = _decode_text(data, content_type)
        masked = profile.replace(text, style, 1, collect)
        assert isinstance(masked, str)
        try:
            return masked.encode(charset), 1
        except UnicodeEncodeError:  # pragma: no cover - every replacement is ASCII
            raise MaskingError(f"the masked value cannot be written in {charset}") from None
    charset = charset_of(content_type)
    doc, count = mask_property_document(parse_json(data, charset=charset), profile, style, collect)
    return dump_json(doc, charset), count


def mask_body(data: bytes, content_type: str, profile: MaskProfile, *,
              collect: dict[str, str] | None = None, path: str | None = None) -> tuple[bytes, int]:
    """Mask a decoded body by what it is, not by its label; the same bytes object comes back
    when nothing was changed. Raises :class:`MaskingError` to refuse it.

    A body that starts like JSON and parses as JSON is masked as JSON whatever its type says
    (``text/plain``, ``application/octet-stream``, ``application/x-json``, none), in its declared
    charset; one declared JSON (or untyped and starting with ``{``/``[``) must parse. Otherwise
    forms are masked by parameter name and detectors, text by the detectors; a body the profile
    cannot read (binary, or text under a profile without detectors) is refused unless the
    profile says ``binary: pass``.

    ``path`` is the request's canonical path: the answer to a property path
    (``/users/{id}/mobilePhone``, answered ``{"value": ...}``, or ``.../$value``, answered as raw
    text) is masked by the property's name, as that property is masked inside its object."""
    if path:
        asked = property_of(path)
        style = profile.property_style(asked[0]) if asked else None
        if asked and style is not None:
            return _mask_property_body(data, content_type, profile, style, asked[1], collect)
    kind = body_kind(content_type)
    charset = charset_of(content_type)
    if kind is BodyKind.JSON or looks_like_json(data, charset):
        try:
            return mask_json_bytes(data, profile, charset=charset, collect=collect)
        except MaskingError:
            if kind is BodyKind.JSON or (kind is BodyKind.UNTYPED and sniff(data) is BodyKind.JSON):
                raise
            # Not JSON after all (text that starts with a digit or a bracket): read as its type.
    if kind is BodyKind.UNTYPED:
        kind = sniff(data)
    if kind is BodyKind.FORM:
        return mask_form_bytes(data, content_type, profile)
    if kind is BodyKind.TEXT and profile.scans_text:
        return mask_text_bytes(data, content_type, profile)
    if profile.refuses_binary:
        if kind is BodyKind.TEXT:
            raise MaskingError(f"a {media_type(content_type) or 'text'} body cannot be read by mask profile "
                               f"{profile.name!r}, which has no detectors (set binary: pass on the profile to "
                               "let such bodies through)")
        raise MaskingError(f"a {media_type(content_type) or 'binary'} body cannot be scanned by mask profile "
                           f"{profile.name!r} (set binary: pass on the profile to let such bodies through)")
    return data, 0


# --- headers --------------------------------------------------------------------------------------

# Headers that frame the body: never rewritten (the body would no longer be what they say), so an
# answer that would need it is refused instead.
FRAMING_HEADERS = frozenset({"content-type", "content-length", "content-encoding", "transfer-encoding"})


def mask_headers(headers: Iterable[tuple[str, str]], profile: MaskProfile,
                 masked: Mapping[str, str] | None = None) -> tuple[list[tuple[str, str]], int]:
    """Response headers with the profile's detectors applied and every value the body masked
    (``masked``: original to masked form, see :func:`mask_document`) masked wherever a header
    repeats it, in any letter case or percent-encoded. Raises :class:`MaskingError` when a
    framing header (:data:`FRAMING_HEADERS`) would have to change."""
    headers = list(headers)
    variants = _repeated_spellings(masked, [value for _, value in headers])
    out: list[tuple[str, str]] = []
    count = 0
    for name, value in headers:
        new, n = _mask_header_value(value, name, profile, variants)
        if n and name.lower() in FRAMING_HEADERS:
            raise MaskingError(f"the {name} header holds a value that mask profile {profile.name!r} hides")
        out.append((name, new))
        count += n
    return out, count


def _repeated_spellings(masked: Mapping[str, str] | None, values: list[str]) -> list[tuple[str, str]]:
    """The spellings of masked values (any letter case; percent-encoded) that occur in ``values``,
    each with its masked form, longest first. Most answers' headers repeat no masked value: one
    look at all of them together spares testing every spelling against every header."""
    if not masked:
        return []
    everything = "\n".join(values).casefold()
    percent = "%" in everything  # a percent-encoded spelling can occur only where a % does
    variants = []
    for original, replacement in masked.items():
        forms = (original, quote(original, safe=""), quote(original, safe="/@:")) if percent else (original,)
        for form in dict.fromkeys(forms):
            if (folded := form.casefold()) in everything:
                variants.append((folded, replacement))
    variants.sort(key=lambda v: -len(v[0]))
    return variants


def _mask_header_value(value: str, name: str, profile: MaskProfile,
                       variants: list[tuple[str, str]]) -> tuple[str, int]:
    count = 0
    if variants:
        folded = value.casefold()
        for original, replacement in variants:
            if original in folded:  # cheap test first; most headers repeat nothing
                value, n = re.subn(re.escape(original), lambda _m, r=replacement: r, value, flags=re.IGNORECASE)
                if not n:  # a case-folding that changes lengths (ß, ﬁ): refuse rather than miss it
                    raise MaskingError("a header repeats a masked value in a spelling that cannot be masked")
                count += n
                folded = value.casefold()
    if profile.scans_text:
        value, n = profile.scan_text_as(value, name)
        count += n
    return value, count
