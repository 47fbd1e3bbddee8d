"""No query oracles, through the real gateway (the example policy: mcp-directory reads users with
``mail``, ``userPrincipalName``, phones ... masked) and a Graph look-alike that honours
``$filter`` (eq, startswith), ``$orderby`` and ``$search`` on users, so that each of these
requests would really tell the caller what its answers mask. Each is refused with 403 naming the
property, and never reaches Graph; filters on unmasked properties still work."""

from __future__ import annotations

import json

import pytest
import requests

from ..support.e2e import GRAPH, get_token, marker, reached_graph, use_proxy


@pytest.fixture(scope="module")
def reader(gateway, lookalike) -> dict:
    mp = pytest.MonkeyPatch()
    try:
        token = get_token(gateway, lookalike, mp)
    finally:
        mp.undo()
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(("query", "field"), [
    ("$filter=startswith(mail,'adel')&$select=displayName", "mail"),
    ("$filter=Mail eq 'AdeleV@nhilab.onmicrosoft.com'&$select=displayName", "mail"),
    ("%24filter=startswith(%6Dail,'adel')&$select=displayName", "mail"),
    ("$filter=startswith(mobilePhone,'%2B1 4')&$select=displayName", "mobilePhone"),
    ("$orderby=mobilePhone desc&$select=displayName", "mobilePhone"),
    ('$search="mail:adele"&$select=displayName', "mail"),
    ("$select=displayName&$expand=manager($filter=startswith(mail,'a'))", "mail"),
    ("$filter=otherMails/any(x:startswith(x,'adele'))&$select=displayName", "otherMails"),
])
def test_filter_sort_or_search_on_a_masked_property_never_reaches_graph(gateway, lookalike, reader, monkeypatch,
                                                                      query, field):
    use_proxy(monkeypatch, gateway)
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users?{query}&m={mark}", headers={**reader, "ConsistencyLevel": "eventual"},
                     timeout=30)
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert f"'{field}'" in error["message"] and "directory-pii" in error["message"]
    assert not reached_graph(lookalike, mark)
    line = next(a for a in gateway.audit() if mark in a["url"])
    assert line["status"] == 403 and line.get("rule") == "directory-read"


def test_the_count_of_a_filter_on_a_masked_property_is_refused(gateway, lookalike, reader, monkeypatch):
    use_proxy(monkeypatch, gateway)
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users/$count?$filter=startswith(mail,'a')&m={mark}",
                     headers={**reader, "ConsistencyLevel": "eventual"}, timeout=30)
    assert r.status_code == 403 and "'mail'" in r.json()["error"]["message"]
    assert not reached_graph(lookalike, mark)


def test_a_batch_item_that_filters_on_a_masked_property_refuses_the_batch(gateway, lookalike, reader, monkeypatch):
    use_proxy(monkeypatch, gateway)
    mark = marker()
    body = {"requests": [
        {"id": "names", "method": "GET", "url": f"/users?$select=displayName&m={mark}"},
        {"id": "oracle", "method": "GET", "url": f"users?$filter=startswith(mail,'adel')&$select=id&m={mark}"},
    ]}
    r = requests.post(f"{GRAPH}/v1.0/$batch", json=body, headers=reader, timeout=30)
    assert r.status_code == 403, r.text
    assert "'mail'" in r.json()["error"]["message"]
    assert not reached_graph(lookalike, mark)


def test_filters_sorts_and_searches_on_unmasked_properties_still_work(gateway, lookalike, reader, monkeypatch):
    use_proxy(monkeypatch, gateway)
    r = requests.get(f"{GRAPH}/v1.0/users?$filter=startswith(displayName,'Adele')&$select=displayName,mail",
                     headers=reader, timeout=30)
    assert r.status_code == 200, r.text
    assert [u["displayName"] for u in r.json()["value"]] == ["Adele Vance"]
    assert r.json()["value"][0]["mail"] == "[masked]"
    ordered = requests.get(f"{GRAPH}/v1.0/users?$orderby=displayName desc&$select=displayName", headers=reader,
                           timeout=30)
    names = [u["displayName"] for u in ordered.json()["value"]]
    assert names == sorted(names, reverse=True) and len(names) == 5
    searched = requests.get(f'{GRAPH}/v1.0/users?$search="displayName:megan"&$select=displayName',
                            headers={**reader, "ConsistencyLevel": "eventual"}, timeout=30)
    assert searched.status_code == 200 and json.loads(searched.text)["value"] == [{"displayName": "Megan Bowen"}]
