"""Masking reads the body, not its label, and masks a property by its name wherever it is asked
for: through the real gateway and a Graph look-alike that misbehaves on request (see
:mod:`nhi_gateway.lookalike.server`): JSON labelled text/plain, octet-stream or x-json, two
Content-Type headers, an address in a response header, a body in another charset, a body the
profile cannot read, and property paths (``/users/{id}/mobilePhone`` and its ``/$value``)."""

from __future__ import annotations

import json

import pytest
import requests

from nhi_gateway.lookalike.directory import TENANT_DOMAIN, _seed_users

from ..support.e2e import GRAPH, marker, reached_graph, use_proxy
from .conftest import example_head, gateway_running

ADELE = f"AdeleV@{TENANT_DOMAIN}"
ADELE_MOBILE = "+1 425 555 0109"
ADELE_PHONE = "+1 425 555 0101"
ADELE_ID = next(u["id"] for u in _seed_users() if u["userPrincipalName"] == ADELE)  # the URL names no address


def fields_only_policy(mcp: str) -> str:
    """The example's identity and upstreams; a profile of fields only (no detectors)."""
    return example_head() + f"""
masking:
  profiles:
    fields-only:
      fields: [mail, userPrincipalName, mobilePhone, businessPhones, otherMails, proxyAddresses,
               issuerAssignedId]

rules:
  - id: directory-read
    action: allow
    when: {{app_ids: [{mcp}]}}
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users/**", "/reports/**"]
    mask: fields-only
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory, lookalike):
    work = tmp_path_factory.mktemp("masking-content-gateway")
    policy = work / "fields-only.yaml"
    policy.write_text(fields_only_policy(lookalike.app("mcp-directory")["client_id"]))
    with gateway_running(work, lookalike, policy=policy) as gateway:
        yield gateway


@pytest.fixture
def reader(gw, lookalike, tokens, monkeypatch) -> dict:
    use_proxy(monkeypatch, gw)
    return {"Authorization": f"Bearer {tokens()}"}


def never_shown(r: requests.Response, *values: str) -> None:
    seen = (r.content + str(r.headers).encode()).lower()
    for value in values:
        assert value.lower().encode() not in seen, value


# --- the body, not its label (issue 18.4) ---------------------------------------------------------


@pytest.mark.parametrize("label", ["text/plain", "application/octet-stream", "application/x-json",
                                   "text/html; charset=utf-8"])
def test_json_under_another_label_is_masked_as_json(gw, lookalike, reader, label):
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users/{ADELE_ID}?m={mark}", timeout=30,
                     headers={**reader, "X-LookAlike-Content-Type": label, "Accept-Encoding": "gzip"})
    assert reached_graph(lookalike, mark)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == label  # the label is left as Graph sent it; the body is masked
    user = json.loads(r.content)
    assert user["mail"] == "[masked]" and user["businessPhones"] == ["[masked]"]
    assert user["displayName"] == "Adele Vance"
    never_shown(r, ADELE, ADELE_MOBILE, ADELE_PHONE)


@pytest.mark.parametrize("labels", [["application/json", "application/json"], ["text/plain", "application/json"]])
def test_two_content_types_are_withheld(gw, lookalike, reader, labels):
    import httpx

    mark = marker()
    with httpx.Client(trust_env=True, timeout=30) as client:  # requests cannot repeat a request header
        r = client.get(f"{GRAPH}/v1.0/users/{ADELE_ID}?m={mark}",
                       headers=[*reader.items(), *(("X-LookAlike-Content-Type", v) for v in labels)])
    assert reached_graph(lookalike, mark)
    assert r.status_code == 502 and "Content-Type" in r.json()["error"]["message"]
    assert ADELE.lower().encode() not in r.content.lower() and ADELE_MOBILE.encode() not in r.content
    assert next(a for a in gw.audit() if mark in a["url"])["status"] == 502


def test_response_headers_are_masked_with_the_body(gw, lookalike, reader):
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users/{ADELE_ID}?m={mark}", timeout=30,
                     headers={**reader, "X-LookAlike-Header": f"X-Owner: owner is {ADELE.upper()}"})
    assert r.status_code == 200 and reached_graph(lookalike, mark)
    assert r.headers["X-Owner"] == "owner is [masked]"
    never_shown(r, ADELE)


@pytest.mark.parametrize("charset", ["utf-16", "iso-8859-1"])
def test_the_declared_charset_is_kept(gw, lookalike, reader, charset):
    r = requests.get(f"{GRAPH}/v1.0/users/{ADELE_ID}", timeout=30, headers={**reader, "X-LookAlike-Charset": charset})
    assert r.status_code == 200, r.text
    assert f"charset={charset}" in r.headers["Content-Type"]
    user = json.loads(r.content.decode(charset))
    assert user["mail"] == "[masked]" and user["displayName"] == "Adele Vance"
    assert ADELE.encode(charset) not in r.content and ADELE.encode() not in r.content


def test_a_body_the_profile_cannot_read_is_withheld(gw, lookalike, reader):
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/reports/getOffice365ActiveUserDetail(period='D7')?m={mark}", timeout=30,
                     headers=reader)
    assert reached_graph(lookalike, mark)  # Graph answered a CSV of addresses; no field can be found in it
    assert r.status_code == 502 and "binary: pass" in r.json()["error"]["message"]
    never_shown(r, ADELE, ADELE_MOBILE)


# --- property paths (issue 18.5) ------------------------------------------------------------------


@pytest.mark.parametrize(("prop", "expected"), [
    ("mobilePhone", "[masked]"), ("MOBILEPHONE", "[masked]"), ("businessPhones", ["[masked]"]), ("mail", "[masked]"),
])
def test_a_property_path_is_masked_by_the_propertys_name(gw, lookalike, reader, prop, expected):
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users/{ADELE_ID}/{prop}?m={mark}", headers=reader, timeout=30)
    assert reached_graph(lookalike, mark)
    assert r.status_code == 200, r.text
    assert r.json()["value"] == expected
    never_shown(r, ADELE, ADELE_MOBILE, ADELE_PHONE)


@pytest.mark.parametrize("prop", ["mobilePhone", "mail", "MobilePhone"])
def test_a_raw_property_value_is_masked_by_the_propertys_name(gw, lookalike, reader, prop):
    mark = marker()
    r = requests.get(f"{GRAPH}/v1.0/users('{ADELE_ID}')/{prop}/$value?m={mark}", headers=reader, timeout=30)
    assert reached_graph(lookalike, mark)
    assert r.status_code == 200, r.text
    assert r.text == "[masked]" and r.headers["Content-Type"].startswith("text/plain")
    never_shown(r, ADELE, ADELE_MOBILE)


def test_an_unmasked_property_path_is_answered_as_it_is(gw, lookalike, reader):
    r = requests.get(f"{GRAPH}/v1.0/users/{ADELE_ID}/displayName", headers=reader, timeout=30)
    assert r.status_code == 200 and r.json()["value"] == "Adele Vance"
    # Raw text of a property that no field names: nothing to find in it for a profile of fields.
    raw = requests.get(f"{GRAPH}/v1.0/users/{ADELE_ID}/jobTitle/$value", headers=reader, timeout=30)
    assert raw.status_code == 502 and "binary: pass" in raw.json()["error"]["message"]
