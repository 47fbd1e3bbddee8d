"""policies/policy.schema.json: what YAML language servers check while an author types.

It is generated from the models the loader validates with (nhi_gateway.policy.shape); these tests
keep the generated schema honest against the loader's behaviour.

The schema must accept every policy the gateway accepts (an editor that flags a good file is
worse than none) and reject the structural mistakes the loader rejects. The loader checks more
than a schema can say (hosts under upstreams, unique ids, known profiles, time zones): those
cases are listed as loader-only.
"""

from __future__ import annotations

import copy
import json
from datetime import date, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from nhi_gateway.policy.loader import PolicyError, parse_policy

from ..support.documents import places

jsonschema = pytest.importorskip("jsonschema")

POLICIES = Path(__file__).resolve().parents[2] / "policies"
SCHEMA = json.loads((POLICIES / "policy.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
APPROVER = "cccccccc-0000-4000-8000-00000000000c"


def plain(value):
    """The data a YAML language server validates: timestamps are strings there (YAML 1.2 core)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def read(path: Path):
    return plain(YAML(typ="safe").load(path.read_text()))


def schema_accepts(doc) -> bool:
    return VALIDATOR.is_valid(doc)


def loader_accepts(doc) -> bool:
    try:
        parse_policy(json.dumps(doc), "doc.json")  # JSON is YAML: the loader reads it as is
    except PolicyError:
        return False
    return True


def test_the_committed_schema_is_the_one_the_loader_models_generate(tmp_path):
    """One description of the policy's shape: the models in nhi_gateway.policy.shape validate
    policies and generate the schema. Regenerate with `nhi-gateway policy schema -o policies/policy.schema.json`."""
    from nhi_gateway.cli.main import main
    from nhi_gateway.policy.shape import schema_text

    assert (POLICIES / "policy.schema.json").read_text() == schema_text()
    assert main(["policy", "schema", "-o", str(tmp_path / "schema.json")]) == 0
    assert (tmp_path / "schema.json").read_text() == schema_text()


def test_the_schema_is_a_draft_2020_12_schema():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def _object_schemas(node, where="#"):
    if isinstance(node, dict):
        if "properties" in node:
            yield where, node
        for k, v in node.items():
            yield from _object_schemas(v, f"{where}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _object_schemas(v, f"{where}/{i}")


def test_unknown_keys_are_refused_everywhere():
    objects = [(w, n) for w, n in _object_schemas(SCHEMA) if "/if" not in w and "/then" not in w and "/else" not in w]
    assert len(objects) >= 12
    for where, node in objects:
        assert node.get("additionalProperties") is False, where


@pytest.mark.parametrize("path", sorted(POLICIES.glob("*.yaml")), ids=lambda p: p.name)
def test_the_schema_accepts_every_shipped_policy(path):
    errors = [e.message for e in VALIDATOR.iter_errors(read(path))]
    assert errors == []


# --- one table, two judges ------------------------------------------------------------------------

BASE = {
    "version": 1,
    "identity": {"tenants": [TENANT], "bearer": {"audiences": ["https://graph.microsoft.com"],
                 "issuers": ["https://login.microsoftonline.com/{tenantid}/v2.0"]}},
    "upstreams": [{"host": "graph.microsoft.com"}],
    "masking": {"profiles": {"pii": {"fields": ["mail"]}}},
    "rules": [{"id": "r", "action": "allow",
               "operations": [{"host": "graph.microsoft.com", "methods": ["GET"], "paths": ["/users"]}]}],
}


def doc_with(change) -> dict:
    doc = copy.deepcopy(BASE)
    change(doc)
    return doc


def rule(**keys):
    return lambda d: d["rules"][0].update(keys)


def operation(**keys):
    return lambda d: d["rules"][0]["operations"][0].update(keys)


def drop(*path):
    def change(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return change


APPROVAL = {"approvers": {"groups": [APPROVER]}, "timeout": "5m", "max_grant": "1h"}

AGREE = [
    # (case, accepted by both)
    ("base", lambda d: None, True),
    ("policy mode report", lambda d: d.update(mode="report"), True),
    ("policy mode enforce", lambda d: d.update(mode="enforce"), True),
    ("policy mode watch", lambda d: d.update(mode="watch"), False),
    ("deny rule mode report", rule(action="deny", mode="report"), True),
    ("allow rule mode enforce", rule(mode="enforce"), True),
    ("allow rule mode report", rule(mode="report"), False),
    ("no rules", drop("rules"), True),
    ("rules: null (all commented out)", lambda d: d.update(rules=None), True),
    ("empty upstreams", lambda d: d.update(upstreams=[], rules=[]), True),
    ("masking: null", lambda d: d.update(masking=None), True),
    ("approvals webhook", lambda d: d.update(approvals={"webhook": "https://hooks.example.test/x"}), True),
    ("approvals: null", lambda d: d.update(approvals=None), True),
    ("approvals webhook http", lambda d: d.update(approvals={"webhook": "http://hooks.example.test/x"}), False),
    ("approvals unknown key", lambda d: d.update(approvals={"hook": "https://x"}), False),
    ("version 2", lambda d: d.update(version=2), False),
    ("version '1'", lambda d: d.update(version="1"), False),
    ("version true", lambda d: d.update(version=True), False),
    ("unknown top-level key", lambda d: d.update(rule=[]), False),
    ("no identity", drop("identity"), False),
    ("identity: null", lambda d: d.update(identity=None), False),
    ("empty tenants", lambda d: d["identity"].update(tenants=[]), False),
    ("tenant not a GUID", lambda d: d["identity"].update(tenants=["contoso.com"]), False),
    ("tenant with spaces", lambda d: d["identity"].update(tenants=[f" {TENANT} "]), True),
    ("issuer mapping", lambda d: d["identity"]["bearer"].update(issuers=[{"issuer": "https://x/{tenantid}/v2.0",
                                                                 "discovery": "https://x/d"}]), True),
    ("issuer http", lambda d: d["identity"]["bearer"].update(issuers=["http://x/{tenantid}/v2.0"]), False),
    ("issuer mapping unknown key", lambda d: d["identity"]["bearer"].update(issuers=[{"issuer": "https://x", "jwks": "https://y"}]), False),
    ("old form: audiences and issuers under identity", lambda d: d["identity"].update(
        d["identity"].pop("bearer")), False),
    ("no token source", lambda d: d["identity"].pop("bearer"), False),
    ("proxy source only", lambda d: d["identity"].update(proxy={
        "audiences": ["api://nhi-gateway"], "issuers": ["https://login.microsoftonline.com/{tenantid}/v2.0"]},
        bearer=None) or d["identity"].pop("bearer"), True),
    ("both sources", lambda d: d["identity"].update(proxy={
        "audiences": ["api://nhi-gateway"], "issuers": ["https://login.microsoftonline.com/{tenantid}/v2.0"]}), True),
    ("proxy carries the Graph token", lambda d: d["identity"].update(proxy={
        "audiences": ["https://graph.microsoft.com"], "issuers": ["https://sts.windows.net/{tenantid}/"],
        "graph_token": True}), True),
    ("graph_token on bearer", lambda d: d["identity"]["bearer"].update(graph_token=True), False),
    ("graph_token not a boolean", lambda d: d["identity"].update(proxy={
        "audiences": ["https://graph.microsoft.com"], "issuers": ["https://sts.windows.net/{tenantid}/"],
        "graph_token": "yes"}), False),
    ("unknown key in a source", lambda d: d["identity"]["bearer"].update(audience=["x"]), False),
    ("leeway 301", lambda d: d["identity"].update(leeway_seconds=301), False),
    ("leeway true", lambda d: d["identity"].update(leeway_seconds=True), False),
    ("client_secret_grants refuse", lambda d: d["identity"].update(client_secret_grants="refuse"), True),
    ("client_secret_grants deny", lambda d: d["identity"].update(client_secret_grants="deny"), False),
    ("upstream token nobody", lambda d: d["upstreams"][0].update(token="nobody"), False),
    ("upstream without host", lambda d: d["upstreams"][0].pop("host"), False),
    ("profile without fields", lambda d: d["masking"]["profiles"].update(pii={}), False),
    ("profile with a bad name", lambda d: d["masking"]["profiles"].update({"my profile": {"fields": ["x"]}}), False),
    ("masking unknown key", lambda d: d["masking"].update(profile={}), False),
    ("rule without id", drop("rules", 0, "id"), False),
    ("rule id with space", rule(id="my rule"), False),
    ("action permit", rule(action="permit"), False),
    ("action approve without approval", rule(action="approve"), False),
    ("action approve with approval", rule(action="approve", approval=APPROVAL), True),
    ("approval on an allow rule", rule(approval=APPROVAL), False),
    ("approval: null on an allow rule", rule(approval=None), True),
    ("approvers empty", rule(action="approve", approval={"approvers": {}}), False),
    ("approvers not GUIDs", rule(action="approve", approval={"approvers": {"users": ["alice"]}}), False),
    ("timeout without unit", rule(action="approve", approval={**APPROVAL, "timeout": 300}), False),
    ("mask on deny", rule(action="deny", mask="pii"), False),
    ("mask on approve", rule(action="approve", approval=APPROVAL, mask="pii"), True),
    ("unknown rule key", rule(acton="allow"), False),
    ("when anonymous", rule(when={"anonymous": True}), True),
    ("when anonymous with app_ids", rule(when={"anonymous": True, "app_ids": [TENANT]}), False),
    ("when anonymous with app_ids: null", rule(when={"anonymous": True, "app_ids": None}), True),
    ("when auth_methods", rule(when={"auth_methods": ["certificate", " client_secret "]}), True),
    ("when auth_methods federated", rule(when={"auth_methods": ["federated"]}), False),
    ("when token_sources header", rule(when={"token_sources": ["header"]}), False),
    ("when app_only yes", rule(when={"app_only": "yes"}), False),
    ("when unknown key", rule(when={"app_id": [TENANT]}), False),
    ("no operations", drop("rules", 0, "operations"), False),
    ("empty operations", rule(operations=[]), False),
    ("methods lower case", operation(methods=["get", " Post "]), True),
    ("methods any", operation(methods=["*"]), True),
    ("method GTE", operation(methods=["GTE"]), False),
    ("methods a string", operation(methods="GET"), False),
    ("path without /", operation(paths=["users"]), False),
    ("versions v2.0", operation(versions=["v2.0"]), False),
    ("operation odata", operation(odata={"max_top": 5}), True),
    ("odata forbid_select", rule(odata={"forbid_select": ["keyCredentials"], "forbid_expand": ["owners"], "max_top": 100}), True),
    ("odata empty", rule(odata={}), False),
    ("odata unknown key", rule(odata={"forbid_selects": ["x"]}), False),
    ("odata property with space", rule(odata={"forbid_select": ["key credentials"]}), False),
    ("odata max_top 0", rule(odata={"max_top": 0}), False),
    ("odata max_top '5'", rule(odata={"max_top": "5"}), False),
    ("schedule", rule(schedule={"days": ["mon-fri", "SAT"], "hours": "08:00-18:00", "timezone": "Europe/Berlin"}), True),
    ("schedule days without timezone", rule(schedule={"days": ["mon"]}), False),
    ("schedule days: null without timezone", rule(schedule={"days": None, "valid_from": "2025-01-01T00:00:00Z"}), True),
    ("schedule bad day", rule(schedule={"days": ["monday"], "timezone": "UTC"}), False),
    ("schedule bad hours", rule(schedule={"hours": ["8-18"], "timezone": "UTC"}), False),
    ("schedule empty", rule(schedule={}), False),
    ("schedule unknown key", rule(schedule={"weekdays": ["mon"], "timezone": "UTC"}), False),
    ("schedule valid_from", rule(schedule={"valid_from": "2025-07-01T00:00:00+02:00"}), True),
    ("schedule valid_from a word", rule(schedule={"valid_from": "tomorrow"}), False),
]


@pytest.mark.parametrize(("case", "change", "accepted"), AGREE, ids=[c[0] for c in AGREE])
def test_the_loader_and_the_schema_agree(case, change, accepted):
    doc = doc_with(change)
    assert (loader_accepts(doc), schema_accepts(doc)) == (accepted, accepted)


LOADER_ONLY = [
    # What a schema cannot know; the schema accepts these, the loader refuses them.
    ("operation host not under upstreams", operation(host="evil.example")),
    ("duplicate rule id", lambda d: d["rules"].append(copy.deepcopy(d["rules"][0]))),
    ("unknown mask profile", rule(mask="secrets")),
    ("default profile unknown", lambda d: d["masking"].update(default_profile="nope")),
    ("when tenant not accepted", rule(when={"tenants": [APPROVER]})),
    ("upstream listed twice", lambda d: d["upstreams"].append({"host": "Graph.Microsoft.com."})),
    ("unknown time zone", rule(schedule={"hours": "08:00-18:00", "timezone": "Mars/Olympus"})),
    ("hours past midnight", rule(schedule={"hours": "22:00-06:00", "timezone": "UTC"})),
    ("valid_until before valid_from", rule(schedule={"valid_from": "2025-02-01T00:00:00Z", "valid_until": "2025-01-01T00:00:00Z"})),
    ("approval timeout above 1h", rule(action="approve", approval={**APPROVAL, "timeout": "2h"})),
    ("odata on a non-Graph host", lambda d: (d["upstreams"].append({"host": "login.microsoftonline.com"}),
                                             d["rules"][0]["operations"][0].update(host="login.microsoftonline.com", odata={"max_top": 1}))),
    ("path with OData key syntax", operation(paths=["/users('x')"])),
    ("proxy lists Graph's audience without graph_token", lambda d: d["identity"].update(proxy={
        "audiences": ["https://graph.microsoft.com/"], "issuers": ["https://sts.windows.net/{tenantid}/"]})),
    ("graph_token without a Graph audience", lambda d: d["identity"].update(proxy={
        "audiences": ["api://nhi-gateway"], "issuers": ["https://login.microsoftonline.com/{tenantid}/v2.0"],
        "graph_token": True})),
    ("upstream token: proxy without identity.proxy", lambda d: d["upstreams"][0].update(token="proxy")),
    ("issuer with an unknown placeholder", lambda d: d["identity"]["bearer"].update(issuers=["https://x/{tid}/v2.0"])),
]


@pytest.mark.parametrize(("case", "change"), LOADER_ONLY, ids=[c[0] for c in LOADER_ONLY])
def test_what_only_the_loader_checks(case, change):
    doc = doc_with(change)
    assert schema_accepts(doc) and not loader_accepts(doc)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (rule(odata={"forbid_select": ["keyCredentials"], "max_top": "many"}), ["rules", 0, "odata", "max_top"]),
        (operation(methods=["GTE"]), ["rules", 0, "operations", 0, "methods", 0]),
        (rule(when={"app_ids": ["mcp-directory"]}), ["rules", 0, "when", "app_ids", 0]),
        (rule(schedule={"days": ["monday"], "timezone": "UTC"}), ["rules", 0, "schedule", "days", 0]),
        (rule(action="approve"), ["rules", 0]),
    ],
)
def test_the_schema_points_at_the_mistake(change, where):
    """What an editor underlines: the best match among the errors (as language servers choose)."""
    from jsonschema.exceptions import best_match

    assert list(best_match(VALIDATOR.iter_errors(doc_with(change))).absolute_path) == where


# --- never stricter than the loader, on random structural edits ------------------------------------

STARTER = plain(YAML(typ="safe").load((POLICIES / "credential-rotation.yaml").read_text()))
REPLACEMENTS = [None, 0, 7, -1, True, "", " ", "x", "GET", "*", "/x", "mon", "5m", TENANT, [], ["x"], [TENANT],
                {}, {"x": 1}, {"users": [TENANT]}]


PATHS = [p for p, _ in places(STARTER) if p]


@st.composite
def edited(draw):
    doc = copy.deepcopy(STARTER)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            key = path[-1]
            kind = draw(st.sampled_from(["replace", "delete", "add"]))
            if kind == "replace":
                parent[key] = copy.deepcopy(draw(st.sampled_from(REPLACEMENTS)))
            elif kind == "delete":
                del parent[key]
            elif isinstance(parent, dict):
                parent[draw(st.sampled_from(["extra", "when", "odata", "schedule", "approval", "mask"]))] = \
                    copy.deepcopy(draw(st.sampled_from(REPLACEMENTS)))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced the path
    return doc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edited())
def test_the_schema_never_refuses_what_the_loader_accepts(doc):
    if loader_accepts(doc):
        assert schema_accepts(doc), [e.message for e in VALIDATOR.iter_errors(doc)]
