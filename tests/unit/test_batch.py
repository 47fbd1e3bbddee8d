"""JSON batching: every inner request of ``POST /{version}/$batch`` is judged, masked and recorded as
if it had been sent alone; a batch the gateway cannot read, or with any refused inner request, is
refused whole and nothing of it reaches Graph.

The first part tests :mod:`nhi_gateway.policy.batch` on its own (no mitmproxy); the second runs the
gateway's chain as it is built (``build_chain``) with ``tests/support/chain.py``.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from nhi_gateway.policy.decision import REFUSED_KEY, decision_of
from nhi_gateway.policy.batch import (
    json_numbers_problem,
    BATCH_KEY,
    INNER_KEY,
    MAX_BATCH_BYTES,
    MAX_REQUESTS,
    BatchError,
    BatchResponseError,
    batch_refusal_body,
    decode_body,
    inner_flow_id,
    is_batch_endpoint,
    judge_batch,
    mask_batch_response,
    names_batch,
    parse_batch,
)
from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.masking.masks import MASK
from nhi_gateway.policy.operation import Operation
from nhi_gateway.policy.loader import load_policy, parse_policy
from nhi_gateway.identity.principal import Principal

from ..support.chain import (
    GRAPH,
    READER_APP,
    READER_OID,
    SECRET_MAIL,
    TENANT,
    UPSTREAM_SECRET,
    exchange,
    graph_json,
    refusal,
    tunnel,
)
from ..support.policies import V1_ISSUER, policy_head
from ..support.recordings import flows_under

pytestmark = pytest.mark.usefixtures("no_exception_escapes_an_addon")

REPO = Path(__file__).resolve().parents[2]
APP_ID = "0c8f7e6d-1111-4222-8333-944445555666"

POLICY = policy_head(TENANT, issuers=(V1_ISSUER,)) + f"""\
masking:
  profiles:
    pii: {{fields: [mail]}}
    secrets: {{fields: [secretText]}}
rules:
  - id: users-read
    action: allow
    when: {{app_ids: [{READER_APP}]}}
    operations:
      - {{host: graph.microsoft.com, methods: [GET], paths: ["/users/**"]}}
    mask: pii
  - id: users-write
    action: allow
    when: {{app_ids: [{READER_APP}]}}
    operations:
      - {{host: graph.microsoft.com, methods: [PATCH, POST, PUT, DELETE], paths: ["/users/{{id}}"]}}
    mask: pii
  - id: groups-read
    action: allow
    operations:
      - {{host: graph.microsoft.com, methods: [GET], paths: ["/groups/**"]}}
  - id: apps-read
    action: allow
    operations:
      - {{host: graph.microsoft.com, methods: [GET], paths: ["/applications/**"]}}
    mask: secrets
  - id: no-credential-minting
    action: deny
    operations:
      - {{host: graph.microsoft.com, methods: [POST], paths: ["/applications/{{id}}/addPassword"]}}
  - id: no-user-deletes
    action: deny
    operations:
      - {{host: graph.microsoft.com, methods: [DELETE], paths: ["/users/{{id}}"]}}
