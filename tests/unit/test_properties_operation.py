"""Hostile input, the URL normaliser: no two spellings of one operation get different decisions.

Each example draws one Graph operation (method, version, entity set, key, further segments, an
OData query), writes it once plainly, then again the way an attacker or an unusual client might:
letter case changed anywhere, any character but ``/`` percent-encoded (hex digits in either case),
``//``, ``./`` and ``x/../`` inserted, a trailing slash, the key as a segment or in OData
parentheses (quoted, unquoted, ``appId='...'`` named keys, spaces inside), the version in upper
case, the query option names with or without ``$``, encoded. Both spellings must reduce to the same
:class:`Operation` and get the same decision from a policy with allow, deny, approve and OData
rules. Spellings whose meaning depends on how the upstream decodes them (an encoded slash or
backslash, double encoding, a path that climbs above the root) must be refused, never decided.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nhi_gateway.policy.decision import Action
from nhi_gateway.policy.operation import Operation, OperationError
from nhi_gateway.policy.loader import parse_policy
from nhi_gateway.identity.principal import Principal

from ..support.policies import V1_ISSUER, policy_head

GRAPH = "graph.microsoft.com"
TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
READER = "5e0b1683-de22-5eac-9334-fb85a741f6ff"
STRANGER = "11111111-2222-4333-8444-555555555555"

POLICY = parse_policy(
    policy_head(TENANT, issuers=(V1_ISSUER,)) + f"""\
