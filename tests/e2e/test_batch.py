"""``$batch`` through the real gateway process to the Graph look-alike, with requests configured by
HTTPS_PROXY and the gateway's CA. The look-alike executes every inner request of a batch it gets and
logs each one (``"batch": true``) to received.jsonl: a refused batch must leave no line there at
all, neither the outer request nor any inner one."""

from __future__ import annotations

import json

import pytest
import requests
from mitmproxy import io

from nhi_gateway.recording.audit import verify_chain
from nhi_gateway.policy.batch import INNER_KEY
from nhi_gateway.lookalike.directory import TENANT_DOMAIN

from .test_gateway import GRAPH, error_of, get_token, marker, reached_graph

ADELE = f"AdeleV@{TENANT_DOMAIN}"


@pytest.fixture
def token(gateway, lookalike, monkeypatch) -> str:
    return get_token(gateway, lookalike, monkeypatch)


def post_batch(token: str, mark: str, body, version: str = "v1.0", **kw) -> requests.Response:
    kw.setdefault("json" if not isinstance(body, bytes) else "data", body)
    return requests.post(f"{GRAPH}/{version}/$batch?m={mark}", headers={"Authorization": f"Bearer {token}"},
                         timeout=20, **kw)


def batch_lines(gateway, mark: str) -> tuple[dict, list[dict]]:
    """The outer audit line of the batch sent with ``mark`` and the inner lines that belong to it."""
    lines = gateway.audit()
    outer = [a for a in lines if mark in (a["url"] or "") and not a.get("batch")]
    assert len(outer) == 1, outer
    inner = [a for a in lines if (a.get("batch") or {}).get("flow_id") == outer[0]["flow_id"]]
    return outer[0], inner


def recorded_flows(gateway, lookalike) -> list:
    app = lookalike.app("mcp-directory")
    flows = []
    for path in gateway.recording_files():
        if app["object_id"] in path.name:
            with open(path, "rb") as f:
                flows += list(io.FlowReader(f).stream())
    return flows


def test_allowed_batch_of_reads_masks_every_inner_body(gateway, lookalike, token):
    mark = marker()
    body = {"requests": [
        {"id": "list", "method": "GET", "url": f"/users?$top=3&m={mark}"},
        {"id": "Adele", "method": "GET", "url": f"users('{ADELE}')?m={mark}"},
        {"id": "groups", "method": "GET", "url": f"groups?$top=2&m={mark}"},
    ]}
    r = post_batch(token, mark, body)
    assert r.status_code == 200, r.text
    responses = {x["id"]: x for x in r.json()["responses"]}
    assert set(responses) == {"list", "Adele", "groups"}
    assert all(x["status"] == 200 for x in responses.values())
    users = responses["list"]["body"]["value"]
    assert users and all(u["mail"] == "[masked]" for u in users)
    assert all(u["userPrincipalName"] == "[masked]" and u["displayName"] != "[masked]" for u in users)
    adele = responses["Adele"]["body"]
    assert adele["mail"] == "[masked]" and adele["displayName"] == "Adele Vance"
    assert ADELE.lower() not in r.text.lower()

    # The look-alike ran each inner request: the batch really went through.
    inner_received = [x for x in lookalike.received() if x.get("batch") and mark in x["path"]]
    assert len(inner_received) == 3

    outer, inner = batch_lines(gateway, mark)
    assert outer["decision"] == "allow" and outer["status"] == 200 and outer["rule"] is None
    assert [(a["batch"]["id"], a["method"], a["decision"], a["rule"], a["status"]) for a in inner] == [
        ("list", "GET", "allow", "directory-read", 200),
        ("Adele", "GET", "allow", "directory-read", 200),
        ("groups", "GET", "allow", "directory-read", 200),
    ]
    assert inner[0]["url"].startswith("https://graph.microsoft.com/v1.0/users?$top=3")
    assert all(a["masked_fields"] > 0 for a in inner[:2])
    assert all(a["principal"]["object_id"] == lookalike.app("mcp-directory")["object_id"] for a in inner)
    assert verify_chain(gateway.recordings / "audit.jsonl") == []

    flows = recorded_flows(gateway, lookalike)
    outer_flow = [f for f in flows if f.id == outer["flow_id"]]
    assert len(outer_flow) == 1 and outer_flow[0].request.path.startswith("/v1.0/$batch")
    inner_flows = [f for f in flows if f.metadata.get(INNER_KEY, {}).get("flow_id") == outer["flow_id"]]
    assert [f.id for f in inner_flows] == [a["flow_id"] for a in inner]
    adele_flow = inner_flows[1]
    assert adele_flow.request.method == "GET" and adele_flow.request.host == "graph.microsoft.com"
    assert adele_flow.request.path.startswith("/v1.0/users(")
    assert adele_flow.response.status_code == 200
    assert json.loads(adele_flow.response.content)["mail"] == "[masked]"
    assert adele_flow.comment.startswith(f"batch {outer['flow_id']}/Adele: ALLOW")
    assert adele_flow.metadata["nhi"]["rule"] == "directory-read"
    assert adele_flow.client_conn.peername == outer_flow[0].client_conn.peername