"""

policy = parse_policy(POLICY, "batch-test.yaml")
READER = Principal(tenant_id=TENANT, object_id=READER_OID, app_id=READER_APP, display_name="mcp-directory",
                   roles=("User.Read.All",))
STRANGER = Principal(tenant_id=TENANT, object_id="0b1c2d3e-0000-4000-8000-000000000044",
                     app_id="11111111-2222-4333-8444-555555555555", display_name="stranger")
OUTER = Operation.from_request("POST", "https", GRAPH, 443, "/v1.0/$batch")
OUTER_BETA = Operation.from_request("POST", "https", GRAPH, 443, "/beta/$batch")


def doc(*requests, **extra) -> bytes:
    return json.dumps({"requests": list(requests), **extra}).encode()


def get(rid: str, url: str, **more) -> dict:
    return {"id": rid, "method": "GET", "url": url, **more}


def judge(data: bytes, principal=READER, outer=OUTER, content_type="application/json", encoding="") -> Decision:
    return judge_batch(policy, principal, outer, data, content_type, encoding)


# --- the batch endpoint ----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/v1.0/$batch", "/beta/$batch", "/V1.0/$BATCH/", "/v1.0/%24batch",
                                    "//v1.0/./$batch?x=1"])
def test_batch_endpoint_spellings(target):
    op = Operation.from_request("POST", "https", GRAPH, 443, target)
    assert is_batch_endpoint(op) and names_batch(op)


@pytest.mark.parametrize("target", ["/v1.0/users/$batch", "/$batch", "/v1.0/$batch/x"])
def test_other_batch_segments_are_not_the_endpoint(target):
    op = Operation.from_request("POST", "https", GRAPH, 443, target)
    assert names_batch(op) and not is_batch_endpoint(op)


def test_only_graph_has_batches():
    op = Operation.from_request("POST", "https", "login.microsoftonline.com", 443, "/v1.0/$batch")
    assert not names_batch(op)


# --- inner urls: each one is the operation it would be alone ----------------------------------------


@pytest.mark.parametrize(
    ("url", "path", "query"),
    [
        ("users", "/users", ()),
        ("/users", "/users", ()),
        ("users/ABC?$select=id,mail", "/users/abc", (("$select", "id,mail"),)),
        ("/Users('a@b.example')", "/users/a@b.example", ()),
        ("users/a%40b.example", "/users/a@b.example", ()),
        ("users//x/", "/users/x", ()),
        ("users/x/../y", "/users/y", ()),
        ("applications(appId='5A8F')", "/applications/appid=5a8f", ()),
        ("users?top=5", "/users", (("$top", "5"),)),
    ],
)
def test_inner_url_forms_resolve_against_the_outer_version(url, path, query):
    batch = parse_batch(doc(get("1", url)), OUTER)
    op = batch.requests[0].operation
    assert (op.method, op.host, op.version, op.path, op.query) == ("GET", GRAPH, "v1.0", path, query)
    assert batch.requests[0].target == "/v1.0" + (url if url.startswith("/") else "/" + url)
    assert parse_batch(doc(get("1", url)), OUTER_BETA).requests[0].operation.version == "beta"


def test_two_spellings_inside_a_batch_get_the_decisions_they_get_alone():
    urls = ["users/x", "/Users('X')", "USERS/x/", "users/%78"]
    d = judge(doc(*(get(str(i), u) for i, u in enumerate(urls))))
    assert d.allowed
    alone = policy.decide(READER, Operation.from_request("GET", "https", GRAPH, 443, "/v1.0/users/x"))
    assert {(e["decision"], e["rule"], e["mask_profile"]) for e in d.extra["batch"]} == {
        (str(alone.action), alone.rule_id, alone.mask_profile)}


def test_member_names_are_read_case_insensitively():
    batch = parse_batch(json.dumps({"Requests": [{"ID": "a", "Method": "get", "URL": "users"}]}).encode(), OUTER)
    r = batch.requests[0]
    assert (r.id, r.method, r.operation.path, r.problems) == ("a", "GET", "/users", ())


# --- deciding: allowed iff every inner request is allowed alone -------------------------------------


def test_allowed_batch_records_every_inner_decision():
    d = judge(doc(get("1", "users"), get("2", "/groups/g1"), get("3", "applications/a1"),
                  {"id": "4", "method": "PATCH", "url": "users/x", "body": {"jobTitle": "x"},
                   "headers": {"Content-Type": "application/json"}}))
    assert d.allowed and d.stage is Stage.POLICY and d.rule_id is None
    assert "every inner request" in d.reason
    assert d.principal == READER.to_dict()
    assert d.mask_profile is None  # each inner response has its own
    got = [(e["id"], e["method"], e["url"], e["decision"], e["rule"], e["mask_profile"]) for e in d.extra["batch"]]
    assert got == [
        ("1", "GET", "users", "allow", "users-read", "pii"),
        ("2", "GET", "/groups/g1", "allow", "groups-read", None),
        ("3", "GET", "applications/a1", "allow", "apps-read", "secrets"),
        ("4", "PATCH", "users/x", "allow", "users-write", "pii"),
    ]
    assert [e["operation"] for e in d.extra["batch"]][:2] == [
        "GET graph.microsoft.com /v1.0/users", "GET graph.microsoft.com /v1.0/groups/g1"]


def test_a_refused_inner_request_refuses_the_whole_batch_naming_it():
    d = judge(doc(get("1", "users"), {"id": "mint", "method": "POST", "url": f"applications/{APP_ID}/addPassword",
                                      "body": {}, "headers": {"content-type": "application/json"}},
                  get("3", "groups")))
    assert not d.allowed and d.status == 403 and d.code == "Authorization_RequestDenied"
    assert d.rule_id == "no-credential-minting" and d.check == "batch"
    assert "'mint'" in d.reason and "no-credential-minting" in d.reason and "nothing" in d.reason
    decisions = {e["id"]: (e["decision"], e["rule"]) for e in d.extra["batch"]}
    assert decisions == {"1": ("allow", "users-read"), "mint": ("deny", "no-credential-minting"),
                         "3": ("allow", "groups-read")}
    body = json.loads(batch_refusal_body(d, "flow-1"))
    assert body["error"]["code"] == "Authorization_RequestDenied"
    assert body["error"]["innerError"]["nhi-gateway"]["rule"] == "no-credential-minting"
    assert [(b["id"], b["rule"]) for b in body["error"]["innerError"]["nhi-gateway"]["batch"]] == [
        ("mint", "no-credential-minting")]


def test_every_refused_inner_request_is_named():
    d = judge(doc(get("a", "servicePrincipals"), {"id": "b", "method": "DELETE", "url": "users/x"}))
    assert not d.allowed
    body = json.loads(batch_refusal_body(d, "f"))
    refused = {b["id"]: b["rule"] for b in body["error"]["innerError"]["nhi-gateway"]["batch"]}
    assert refused == {"a": None, "b": "no-user-deletes"}
    assert "no rule allows" in d.reason and "'a'" in d.reason and "'b'" in d.reason


def test_inner_requests_are_judged_for_the_caller_of_the_outer_request():
    d = judge(doc(get("1", "users")), principal=STRANGER)
    assert not d.allowed and d.extra["batch"][0]["decision"] == "deny"
    assert judge(doc(get("1", "users")), principal=None).allowed is False


class Approving:
    """A policy whose rule asks for approval: an approval holds one request, not part of a batch."""

    def decide(self, principal, op):
        return Decision(action=Action.APPROVE, stage=Stage.POLICY, reason="approval required by rule 'rotate'",
                        status=403, code="Authorization_RequestDenied", rule_id="rotate", operation=str(op))


def test_an_inner_request_that_needs_approval_refuses_the_batch():
    d = judge_batch(Approving(), READER, OUTER, doc(get("1", "users")), "application/json")
    assert not d.allowed and d.status == 403 and d.rule_id == "rotate"
    assert "send this request on its own" in d.reason
    assert d.extra["batch"][0]["decision"] == "approve"


# --- refusals: what the gateway cannot read unambiguously -------------------------------------------


def many(n: int) -> bytes:
    return doc(*(get(str(i), "users") for i in range(n)))


ENVELOPE = {
    "not JSON": (b'{"requests": [', 400, "not valid JSON"),
    "empty body": (b"", 400, "not valid JSON"),
    "not UTF-8": (b'{"requests": "\xff"}', 400, "not UTF-8"),
    "NaN": (b'{"requests": NaN}', 400, "NaN"),
    "array": (b"[]", 400, "must be a JSON object"),
    "no requests": (b"{}", 400, "no 'requests' list"),
    "requests not a list": (b'{"requests": {"id": "1"}}', 400, "no 'requests' list"),
    "empty requests": (doc(), 400, "no requests"),
    "too many requests": (many(MAX_REQUESTS + 1), 400, f"at most {MAX_REQUESTS}"),
    "unknown member": (doc(get("1", "users"), atomicityGroup="x"), 400, "'atomicityGroup'"),
    "repeated member": (b'{"requests": [], "requests": [{"id":"1","method":"GET","url":"users"}]}', 400,
                        "repeats the member 'requests'"),
    "member twice in another case": (b'{"requests": [], "Requests": []}', 400, "given twice"),
    "repeated member inside a request": (
        b'{"requests": [{"id":"1","method":"GET","url":"users","url":"applications/x/addPassword"}]}', 400,
        "repeats the member 'url'"),
    "too deep": (b'{"requests": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}", 400, "nested too deeply"),
}


@pytest.mark.parametrize("case", ENVELOPE, ids=list(ENVELOPE))
def test_unreadable_batches_are_refused_whole(case):
    data, status, words = ENVELOPE[case]
    d = judge(data)
    assert not d.allowed and (d.status, d.check) == (status, "batch"), d.reason
    assert words in d.reason and "nothing of it was sent" in d.reason
    assert d.extra["batch"] == []
    json.loads(batch_refusal_body(d, "f"))


def test_twenty_requests_are_accepted():
    assert judge(many(MAX_REQUESTS)).allowed


JSON_BODY = {"headers": {"Content-Type": "application/json"}, "body": {"a": 1}}

INNER = {
    # name: (request, words of the reason)
    "not an object": ("users", "not a JSON object"),
    "no id": ({"method": "GET", "url": "users"}, "no 'id'"),
    "numeric id": ({"id": 1, "method": "GET", "url": "users"}, "'id' is not a string"),
    "empty id": (get("", "users"), "'id' must be"),
    "id with a newline": (get("a\nb", "users"), "'id' must be"),
    "no method": ({"id": "1", "url": "users"}, "no 'method'"),
    "method not a string": ({"id": "1", "method": ["GET"], "url": "users"}, "'method' is not a string"),
    "HEAD": ({"id": "1", "method": "HEAD", "url": "users"}, "method HEAD is not accepted"),
    "OPTIONS": ({"id": "1", "method": "OPTIONS", "url": "users"}, "method OPTIONS"),
    "invalid method": ({"id": "1", "method": "G ET", "url": "users"}, "invalid method"),
    "no url": ({"id": "1", "method": "GET"}, "no 'url'"),
    "url not a string": ({"id": "1", "method": "GET", "url": ["users"]}, "'url' is not a string"),
    "empty url": (get("1", ""), "'url' is empty"),
    "absolute url": (get("1", "https://graph.microsoft.com/v1.0/users"), "absolute url"),
    "absolute url, other host": (get("1", "https://evil.example/v1.0/users"), "absolute url"),
    "absolute url, upper case scheme": (get("1", "HTTPS://graph.microsoft.com/v1.0/users"), "absolute url"),
    "network-path url": (get("1", "//evil.example/v1.0/users"), "absolute url"),
    "other scheme": (get("1", "mailto:x@y"), "absolute url"),
    "backslash url": (get("1", "\\\\evil.example\\users"), "backslash"),
    "same version prefix": (get("1", "/v1.0/users"), "names a version"),
    "other version prefix": (get("1", "beta/users"), "names a version"),
    "version in another case": (get("1", "/V1.0/users"), "names a version"),
    "climbs into another version": (get("1", "../beta/users"), "climbs out"),
    "climbs above the root": (get("1", "../../users"), "climbs above the root"),
    "nested batch": ({"id": "1", "method": "POST", "url": "$batch", **JSON_BODY}, "nested batch"),
    "nested batch, encoded": ({"id": "1", "method": "POST", "url": "/%24BATCH", **JSON_BODY}, "nested batch"),
    "encoded slash": (get("1", "users/a%2Fb"), "encoded slash"),
    "double encoding": (get("1", "users/a%252Fb"), "double percent-encoding"),
    "surrounding space": (get("1", " users"), "whitespace"),
    "control character": (get("1", "users\tx"), "control"),
    "fragment": (get("1", "users#x"), "fragment"),
    "unknown member": (get("1", "users", atomicityGroup="g"), "unknown member 'atomicityGroup'"),
    "member twice in another case": (get("1", "users", URL="applications"), "given twice"),
    "headers not an object": (get("1", "users", headers=["a"]), "'headers' is not a JSON object"),
    "header value not a string": (get("1", "users", headers={"ConsistencyLevel": 1}), "printable string"),
    "invalid header name": (get("1", "users", headers={"a b": "x"}), "invalid header name"),
    "Authorization inside": (get("1", "users", headers={"Authorization": "Bearer x"}), "'Authorization'"),
    "Proxy-Authorization inside": (get("1", "users", headers={"proxy-authorization": "x"}), "runs as the caller"),
    "Host inside": (get("1", "users", headers={"Host": "evil.example"}), "'Host'"),
    "header twice": (get("1", "users", headers={"Prefer": "a", "prefer": "b"}), "given twice"),
    "body without Content-Type": ({"id": "1", "method": "POST", "url": "users/x", "body": {"a": 1}},
                                  "no Content-Type"),
    "JSON body that is a string": ({"id": "1", "method": "PATCH", "url": "users/x", "body": "e30=",
                                    "headers": {"Content-Type": "application/json"}}, "JSON object or array"),
    "JSON body that is a number": ({"id": "1", "method": "PATCH", "url": "users/x", "body": 1,
                                    "headers": {"Content-Type": "application/json"}}, "JSON object or array"),
    "binary body that is an object": ({"id": "1", "method": "PUT", "url": "users/x", "body": {"a": 1},
                                       "headers": {"Content-Type": "image/jpeg"}}, "must be a string"),
    "X-HTTP-Method-Override inside": (get("1", "users", headers={"X-HTTP-Method-Override": "DELETE"}),
                                      "override their method"),
    "X-HTTP-Method inside": (get("1", "users", headers={"x-http-method": "DELETE"}), "override their method"),
    "X-Method-Override inside": (get("1", "users", headers={"X-Method-Override": "PATCH"}), "override their method"),
    "_method in the url": (get("1", "users?$top=1&_method=DELETE"), "query parameter '_method'"),
    "_method in a JSON body": ({"id": "1", "method": "POST", "url": "users", "body": {"_method": "DELETE"},
                                "headers": {"Content-Type": "application/json"}}, "JSON member '_method'"),
    "_method in a form body": ({"id": "1", "method": "POST", "url": "users", "body": "X21ldGhvZD1ERUxFVEU=",
                                "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
                               "form parameter '_method'"),
    "dependsOn not a list": (get("1", "users", dependsOn="2"), "list of request ids"),
    "dependsOn unknown id": (get("1", "users", dependsOn=["9"]), "not a request of this batch"),
    "dependsOn itself": (get("1", "users", dependsOn=["1"]), "the request itself"),
}


@pytest.mark.parametrize("case", INNER, ids=list(INNER))
def test_inner_requests_that_cannot_be_judged_refuse_the_batch(case):
    request, words = INNER[case]
    d = judge(doc(get("ok", "users"), request))
    assert not d.allowed and (d.status, d.code, d.check) == (400, "BadRequest", "batch"), d.reason
    assert words in d.reason, d.reason
    entries = d.extra["batch"]
    assert entries[0]["decision"] == "allow"  # the readable one is still judged, for the record
    assert entries[1]["decision"] == "deny" and words in entries[1]["reason"]
    named = json.loads(batch_refusal_body(d, "f"))["error"]["innerError"]["nhi-gateway"]["batch"]
    assert [b["id"] for b in named] == [entries[1]["id"]]


@pytest.mark.parametrize("ids", [("a", "a"), ("a", "A"), ("Straße", "STRASSE")])
def test_ids_are_unique_case_insensitively(ids):
    d = judge(doc(get(ids[0], "users"), get(ids[1], "groups")))
    assert d.status == 400 and "used by 2 requests" in d.reason
    assert [e["decision"] for e in d.extra["batch"]] == ["deny", "deny"]


def test_depends_on_ids_case_insensitively_and_cycles_are_refused():
    assert judge(doc(get("a", "users"), get("b", "groups", dependsOn=["A"]))).allowed
    d = judge(doc(get("a", "users", dependsOn=["c"]), get("b", "groups", dependsOn=["a"]),
                  get("c", "groups", dependsOn=["B"]), get("d", "groups")))
    assert d.status == 400 and "cycle" in d.reason
    assert [e["id"] for e in d.extra["batch"] if e["decision"] == "deny"] == ["a", "b", "c"]


def test_bodies_graph_accepts_are_accepted():
    d = judge(doc(
        {"id": "1", "method": "PATCH", "url": "users/x", "body": {"a": 1},
         "headers": {"content-type": "application/json"}},
        {"id": "2", "method": "POST", "url": "users/x", "body": [1],
         "headers": {"Content-Type": "application/json; charset=utf-8"}},
        {"id": "3", "method": "PUT", "url": "users/x", "body": "aGVsbG8=",
         "headers": {"Content-Type": "image/jpeg"}},
        {"id": "4", "method": "GET", "url": "users", "body": None, "headers": None, "dependsOn": None},
    ))
    assert d.allowed, d.reason


@pytest.mark.parametrize(("content_type", "status"), [
    ("application/json", 0),
    ("application/json; charset=utf-8", 0),
    ("text/plain", 415),
    ("", 415),
    ("application/json; charset=utf-16", 415),
])
def test_the_batch_must_be_json_in_utf8(content_type, status):
    d = judge(doc(get("1", "users")), content_type=content_type)
    assert d.status == status and d.allowed is (status == 0)


# --- encoded and oversized request bodies ----------------------------------------------------------


def test_gzip_and_deflate_batches_are_read():
    data = doc(get("1", "users"), {"id": "2", "method": "DELETE", "url": "users/x"})
    for encoding, encoded in (("gzip", gzip.compress(data)), ("deflate", zlib.compress(data)),
                              ("deflate", zlib.compress(data)[2:-4])):  # raw deflate, as some clients send
        d = judge(encoded, encoding=encoding)
        assert d.rule_id == "no-user-deletes", encoding  # the hidden delete is seen through the encoding


@pytest.mark.parametrize(("raw", "encoding", "status", "words"), [
    (b"not gzip", "gzip", 400, "cannot be decoded"),
    (gzip.compress(doc(get("1", "users")))[:-10], "gzip", 400, "truncated"),
    (gzip.compress(doc(get("1", "users"))) + b"junk", "gzip", 400, "trailing"),
    (gzip.compress(doc(get("1", "users"))) * 2, "gzip", 400, "trailing"),
    (doc(get("1", "users")), "br", 415, "not accepted"),
    (doc(get("1", "users")), "gzip, gzip", 415, "not accepted"),
    (gzip.compress(b" " * (MAX_BATCH_BYTES + 1)), "gzip", 413, "inflates to more than"),
    (b" " * (MAX_BATCH_BYTES + 1), "", 413, "at most"),
])
def test_bodies_that_cannot_be_decoded_safely_are_refused(raw, encoding, status, words):
    with pytest.raises(BatchError) as e:
        decode_body(raw, encoding)
    assert e.value.status == status and words in str(e.value)
    d = judge(raw, encoding=encoding)
    assert not d.allowed and d.status == status and d.check == "batch"


def test_a_gzip_bomb_is_never_inflated_in_full():
    bomb = gzip.compress(b"{" * (200 * MAX_BATCH_BYTES))
    assert len(bomb) < MAX_BATCH_BYTES
    with pytest.raises(BatchError) as e:
        decode_body(bomb, "gzip")
    assert e.value.status == 413


# --- the example policy: no rule for POST /$batch is needed -----------------------------------------


def test_the_example_policy_judges_batches_by_their_inner_requests():
    example = load_policy(REPO / "policies" / "example.yaml")
    reader = Principal(tenant_id="8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96", object_id=READER_OID,
                       app_id="5e0b1683-de22-5eac-9334-fb85a741f6ff", display_name="mcp-directory")
    reads = doc(get("1", "users?$top=3"), get("2", "/groups"), get("3", "applications"))
    d = judge_batch(example, reader, OUTER, reads, "application/json")
    assert d.allowed and {e["rule"] for e in d.extra["batch"]} == {"directory-read"}
    assert {e["mask_profile"] for e in d.extra["batch"]} == {"directory-pii"}
    minting = doc(get("1", "users"), {"id": "2", "method": "POST", "url": f"/applications/{APP_ID}/addPassword",
                                      "body": {}, "headers": {"Content-Type": "application/json"}})
    d = judge_batch(example, reader, OUTER, minting, "application/json")
    assert not d.allowed and d.rule_id == "no-credential-minting"


# --- masking the answer: each inner body by its own inner decision --------------------------------


def entries_for(*requests) -> list[dict]:
    d = judge(doc(*requests))
    assert d.allowed, d.reason
    return d.extra["batch"]


def fields_of(name: str) -> frozenset[str]:
    return policy.mask_profiles[name].fields


def answer(*responses, **extra) -> bytes:
    return json.dumps({"responses": list(responses), **extra}).encode()


def item(rid, body, status=200, content_type="application/json"):
    return {"id": rid, "status": status, "headers": {"Content-Type": content_type}, "body": body}


USER = {"id": "u1", "displayName": "Alice", "mail": SECRET_MAIL, "secretText": "not-a-secret-here"}
SECRET = {"keyId": "k", "secretText": "s3cr3t", "hint": "s3c", "mail": "app@x.example"}


def test_each_inner_body_is_masked_by_its_own_profile_in_any_order():
    entries = entries_for(get("users", "users/u1"), get("apps", "applications/a1"), get("groups", "groups"))
    data = answer(item("groups", {"value": [{"mail": "g@x.example"}]}), item("APPS", SECRET),
                  item("Users", {"value": [USER], "@odata.context": "x"}))
    masked, updated, count = mask_batch_response(data, entries, fields_of)
    out = {r["id"]: r["body"] for r in json.loads(masked)["responses"]}
    assert out["Users"]["value"][0]["mail"] == MASK  # pii: mail only
    assert out["Users"]["value"][0]["secretText"] == USER["secretText"]
    assert out["APPS"]["secretText"] == MASK and out["APPS"]["mail"] == SECRET["mail"]  # secrets: secretText only
    assert out["groups"]["value"][0]["mail"] == "g@x.example"  # groups-read names no profile
    assert count == 2
    assert [(e["id"], e["response_status"], e["masked_fields"]) for e in updated] == [
        ("users", 200, 1), ("apps", 200, 1), ("groups", 200, 0)]
    assert [r["id"] for r in json.loads(masked)["responses"]] == ["groups", "APPS", "Users"]  # order kept


@pytest.mark.parametrize(("data", "words"), [
    (answer(item("1", USER), item("2", USER)), "'2', which was not requested"),
    (answer(item("1", USER), item("1", USER)), "more than once"),
    (answer(item("1", USER), {"ID": "1", "status": 200, "body": USER}), "more than once"),
    (answer({"status": 200, "body": USER}), "no 'id'"),
    (answer({"id": 1, "status": 200, "body": USER}), "not a string"),
    (answer({"id": "1", "Id": "1", "body": USER}), "no 'id', or 'id' or 'body' more than once"),
    (answer({"id": "1", "body": USER, "Body": USER}), "more than once"),
    (answer("1"), "not a JSON object"),
    (b'{"responses": [], "Responses": []}', "more than once"),
    (b'{"responses": {}}', "not a list"),
    (b'{"responses": [', "not valid JSON"),
    (b'{"responses": [], "x": NaN}', "NaN"),
    (answer(item("1", "not base64!")), "not base64"),
    (answer(item("1", base64.b64encode(b"{not json").decode())), "could not be masked"),
    (answer(item("1", "eyJhIjogMX0=", content_type="text/plain"), item("1", USER)), "more than once"),
])
def test_answers_that_cannot_be_masked_safely_are_withheld(data, words):
    entries = entries_for(get("1", "users/u1"))
    with pytest.raises(BatchResponseError) as e:
        mask_batch_response(data, entries, fields_of)
    assert words in str(e.value)


def test_base64_bodies_are_decoded_masked_and_encoded_again():
    entries = entries_for(get("1", "users/u1"), get("2", "users/u2"), get("3", "users/u3/photo/$value"),
                          get("4", "users/u4"))
    json_b64 = base64.b64encode(json.dumps(USER).encode()).decode()
    hidden_json = base64.urlsafe_b64encode(json.dumps({"mail": SECRET_MAIL, "x": "?>?"}).encode()).decode().rstrip("=")
    photo = base64.b64encode(b"\xff\xd8\xff\xe0 jpeg bytes").decode()
    data = answer(item("1", json_b64), item("2", hidden_json, content_type="text/plain"),
                  item("3", base64.b64encode(b"5").decode(), content_type="text/plain"), item("4", 42))
    masked, _, count = mask_batch_response(data, entries, fields_of)
    out = {r["id"]: r["body"] for r in json.loads(masked)["responses"]}
    assert json.loads(base64.b64decode(out["1"]))["mail"] == MASK
    assert json.loads(base64.urlsafe_b64decode(out["2"] + "=" * (-len(out["2"]) % 4)))["mail"] == MASK
    assert base64.b64decode(out["3"]) == b"5" and out["4"] == 42  # nothing named in them: as they would be alone
    assert count == 2
    # A photo is nothing a profile of fields can read: withheld, as it would be alone.
    with pytest.raises(BatchResponseError, match="binary: pass"):
        mask_batch_response(answer(item("3", photo, content_type="image/jpeg")), entries, fields_of)


def test_without_a_profile_string_bodies_pass_as_they_are():
    entries = entries_for(get("1", "groups"))
    masked, _, count = mask_batch_response(answer(item("1", "not base64!", content_type="text/plain")),
                                           entries, fields_of)
    assert json.loads(masked)["responses"][0]["body"] == "not base64!" and count == 0


def test_members_beside_the_responses_and_whole_batch_errors_are_masked_with_every_profile():
    entries = entries_for(get("1", "users"), get("2", "applications"))
    masked, _, _ = mask_batch_response(answer(item("1", {}), **{"@odata.nextLink": "x", "extra": SECRET,
                                                                "more": {"mail": "m"}}), entries, fields_of)
    out = json.loads(masked)
    assert out["extra"]["secretText"] == MASK and out["more"]["mail"] == MASK
    error = json.dumps({"error": {"code": "BadRequest", "message": "x", "mail": "m"}}).encode()
    masked, updated, _ = mask_batch_response(error, entries, fields_of)
    assert json.loads(masked)["error"]["mail"] == MASK
    assert all("response_status" not in e for e in updated)


def test_a_repeated_member_in_graphs_answer_cannot_smuggle_an_unmasked_copy():
    entries = entries_for(get("1", "users/u1"))
    data = b'{"responses": [{"id": "1", "status": 200, "body": {"mail": "' + SECRET_MAIL.encode() + \
           b'", "mail": "x"}}]}'
    masked, _, _ = mask_batch_response(data, entries, fields_of)
    assert SECRET_MAIL.encode() not in masked


def test_a_profile_removed_by_a_reload_is_reported():
    entries = entries_for(get("1", "users/u1"))

    def gone(name):
        raise LookupError(name)

    with pytest.raises(LookupError):
        mask_batch_response(answer(item("1", USER)), entries, gone)


def test_inner_flow_ids_are_stable_and_distinct():
    a = inner_flow_id("outer", {"index": 0})
    assert a == inner_flow_id("outer", {"index": 0}) != inner_flow_id("outer", {"index": 1})
    assert a != inner_flow_id("other", {"index": 0})


# --- the chain: authorization, masking, audit and recording of a batch ------------------------------


def batch_flow(client, body: bytes | dict, token: str, path: str = "/v1.0/$batch", method: str = "POST",
               encoding: str | None = None, content_type: str = "application/json") -> http.HTTPFlow:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = http.Headers(host=GRAPH, accept="application/json", authorization=f"Bearer {token}")
    if content_type:
        headers["Content-Type"] = content_type
    if encoding:
        headers["Content-Encoding"] = encoding
    req = tutils.treq(method=method.encode(), scheme=b"https", host=GRAPH, port=443, authority=b"",
                      path=path.encode(), headers=headers, content=b"")
    req.raw_content = raw
    return tflow.tflow(client_conn=client, req=req)


def audit_lines(gw) -> list[dict]:
    path = gw.recorder.directory / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def recorded(gw) -> list[http.HTTPFlow]:
    return flows_under(gw.recorder.directory)


READS = {"requests": [get("1", "users"), get("Two", "/users/1?$select=id,mail")]}


async def test_allowed_batch_is_forwarded_unchanged_and_each_body_masked(gw, tokens):
    client = await tunnel(gw)
    f = batch_flow(client, READS, tokens["reader"])
    original = f.request.raw_content
    upstream = graph_json({"responses": [
        item("two", {"id": "1", "mail": SECRET_MAIL}),
        item("1", {"value": [{"id": "1", "mail": SECRET_MAIL, "manager": {"mail": "boss@x.example"}}]}),
    ]}, encoding="gzip")
    sent = await exchange(gw.chain, f, upstream)
    assert sent is not None and sent.raw_content == original  # what Graph gets is what the client sent
    assert f.response.status_code == 200 and f.response.headers["Content-Encoding"] == "gzip"
    out = json.loads(f.response.get_content(strict=True))
    assert SECRET_MAIL.encode() not in f.response.get_content()
    bodies = {r["id"]: r["body"] for r in out["responses"]}
    assert bodies["two"]["mail"] == MASK and bodies["1"]["value"][0]["manager"]["mail"] == MASK
    decision = decision_of(f)
    assert decision.allowed and decision.extra["masked_fields"] == 3
    assert [(e["id"], e["rule"], e["sent"], e["response_status"]) for e in decision.extra["batch"]] == [
        ("1", "directory-read", True, 200), ("Two", "directory-read", True, 200)]
    assert f.metadata[BATCH_KEY] == decision.extra["batch"]

    lines = audit_lines(gw)
    outer = [a for a in lines if a["flow_id"] == f.id]
    inner = [a for a in lines if (a.get("batch") or {}).get("flow_id") == f.id]
    assert len(outer) == 1 and outer[0]["decision"] == "allow" and outer[0]["status"] == 200
    assert [(a["batch"]["id"], a["method"], a["url"], a["decision"], a["rule"], a["status"], a["masked_fields"])
            for a in inner] == [
        ("1", "GET", "https://graph.microsoft.com/v1.0/users", "allow", "directory-read", 200, 2),
        ("Two", "GET", "https://graph.microsoft.com/v1.0/users/1?$select=id,mail", "allow", "directory-read", 200, 1),
    ]
    assert lines.index(outer[0]) > lines.index(inner[-1])  # inner lines first: the outer one concludes
    assert inner[0]["principal"]["object_id"] == READER_OID

    flows = recorded(gw)
    outer_flow = next(x for x in flows if x.id == f.id)
    assert outer_flow.request.path == "/v1.0/$batch"
    inner_flows = [x for x in flows if x.metadata.get(INNER_KEY, {}).get("flow_id") == f.id]
    assert [x.id for x in inner_flows] == [a["flow_id"] for a in inner]
    one, two = inner_flows
    assert (one.request.method, one.request.pretty_url) == ("GET", "https://graph.microsoft.com/v1.0/users")
    assert two.request.path == "/v1.0/users/1?$select=id,mail"
    assert json.loads(two.response.content) == {"id": "1", "mail": MASK}
    assert two.response.status_code == 200 and SECRET_MAIL.encode() not in one.response.content
    assert two.comment.startswith(f"batch {f.id}/Two: ALLOW")
    assert two.metadata["nhi"]["rule"] == "directory-read" and two.metadata["nhi"]["action"] == "allow"
    assert two.metadata["nhi"]["principal"]["object_id"] == READER_OID
    assert two.client_conn.peername == f.client_conn.peername


async def test_refused_batch_reaches_nothing_and_names_the_refused_id(gw, tokens):
    client = await tunnel(gw)
    body = {"requests": [get("1", "users"), {"id": "del", "method": "DELETE", "url": "users/1"}]}
    f = batch_flow(client, body, tokens["reader"])
    assert await exchange(gw.chain, f, graph_json({"responses": []})) is None
    r = refusal(f, 403)
    assert (r["rule"], r["check"]) == ("no-user-deletes", "batch")
    assert [(b["id"], b["rule"]) for b in r["batch"]] == [("del", "no-user-deletes")]
    assert "'del'" in r["message"]

    inner = [a for a in audit_lines(gw) if (a.get("batch") or {}).get("flow_id") == f.id]
    assert [(a["batch"]["id"], a["decision"], a["rule"], a["status"], a["batch"]["sent"]) for a in inner] == [
        ("1", "allow", "directory-read", 403, False), ("del", "deny", "no-user-deletes", 403, False)]
    flows = [x for x in recorded(gw) if x.metadata.get(INNER_KEY, {}).get("flow_id") == f.id]
    assert [x.request.method for x in flows] == ["GET", "DELETE"] and all(x.response is None for x in flows)
    assert "not sent: the batch was refused" in flows[0].comment
    assert flows[1].marked  # the refused one is marked in mitmweb


@pytest.mark.parametrize(("path", "method", "body", "status", "words"), [
    ("/v1.0/$batch", "GET", b"", 400, "POST /v1.0/$batch"),
    ("/v1.0/users/$batch", "POST", json.dumps(READS).encode(), 400, "not a batch request"),
    ("/$batch", "POST", json.dumps(READS).encode(), 400, "not a batch request"),
    ("/v1.0/$batch", "POST", b"{", 400, "not valid JSON"),
    ("/v1.0/$batch", "POST", json.dumps({"requests": [get("1", "$batch")]}).encode(), 400, "nested batch"),
    ("/v1.0/$batch", "POST", json.dumps({"requests": [get("1", "https://evil.example/x")]}).encode(), 400,
     "absolute url"),
])
async def test_batches_the_gateway_cannot_judge_are_refused_before_graph(gw, tokens, path, method, body, status, words):
    client = await tunnel(gw)
    f = batch_flow(client, body, tokens["reader"], path=path, method=method)
    assert await exchange(gw.chain, f, graph_json({"responses": []})) is None
    r = refusal(f, status)
    assert r["check"] == "batch" and words in r["message"], r["message"]


async def test_a_gzip_batch_is_judged_through_its_encoding(gw, tokens):
    client = await tunnel(gw)
    body = gzip.compress(json.dumps({"requests": [get("1", "users"),
                                                  {"id": "2", "method": "DELETE", "url": "users/1"}]}).encode())
    f = batch_flow(client, body, tokens["reader"], encoding="gzip")
    assert await exchange(gw.chain, f) is None
    assert refusal(f, 403)["rule"] == "no-user-deletes"


async def test_an_answer_for_an_id_never_requested_is_withheld(gw, tokens):
    client = await tunnel(gw)
    f = batch_flow(client, READS, tokens["reader"])
    upstream = graph_json({"responses": [item("1", {"mail": SECRET_MAIL}),
                                         item("3", {"note": UPSTREAM_SECRET.decode()})]})
    assert await exchange(gw.chain, f, upstream) is not None
    r = refusal(f, 502)
    assert r["stage"] == "masking" and "'3', which was not requested" in r["message"]
    # Graph ran the inner requests: the trail and the recording still show each of them.
    inner = [a for a in audit_lines(gw) if (a.get("batch") or {}).get("flow_id") == f.id]
    assert [(a["decision"], a["status"], a["batch"]["sent"]) for a in inner] == [("allow", 502, True)] * 2
    flows = [x for x in recorded(gw) if x.metadata.get(INNER_KEY, {}).get("flow_id") == f.id]
    assert len(flows) == 2 and all(x.response is None for x in flows)


async def test_a_batch_answer_that_is_not_json_is_withheld_when_anything_is_masked(gw, tokens):
    client = await tunnel(gw)
    f = batch_flow(client, READS, tokens["reader"])
    upstream = graph_json(SECRET_MAIL.encode(), content_type="text/plain")
    await exchange(gw.chain, f, upstream)
    assert refusal(f, 502)["stage"] == "masking"


async def test_a_refused_batch_is_never_masked_or_counted_as_sent(gw, tokens):
    client = await tunnel(gw)
    f = batch_flow(client, {"requests": [get("1", "servicePrincipals")]}, tokens["reader"])
    await exchange(gw.chain, f)
    assert f.metadata[REFUSED_KEY] and not any(e["sent"] for e in f.metadata[BATCH_KEY])


def test_an_inner_property_path_is_masked_by_the_propertys_name():
    entries = entries_for(get("1", "users/u1/mail"), get("2", "users/u1/mail/$value"))
    data = answer(item("1", {"@odata.context": "x", "value": SECRET_MAIL}),
                  item("2", base64.b64encode(SECRET_MAIL.encode()).decode(), content_type="text/plain"))
    masked, _, count = mask_batch_response(data, entries, fields_of)
    out = {r["id"]: r["body"] for r in json.loads(masked)["responses"]}
    assert out["1"] == {"@odata.context": "x", "value": MASK}
    assert base64.b64decode(out["2"]) == MASK.encode() and count == 2
    assert SECRET_MAIL.encode() not in masked


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1E+999", "9" * 5000])
def test_numbers_python_cannot_hold_refuse_the_batch_before_anything_is_sent(number):
    body = ('{"requests": [{"id": "1", "method": "GET", "url": "/users"}, {"id": "2", "method": "PATCH", '
            '"url": "/users/u1", "headers": {"Content-Type": "application/json"}, '
            '"body": {"extension": {"n": ' + number + '}}}]}').encode()
    d = judge(body)
    assert d.action is Action.DENY and d.status == 400 and d.check == "batch", d.reason
    assert "number" in d.reason and "nothing of it was sent" in d.reason


@pytest.mark.parametrize(("body", "problem"), [
    (b'{"a": 1e400}', "out of range"),
    (b'[1, {"b": [-1e999]}]', "out of range"),
    (b'{"a": ' + b"1" * 5000 + b"}", "digits"),
    (b'{"a": 1e308, "b": 12345678901234567890}', None),  # large, but held
    (b"not json at all 1e400", None),  # not JSON: not this check's business
    (b"", None),
])
def test_json_numbers_problem(body, problem):
    found = json_numbers_problem(body)
    assert (found is None) if problem is None else (problem in found)
