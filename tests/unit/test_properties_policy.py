"""Hostile input, the policy loader: no YAML crashes it, and every error it gives is a clear one.

"Clear" means: a :class:`PolicyError` that says where (``file:line:column``, a line that exists
in the text, column 1 or more; line 0 only when the file could not be read at all) and what,
and never the loader's last-resort "this is a bug" wrapper, which would mean some input reached
code that raised something the loader did not expect. A policy that does load must be usable:
deciding requests and linting it never raises.

Inputs: random text made of YAML's syntax characters; random YAML documents (any shape, and
shapes with the policy's own keys); structural mutations of ``policies/example.yaml`` (a value
anywhere replaced by one of another type, a key removed or added, a list item repeated, a string
edited); textual mutations of it (pieces inserted, deleted, replaced, including tabs, anchors,
aliases, tags, document markers, NUL, a BOM, lone surrogates); random bytes through
``load_policy``.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from nhi_gateway.policy.operation import Operation
from nhi_gateway.policy.lint import policy_warnings
from nhi_gateway.policy.loader import PolicyError, load_policy, parse_policy
from nhi_gateway.policy.model import Policy
from nhi_gateway.identity.principal import AuthMethod, Principal, TokenSource

from ..support.documents import places, text_mutations

POLICIES = Path(__file__).resolve().parents[2] / "policies"
EXAMPLE = (POLICIES / "example.yaml").read_text()
TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
READER = "5e0b1683-de22-5eac-9334-fb85a741f6ff"
SOURCE = "fuzz.yaml"

PRINCIPALS = [
    None,
    Principal(tenant_id=TENANT, object_id="0b1c2d3e-0000-4000-8000-000000000042", app_id=READER,
              auth_method=AuthMethod.CERTIFICATE, token_sources=(TokenSource.PROXY,),
              groups=("3c9d1f7a-2b4e-4f6a-8c0d-1e2f3a4b5c6d",), roles=("User.Read.All",)),
]
REQUESTS = [
    ("GET", "graph.microsoft.com", "/v1.0/users?$top=5"),
    ("POST", "graph.microsoft.com", "/v1.0/applications/x/addPassword"),
    ("GET", "graph.microsoft.com", "/beta/applications?$select=keyCredentials"),
    ("PATCH", "graph.microsoft.com", "/v1.0/users/a"),
    ("POST", "login.microsoftonline.com", f"/{TENANT}/oauth2/v2.0/token"),
    ("GET", "graph.microsoft.com", "/v1.0/devices/d/owners"),
]


def check(text, source: str = SOURCE) -> Policy | None:
    """Parse ``text``; assert the outcome is a usable policy or a clear error."""
    try:
        policy = parse_policy(text, source)
    except PolicyError as e:
        assert_clear(e, text, source)
        return None
    assert isinstance(policy, Policy)
    for method, host, target in REQUESTS:
        op = Operation.from_request(method, "https", host, 443, target)
        for who in PRINCIPALS:
            policy.decide(who, op)
            policy.explain(who, op)
    policy_warnings(policy)
    return policy


def assert_clear(e: PolicyError, text, source: str = SOURCE) -> None:
    assert "this is a bug" not in e.hint, f"the loader crashed inside: {e}"
    assert e.message and not e.message.startswith("could not read the policy ("), str(e)
    assert e.line >= 1 and e.column >= 1, str(e)
    if isinstance(text, str):
        assert e.line <= text.count("\n") + 2, f"line {e.line} is past the end of the text: {e}"
    assert str(e).startswith(f"{source}:{e.line}:{e.column}: "), str(e)


# --- random text ---------------------------------------------------------------------------------

YAML_CHARS = "abcxyz019 \n\t-:[]{},#&*!|>'\"%@`?=.~/\\\x00\ufeff\u2028\u00e9"


@settings(max_examples=300)
@given(st.text(alphabet=YAML_CHARS, max_size=200))
def test_random_text_is_a_policy_or_a_clear_error(text):
    check(text)


@settings(max_examples=100)
@given(st.binary(max_size=200))
def test_random_bytes_from_a_file_are_a_clear_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("p") / "policy.yaml"
    path.write_bytes(data)
    try:
        load_policy(path)
    except PolicyError as e:
        assert "this is a bug" not in e.hint, str(e)
        assert e.line >= 1 and e.column >= 1, str(e)  # the file was read: the error has a place
    else:  # pragma: no cover - a policy needs version, identity and upstreams
        raise AssertionError("random bytes loaded as a policy")


def test_an_unreadable_file_is_a_file_level_error(tmp_path):
    e = _error(lambda: load_policy(tmp_path / "missing.yaml"))
    assert (e.line, e.column) == (0, 0) and str(e).startswith(f"{tmp_path / 'missing.yaml'}: cannot read")
    e = _error(lambda: load_policy(tmp_path))  # a directory
    assert (e.line, e.column) == (0, 0)


def _error(fn) -> PolicyError:
    try:
        fn()
    except PolicyError as e:
        return e
    raise AssertionError("no PolicyError")


# --- random YAML documents -----------------------------------------------------------------------

POLICY_WORDS = ["version", "identity", "upstreams", "masking", "rules", "approvals", "tenants", "audiences",
                "issuers", "bearer", "proxy", "graph_token", "host", "token", "id", "action", "when", "operations", "methods", "paths", "odata",
                "schedule", "approval", "mask", "fields", "profiles", "default_profile", "app_ids", "groups",
                "versions", "max_top", "forbid_select", "days", "hours", "timezone", "valid_from", "approvers",
                "users", "timeout", "max_grant", "anonymous", "leeway_seconds", "client_secret_grants", "webhook",
                "paths", "detectors", "binary", "pseudonym_key_env"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(POLICY_WORDS),
    st.sampled_from([TENANT, READER, "graph.microsoft.com", "login.microsoftonline.com", "/**", "/users/{id}",
                     "*", "GET", "allow", "deny", "approve", "v1.0", "beta", "any", "none", "mon-fri",
                     "08:00-18:00", "24:00-00:00", "Europe/Berlin", "Mars/Olympus", "5m", "0s", "99999d",
                     "2025-07-01T00:00:00Z", "https://sts.windows.net/{tenantid}/", "{tenantid}", "{", "}",
                     "https://hooks.example/x", "http://[::1", "\x85", "", " ", "1e400", "-0", "0x10",
                     "redact", "partial", "pseudonym", "email", "high_entropy", "pass", "refuse", "$..key",
                     "$.value[*].mail", "$[", "$..", "$['a", "NHI_MASK_KEY", "PATH"]),
)


def documents(keys=st.one_of(st.sampled_from(POLICY_WORDS), st.text(max_size=8))):
    return st.recursive(
        SCALARS,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
        max_leaves=25,
    )


def dump(doc) -> str:
    out = io.StringIO()
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    yaml.allow_unicode = True
    yaml.dump(doc, out)
    return out.getvalue()


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_random_yaml_documents_are_a_policy_or_a_clear_error(doc):
    check(dump(doc))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({"version": st.one_of(st.just(1), SCALARS)},
                             optional={k: documents() for k in ("identity", "upstreams", "masking", "rules",
                                                                   "approvals")}))
def test_documents_shaped_like_a_policy_are_a_policy_or_a_clear_error(doc):
    check(dump(doc))


# --- mutations of policies/example.yaml ----------------------------------------------------------


_EXAMPLE_DATA = YAML(typ="safe").load(EXAMPLE)


def _example_data():
    return copy.deepcopy(_EXAMPLE_DATA)


EXAMPLE_PLACES = [p for p, _ in places(_example_data()) if p]


def _parent(doc, path):
    node = doc
    for step in path[:-1]:
        node = node[step]
    return node


STRING_EDITS = ["", "{", "}", "*", "**", "..", "%2F", "/", "\\", "'", "\n", "\t", "\x00", " ", "é", "{tenantid}",
                "(", ")", "$", "~", ":", "#", "?", "\u212a", "\ud800"]


@st.composite
def example_mutations(draw):
    doc = _example_data()
    for _ in range(draw(st.integers(1, 3))):
        spots = [p for p, _ in places(doc) if p]
        if not spots:
            break
        path = draw(st.sampled_from(spots))
        parent, last = _parent(doc, path), path[-1]
        value = parent[last]
        kind = draw(st.sampled_from(["replace", "delete", "add-key", "repeat", "edit-string", "wrap"]))
        if kind == "replace":
            parent[last] = draw(documents())
        elif kind == "delete":
            del parent[last]
        elif kind == "add-key" and isinstance(value, dict):
            value[draw(st.one_of(st.sampled_from(POLICY_WORDS), st.text(max_size=6)))] = draw(documents())
        elif kind == "repeat" and isinstance(parent, list):
            parent.insert(last, value)  # the same item twice (a duplicate rule id, host, field ...)
        elif kind == "edit-string" and isinstance(value, str):
            i = draw(st.integers(0, len(value)))
            j = draw(st.integers(i, min(len(value), i + 4)))
            parent[last] = value[:i] + draw(st.sampled_from(STRING_EDITS)) + value[j:]
        elif kind == "wrap":
            parent[last] = draw(st.sampled_from([[value], {"x": value}, [value, value]]))
    return doc


def test_the_example_policy_loads():
    assert check(EXAMPLE) is not None
    assert check(dump(_example_data())) is not None  # the mutations start from a loadable policy


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow])
@given(example_mutations())
def test_structural_mutations_of_the_example_are_a_policy_or_a_clear_error(doc):
    try:
        text = dump(doc)
    except Exception:  # noqa: BLE001 - a lone surrogate cannot be written as YAML: not a policy text
        return
    check(text)


TEXT_PIECES = ["", " ", "  ", "\t", "\n", "\n  ", "-", "- ", ":", ": ", "[", "]", "{", "}", ",", "#", "'", '"',
               "&a ", "*a", "*a ", "<<: *a\n", "!!python/object:os.system ", "!!binary ", "!!str ", "!!int ",
               "---\n", "...\n", "%YAML 1.1\n", "? ", "|", ">", "\x00", "\ufeff", "\ud800", "\u2028", "é",
               "{tenantid}", "/**", "*", "deny", "allow", "approve", "9" * 30, "1e400", "null", "~", "yes",
               "2025-13-45", "24:00", "-1"]


def example_text_mutations() -> st.SearchStrategy[str]:
    return text_mutations(EXAMPLE, st.sampled_from(TEXT_PIECES), longest_cut=12)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(example_text_mutations())
def test_textual_mutations_of_the_example_are_a_policy_or_a_clear_error(text):
    check(text)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(example_text_mutations())
def test_mutations_as_bytes_are_a_policy_or_a_clear_error(text):
    data = text.encode("utf-8", "surrogatepass")
    try:
        parse_policy(data, SOURCE)
    except PolicyError as e:
        assert_clear(e, None)


def test_an_alias_bomb_is_refused_quickly():
    """'Billion laughs': aliases of aliases make a tiny file name billions of values. The loader
    must not walk them all (it refuses the first value of the wrong shape)."""
    lines = ["version: 1", "identity:", f"  tenants: [{TENANT}]", "  bearer:",
             "    audiences: [https://graph.microsoft.com]",
             "    issuers: ['https://sts.windows.net/{tenantid}/']", "upstreams: [{host: graph.microsoft.com}]",
             "masking:", "  profiles:", "    p:", "      fields: &a0 [mail, mail, mail, mail, mail, mail, mail, mail]"]
    for i in range(1, 10):
        lines.append(f"    p{i}: {{fields: &a{i} [" + ", ".join([f"*a{i - 1}"] * 8) + "]}")
    import time

    started = time.monotonic()
    try:
        parse_policy("\n".join(lines) + "\n", SOURCE)
    except PolicyError as e:
        assert_clear(e, "\n".join(lines))
    assert time.monotonic() - started < 10, "the loader walked the aliases"


@pytest.mark.parametrize("text", ["!!int x: 1", "version: !!int abc", "version: !!float x", "a: !!timestamp 2025-13-45",
                                  "a: !!omap 5", "a: !!bool maybe", "a: !!int 0x_"])
def test_a_value_its_tag_cannot_hold_is_a_clear_error(text):
    """Found by the mutations above: ruamel raises ValueError/KeyError/IndexError/AttributeError,
    unmarked, for a tagged value it cannot construct; the loader names the tag and its place."""
    e = _error(lambda: parse_policy(text, SOURCE))
    assert_clear(e, text)
    assert "tagged !!" in e.message and (e.line, e.column) == (1, text.index("!!") + 1)