def test_batch_hiding_add_password_is_refused_whole_and_nothing_reaches_graph(gateway, lookalike, token):
    app = lookalike.app("mcp-directory")
    mark = marker()
    body = {"requests": [
        {"id": "1", "method": "GET", "url": f"users?m={mark}"},
        {"id": "mint", "method": "POST", "url": f"applications/{app['application_object_id']}/addPassword?m={mark}",
         "headers": {"Content-Type": "application/json"}, "body": {"passwordCredential": {"displayName": "x"}}},
        {"id": "3", "method": "GET", "url": f"groups?m={mark}"},
    ]}
    r = post_batch(token, mark, body)
    assert r.status_code == 403, r.text
    err = error_of(r)
    assert err["code"] == "Authorization_RequestDenied"
    assert "'mint'" in err["message"] and "no-credential-minting" in err["message"]
    named = err["innerError"]["nhi-gateway"]["batch"]
    assert [(x["id"], x["rule"]) for x in named] == [("mint", "no-credential-minting")]
    assert not reached_graph(lookalike, mark)  # neither the outer request nor any inner one

    outer, inner = batch_lines(gateway, mark)
    assert outer["decision"] == "deny" and outer["status"] == 403 and outer["rule"] == "no-credential-minting"
    assert [(a["batch"]["id"], a["decision"], a["rule"], a["batch"]["sent"]) for a in inner] == [
        ("1", "allow", "directory-read", False),
        ("mint", "deny", "no-credential-minting", False),
        ("3", "allow", "directory-read", False),
    ]
    flows = [f for f in recorded_flows(gateway, lookalike)
             if f.metadata.get(INNER_KEY, {}).get("flow_id") == outer["flow_id"]]
    assert [f.request.method for f in flows] == ["GET", "POST"] + ["GET"]
    assert all(f.response is None for f in flows)
    assert flows[1].marked and "no-credential-minting" in flows[1].comment


@pytest.mark.parametrize("spelling", [
    "applications(appId='{client_id}')/addPassword",
    "/APPLICATIONS/{app_object_id}/AddPassword/",
    "applications/{app_object_id}/x/../addPassword",
])
def test_other_spellings_of_add_password_inside_a_batch_are_refused(gateway, lookalike, token, spelling):
    app = lookalike.app("mcp-directory")
    mark = marker()
    url = spelling.format(client_id=app["client_id"], app_object_id=app["application_object_id"])
    body = {"requests": [{"id": "x", "method": "POST", "url": f"{url}?m={mark}",
                          "headers": {"Content-Type": "application/json"}, "body": {}}]}
    r = post_batch(token, mark, body, version="beta")
    assert r.status_code == 403, r.text
    assert error_of(r)["innerError"]["nhi-gateway"]["rule"] == "no-credential-minting"
    assert not reached_graph(lookalike, mark)


def many_reads(mark: str, n: int) -> list[dict]:
    return [{"id": str(i), "method": "GET", "url": f"users?m={mark}"} for i in range(n)]