rules:
  - id: no-credential-minting
    action: deny
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/applications/{{id}}/addPassword", "/applications/{{id}}/addKey",
                "/servicePrincipals/{{id}}/addPassword", "/servicePrincipals/{{id}}/addKey"]
  - id: no-key-material
    action: deny
    odata: {{forbid_select: [keyCredentials]}}
    operations: [{{host: graph.microsoft.com, methods: ["*"], paths: ["/**"]}}]
  - id: no-user-deletes
    action: deny
    operations: [{{host: graph.microsoft.com, methods: [DELETE], paths: ["/users/{{id}}"]}}]
  - id: user-edits-need-a-person
    action: approve
    when: {{app_ids: [{READER}]}}
    operations: [{{host: graph.microsoft.com, methods: [PATCH], paths: ["/users/{{id}}"]}}]
    approval: {{approvers: {{users: [0f573d36-fa84-5b0a-917c-50d218f4571b]}}}}
  - id: directory-read
    action: allow
    when: {{app_ids: [{READER}]}}
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users/**", "/groups/{{id}}", "/groups/{{id}}/members/$ref", "/applications/{{id}}",
                "/servicePrincipals/**", "/directoryObjects/{{id}}/microsoft.graph.group"]
    odata: {{max_top: 999}}
  - id: beta-devices
    action: allow
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        versions: [beta]
        paths: ["/devices/**"]
  - id: membership-checks
    action: allow
    when: {{app_ids: [{READER}]}}
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/servicePrincipals/{{id}}/getMemberGroups", "/applications/{{id}}/addPassword"]
""",
    "properties.yaml",
)

PRINCIPALS = [
    Principal(tenant_id=TENANT, object_id="0b1c2d3e-0000-4000-8000-000000000042", app_id=READER),
    Principal(tenant_id=TENANT, object_id="0b1c2d3e-0000-4000-8000-000000000044", app_id=STRANGER),
]

# --- drawing an operation ------------------------------------------------------------------------

ENTITY_SETS = ["users", "groups", "applications", "servicePrincipals", "devices", "directoryObjects"]
FURTHER = ["addPassword", "addKey", "memberOf", "members", "owners", "$ref", "$count", "getMemberGroups",
           "microsoft.graph.group", "transitiveMemberOf", "appRoleAssignedTo"]
# Key characters: RFC 3986 pchars other than the ones the normaliser gives a meaning to ('/',
# '%', parentheses), plus a space, '?' and '#' (always sent encoded) and a few non-ASCII letters
# (sent raw or as UTF-8 escapes). 'ß' and the Kelvin sign fold to other letters: casefold-safe.
KEY_CHARS = string.ascii_letters + string.digits + "-._~!$&'*+,;=:@ ?#" + "éßÖ\u212a"
ALWAYS_ENCODED = set(" ?#%\"<>\\^`{|}") | {chr(c) for c in range(0x20)} | {"\x7f"}
GUID = st.uuids().map(str)


@st.composite
def keys(draw) -> str:
    key = draw(st.one_of(GUID, st.text(alphabet=KEY_CHARS, min_size=1, max_size=12),
                         st.builds(lambda u, d: f"{u}@{d}.example", st.text(string.ascii_letters, min_size=1, max_size=6),
                                   st.sampled_from(["contoso", "Fabrikam"]))))
    # A key '.' or '..' is a path step in one spelling and refused in the other: those spellings
    # do not name one operation (both refusals are tested).
    if key in (".", ".."):
        key = "k" + key
    return key


@st.composite
def operations(draw) -> dict:
    entity = draw(st.sampled_from(ENTITY_SETS))
    named = entity in ("applications", "servicePrincipals") and draw(st.booleans())
    key = draw(GUID) if named else draw(keys())
    return {
        "method": draw(st.sampled_from(["GET", "POST", "PATCH", "DELETE"])),
        "version": draw(st.sampled_from(["v1.0", "beta"])),
        "entity": entity,
        "key": draw(st.one_of(st.none(), st.just(key))),
        "named": named,  # applications(appId='...'): a named key
        "further": draw(st.lists(st.sampled_from(FURTHER), max_size=2)),
        "query": draw(st.sampled_from(list(QUERY_CLASSES))),
    }


# Each class: spellings of one OData query (option names with or without '$', in any case,
# percent-encoded; property names in any case). The first is the plain one.
QUERY_CLASSES = {
    "none": [""],
    "top5": ["$top=5", "top=5", "%24top=5", "$TOP=5", "$t%6Fp=%35"],
    "top5000": ["$top=5000", "TOP=5000", "%24Top=5000"],
    "select-keys": ["$select=keyCredentials", "select=KeyCredentials", "%24select=%6BeyCredentials",
                    "$SELECT=KEYCREDENTIALS", "$select=%20keyCredentials%20"],
    "select-id": ["$select=id,displayName", "select=ID,DisplayName", "%24select=id%2CdisplayName"],
    "expand-keys": ["$expand=owners($select=keyCredentials)", "expand=Owners(select=KeyCredentials)",
                    "%24expand=owners(%24select%3DkeyCredentials)"],
    "select-all": ["$select=*", "select=%2A"],
}


def plain(o: dict) -> str:
    """The operation written the ordinary way: key as a segment, unreserved characters raw."""
    segments = [o["version"], o["entity"]]
    if o["key"] is not None:
        segments.append(f"appId={o['key']}" if o["named"] else o["key"])
    segments += o["further"]
    path = "/" + "/".join(encode(s) for s in segments)
    query = QUERY_CLASSES[o["query"]][0]
    return path + (f"?{query}" if query else "")


# --- spelling it differently ---------------------------------------------------------------------


def encode(segment: str, picks=None) -> str:
    """Percent-encode, as UTF-8, the characters that must be and those ``picks`` says to
    (``"upper"``/``"lower"``: the hex digits' case; ``None``: leave it raw)."""
    picks = picks or [None] * len(segment)
    out = []
    for c, pick in zip(segment, picks, strict=True):
        if pick is None and c not in ALWAYS_ENCODED:
            out.append(c)
        else:
            fmt = "%{:02x}" if pick == "lower" else "%{:02X}"
            out.append("".join(fmt.format(b) for b in c.encode()))
    return "".join(out)


def flip_case(draw, text: str) -> str:
    mask = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.swapcase() if m else c for c, m in zip(text, mask, strict=True))


def key_spellings(o: dict) -> list[str]:
    """The segment(s) naming ``entity`` and ``key``, every way OData allows."""
    entity, key = o["entity"], o["key"]
    if o["named"]:
        return [f"{entity}/appId={key}", f"{entity}(appId='{key}')", f"{entity}(appId={key})",
                f"{entity}( appId = '{key}' )", f"{entity}(APPID='{key}')"]
    quoted = key.replace("'", "''")
    out = [f"{entity}/{key}", f"{entity}('{quoted}')", f"{entity}( '{quoted}' )"]
    if not set(key) & set(",'()= ") and key not in (".", ".."):
        out.append(f"{entity}({key})")
    return out


@st.composite
def spellings(draw, o: dict) -> str:
    version = flip_case(draw, o["version"])
    if o["key"] is None:
        head = [o["entity"]]
    else:
        head = draw(st.sampled_from(key_spellings(o))).split("/")
    segments = [version, *head, *o["further"]]
    segments = [flip_case(draw, s) for s in segments]
    # Percent-encode a random choice of characters; '/' never (that is a different path).
    encoded = []
    for s in segments:
        picks = draw(st.lists(st.sampled_from([None, None, "upper", "lower"]), min_size=len(s), max_size=len(s)))
        encoded.append(encode(s, picks))
    # Path noise that resolves away: empty segments, '.', 'x/..'.
    noisy: list[str] = []
    for s in encoded:
        for _ in range(draw(st.integers(0, 2))):
            noisy += draw(st.sampled_from([[""], ["."], ["%2e"], ["x", ".."], ["groups('y')", "%2E%2e"], ["", "."]]))
        noisy.append(s)
    path = "/" + "/".join(noisy)
    if draw(st.booleans()):
        path += "/"
    if draw(st.booleans()):
        path = "/" + path  # '//v1.0/...'
    query = draw(st.sampled_from(QUERY_CLASSES[o["query"]]))
    target = path + (f"?{query}" if query else "")
    if draw(st.integers(0, 5)) == 0:
        host = draw(st.sampled_from(["graph.microsoft.com", "GRAPH.Microsoft.com", "graph.microsoft.com."]))
        target = f"https://{host}{target}"
    return target


def operation(target: str, method: str, host: str = GRAPH) -> Operation:
    return Operation.from_request(method, "https", host, 443, target)


def identity(o: Operation) -> tuple:
    return (o.method, o.host, o.port, o.version, o.path)


def verdicts(o: Operation) -> list[tuple]:
    return [(d.action, d.rule_id, d.status, d.check) for d in (POLICY.decide(p, o) for p in PRINCIPALS)]


# --- the properties ------------------------------------------------------------------------------


@settings(max_examples=600)
@given(st.data())
def test_every_spelling_of_an_operation_gets_the_same_decision(data):
    o = data.draw(operations(), label="operation")
    canonical = operation(plain(o), o["method"])
    variant_target = data.draw(spellings(o), label="spelling")
    variant = operation(variant_target, o["method"].lower() if data.draw(st.booleans()) else o["method"])
    assert identity(variant) == identity(canonical), variant_target
    assert variant.odata == canonical.odata, variant_target
    assert verdicts(variant) == verdicts(canonical), variant_target


@settings(max_examples=200)
@given(st.data())
def test_odata_spellings_break_the_same_limits(data):
    """Query option spellings: names with or without '$', in any case, encoded; property names in
    any case. The parsed selects/expands/tops (case-folded) are identical, so every limit agrees."""
    o = data.draw(operations(), label="operation")
    spellings_ = QUERY_CLASSES[o["query"]]
    base = operation(plain(o), o["method"])
    for q in spellings_[1:]:
        other = operation(plain(o).partition("?")[0] + f"?{q}", o["method"])
        a, b = base.odata, other.odata
        assert (a.selects, a.expands, a.problem) == (b.selects, b.expands, b.problem), q
        assert [t.strip() for t in a.tops] == [t.strip() for t in b.tops], q
        assert verdicts(other) == verdicts(base), q


def test_the_policy_tells_the_spellings_apart():
    """The policy of these properties is not trivial: it allows, denies, approves and limits."""
    seen = set()
    for target, method in [("/v1.0/users", "GET"), ("/v1.0/users/a", "DELETE"), ("/v1.0/users/a", "PATCH"),
                           ("/v1.0/applications/a/addPassword", "POST"), ("/v1.0/users?$select=keyCredentials", "GET"),
                           ("/v1.0/users?$top=5000", "GET"), ("/beta/devices/d", "GET"), ("/v1.0/devices/d", "GET")]:
        seen.update(a for a, *_ in verdicts(operation(target, method)))
    assert seen == {Action.ALLOW, Action.DENY, Action.APPROVE}


# --- spellings that must be refused --------------------------------------------------------------

AMBIGUOUS = ["%2F", "%2f", "%5C", "%5c", "\\", "%00", "%252F", "%255C", "%252e%252e"]


@settings(max_examples=300)
@given(st.data())
def test_encoded_separators_and_double_encoding_are_refused(data):
    """An encoded slash or backslash, NUL or a double encoding anywhere in the path: the upstream
    may decode it into a separator the gateway never judged, so it is refused, never decided."""
    o = data.draw(operations(), label="operation")
    target = data.draw(spellings(o), label="spelling")
    head, sep, query = target.partition("?")
    cut = data.draw(st.integers(1, len(head)), label="at")
    bad = data.draw(st.sampled_from(AMBIGUOUS), label="inserted")
    if data.draw(st.booleans()) and "/" in head[cut:]:
        # replace a real separator: /users%2Fx instead of /users/x
        i = head.index("/", cut)
        head = head[:i] + bad + head[i + 1 :]
    else:
        head = head[:cut] + bad + head[cut:]
    with pytest.raises(OperationError):
        operation(head + sep + query, o["method"])


@settings(max_examples=300)
@given(st.data())
def test_paths_climbing_above_the_root_are_refused(data):
    """More '..' than segments before them, however spelled: refused, never resolved to '/'."""
    o = data.draw(operations(), label="operation")
    target = data.draw(spellings(o), label="spelling")
    if target.startswith("https://"):
        target = "/" + target.split("/", 3)[3]
    path, sep, query = target.partition("?")
    depth = len([s for s in path.split("/") if s])
    dots = data.draw(st.lists(st.sampled_from(["..", "%2e%2e", "%2E.", ".%2E"]), min_size=depth + 1,
                              max_size=depth + 3), label="dots")
    where = data.draw(st.sampled_from(["end", "start"]), label="where")
    climbed = path.rstrip("/") + "/" + "/".join(dots) if where == "end" else "/" + "/".join(dots) + path
    with pytest.raises(OperationError):
        operation(climbed + sep + query, o["method"])