MALFORMED = {
    "nested batch": (lambda m: {"requests": [{"id": "1", "method": "POST", "url": f"$batch?m={m}",
                                              "headers": {"Content-Type": "application/json"},
                                              "body": {"requests": many_reads(m, 1)}}]}, "nested batch"),
    "absolute url": (lambda m: {"requests": [{"id": "1", "method": "GET",
                                              "url": f"https://graph.microsoft.com/v1.0/users?m={m}"}]},
                     "absolute url"),
    "network-path url": (lambda m: {"requests": [{"id": "1", "method": "GET", "url": f"//evil.example/users?m={m}"}]},
                         "absolute url"),
    "version in the url": (lambda m: {"requests": [{"id": "1", "method": "GET", "url": f"/beta/users?m={m}"}]},
                           "names a version"),
    "duplicate ids": (lambda m: {"requests": [{"id": "a", "method": "GET", "url": f"users?m={m}"},
                                              {"id": "A", "method": "GET", "url": f"groups?m={m}"}]},
                      "case-insensitive"),
    "21 requests": (lambda m: {"requests": many_reads(m, 21)}, "at most 20"),
    "HEAD inside": (lambda m: {"requests": [{"id": "1", "method": "HEAD", "url": f"users?m={m}"}]},
                    "method HEAD"),
    "not JSON": (lambda m: f'{{"requests": [{{"id": "1", "method": "GET", "url": "users?m={m}"}}'.encode(),
                 "not valid JSON"),
    "repeated url member": (lambda m: (f'{{"requests": [{{"id": "1", "method": "GET", "url": "users?m={m}", '
                                       f'"url": "groups?m={m}"}}]}}').encode(), "repeats the member 'url'"),
    "dependency cycle": (lambda m: {"requests": [
        {"id": "a", "method": "GET", "url": f"users?m={m}", "dependsOn": ["b"]},
        {"id": "b", "method": "GET", "url": f"groups?m={m}", "dependsOn": ["a"]}]}, "cycle"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_batches_the_gateway_cannot_judge_are_refused_and_never_reach_graph(gateway, lookalike, token, case):
    make, words = MALFORMED[case]
    mark = marker()
    body = make(mark)
    kw = {"headers": {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}} \
        if isinstance(body, bytes) else {}
    if kw:
        r = requests.post(f"{GRAPH}/v1.0/$batch?m={mark}", data=body, timeout=20, **kw)
    else:
        r = post_batch(token, mark, body)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["code"] == "BadRequest" and words in err["message"], err["message"]
    assert err["innerError"]["nhi-gateway"]["check"] == "batch"
    assert not reached_graph(lookalike, mark)
    outer, _ = batch_lines(gateway, mark)
    assert outer["decision"] == "deny" and outer["status"] == 400


def test_batch_with_a_request_no_rule_allows_names_it(gateway, lookalike, token):
    mark = marker()
    body = {"requests": [{"id": "1", "method": "GET", "url": f"users?m={mark}"},
                         {"id": "sp", "method": "GET", "url": f"servicePrincipals?m={mark}"}]}
    r = post_batch(token, mark, body)
    assert r.status_code == 403
    named = error_of(r)["innerError"]["nhi-gateway"]["batch"]
    assert [(x["id"], x["rule"]) for x in named] == [("sp", None)]
    assert "no rule allows" in named[0]["reason"]
    assert not reached_graph(lookalike, mark)


@pytest.mark.parametrize("number", ["1e400", "-1E+999"])
def test_a_batch_holding_a_number_python_cannot_hold_never_reaches_graph(gateway, lookalike, token, number):
    mark = marker()
    body = ('{"requests": [{"id": "names", "method": "GET", "url": "/users?$select=displayName&m=' + mark + '"},'
            '{"id": "odd", "method": "GET", "url": "/users?m=' + mark + '", "headers": {"Content-Type": '
            '"application/json"}, "body": {"n": ' + number + '}}]}').encode()
    r = requests.post(f"{GRAPH}/v1.0/$batch?m={mark}", data=body, timeout=20,
                      headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "number" in error_of(r)["message"] and "nothing of it was sent" in error_of(r)["message"]
    assert not reached_graph(lookalike, mark)
    outer, _ = batch_lines(gateway, mark)
    assert outer["status"] == 400
    assert any(mark in f.request.path for f in recorded_flows(gateway, lookalike))


def test_a_request_body_holding_a_number_python_cannot_hold_never_reaches_graph(gateway, lookalike, token):
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users?m={mark}", data=b'{"filter": {"n": 1e400}}', timeout=20,
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "number" in error_of(r)["message"]
    assert not reached_graph(lookalike, mark)
    assert next(a for a in gateway.audit() if mark in (a["url"] or ""))["status"] == 400
