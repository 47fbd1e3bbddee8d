"""Mask profiles through the real gateway process and the Graph look-alike: styles (redact,
partial, keyed pseudonyms), JSON paths and detectors on a users list and its pages, on every
Content-Encoding, inside a $batch, on an addPassword answer, and on a text (CSV) report; and a
gateway that refuses to start without its pseudonym key."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import requests
from mitmproxy import io
from mitmproxy.net import encoding

from nhi_gateway.lookalike.directory import TENANT_DOMAIN

from ..support.e2e import GRAPH, marker, reached_graph, use_proxy
from ..support.policies import TOKEN_ENDPOINT_RULE
from .conftest import example_head, gateway_running

KEY_ENV = "NHI_E2E_MASK_KEY"
KEY = "e2e-pseudonym-key-do-not-log-0123456789abcdef"
ADELE = f"AdeleV@{TENANT_DOMAIN}"
PSEUDONYM = re.compile(r"pseudonym:[0-9a-f]{16}")
PARTIAL_MAIL = re.compile(r"[^@\s\",]\*\*\*@[A-Za-z0-9.-]+")


def masking_policy() -> str:
    """The example's identity and upstreams, with profiles that use every kind of matcher."""
    return example_head() + f"""
masking:
  pseudonym_key_env: {KEY_ENV}
  profiles:
    directory-pii:
      fields: {{mail: partial, userPrincipalName: pseudonym, mobilePhone: redact, businessPhones: redact,
               faxNumber: redact, streetAddress: redact, employeeId: pseudonym}}
      paths:
        "$.value[*].identities[*].issuerAssignedId": redact
        "$..onPremisesImmutableId": redact
      detectors: {{email: partial, phone: redact, graph_secret: redact}}
    app-secrets:
      fields: {{secretText: redact, hint: partial}}
      detectors: {{graph_secret: partial, high_entropy: redact}}

rules:
""" + TOKEN_ENDPOINT_RULE + """\
  - id: directory-read
    action: allow
    when: {app_ids: [{mcp}]}
    operations:
      - host: graph.microsoft.com
        methods: [GET]
        paths: ["/users/**", "/groups/**", "/reports/**"]
    mask: directory-pii
  - id: rotate-secrets
    action: allow
    when: {app_ids: [{bot}]}
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/applications/{id}/addPassword"]
    mask: app-secrets
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory, lookalike):
    work = tmp_path_factory.mktemp("masking-gateway")
    policy = work / "masking.yaml"
    policy.write_text(masking_policy().replace("{mcp}", lookalike.app("mcp-directory")["client_id"])
                      .replace("{bot}", lookalike.app("rotation-bot")["client_id"]))
    with gateway_running(work, lookalike, policy=policy, env={KEY_ENV: KEY}) as gateway:
        gateway.extra["policy"] = policy
        yield gateway


@pytest.fixture
def reader(gw, lookalike, tokens, monkeypatch) -> dict:
    use_proxy(monkeypatch, gw)
    return {"Authorization": f"Bearer {tokens()}"}


def get(url: str, headers: dict, **kw) -> requests.Response:
    r = requests.get(url, headers=headers, timeout=30, **kw)
    assert r.status_code == 200, r.text
    return r


def assert_user_masked(user: dict) -> None:
    assert PARTIAL_MAIL.fullmatch(user["mail"]), user["mail"]
    assert PSEUDONYM.fullmatch(user["userPrincipalName"]), user["userPrincipalName"]
    assert user.get("mobilePhone") in ("[masked]", None)  # a string stays a string, null stays null
    assert all(p == "[masked]" for p in user.get("businessPhones", []))
    assert all(i["issuerAssignedId"] == "[masked]" for i in user.get("identities", []))
    assert all(a.startswith("SMTP:") and "***@" in a for a in user.get("proxyAddresses", []))  # the detector
    assert "***" not in user["displayName"] and "[masked]" not in user["displayName"]


def test_users_list_is_masked_by_style_path_and_detector(gw, lookalike, reader):
    mark = marker()
    r = get(f"{GRAPH}/beta/users?m={mark}", reader)
    users = r.json()["value"]
    assert len(users) == 5 and reached_graph(lookalike, mark)
    for user in users:
        assert_user_masked(user)
    adele = next(u for u in users if u["displayName"] == "Adele Vance")
    assert adele["mail"] == "A***@nhilab.onmicrosoft.com"
    assert adele["otherMails"] == ["a***@example.com"]  # no field names it: the e-mail detector did
    assert adele["mobilePhone"] == "[masked]" and adele["businessPhones"] == ["[masked]"]
    assert adele["onPremisesImmutableId"] == "[masked]"  # by the path $..onPremisesImmutableId
    assert adele["onPremisesSecurityIdentifier"].startswith("S-1-5-21-")  # not listed, not a detector's shape
    assert adele["createdDateTime"] == "2024-03-14T09:26:53Z" and adele["postalCode"] == "98004"
    assert ADELE.lower() not in r.text.lower() and "555 01" not in r.text

    # Pseudonyms are stable: the same user gets the same token in the next answer.
    again = get(f"{GRAPH}/v1.0/users/{adele['id']}?$select=id,userPrincipalName,employeeId", reader).json()
    assert again["userPrincipalName"] == adele["userPrincipalName"]
    assert again["employeeId"] == adele["employeeId"] and PSEUDONYM.fullmatch(again["employeeId"])


def json_type(value) -> str:
    return {str: "string", list: "array", dict: "object", type(None): "null"}.get(type(value), "other")


@pytest.mark.parametrize("client", ["requests", "httpx"])
def test_masked_answers_keep_json_types_for_typed_clients(gw, lookalike, reader, client):
    """What typed clients (msgraph-sdk's models) rely on: every masked member keeps the JSON type
    Graph gave it (businessPhones a list of strings, mobilePhone a string or null), with none of
    the original values left."""
    import httpx

    mark = marker()
    url = f"{GRAPH}/beta/users?m={mark}"
    if client == "requests":
        r = requests.get(url, headers=reader, timeout=30)
    else:
        with httpx.Client(trust_env=True, timeout=30) as c:  # HTTPS_PROXY and SSL_CERT_FILE, as users set them
            r = c.get(url, headers=reader)
    assert r.status_code == 200, r.text
    assert reached_graph(lookalike, mark)
    from nhi_gateway.lookalike.directory import _seed_users

    originals = {u["id"]: u for u in _seed_users()}
    masked_members = ("mail", "userPrincipalName", "mobilePhone", "businessPhones", "faxNumber", "streetAddress",
                      "employeeId", "identities", "onPremisesImmutableId")
    for user in r.json()["value"]:
        original = originals[user["id"]]
        for name in masked_members:
            assert json_type(user[name]) == json_type(original[name]), (name, user[name], original[name])
        assert len(user["businessPhones"]) == len(original["businessPhones"])
        assert all(isinstance(p, str) and p == "[masked]" for p in user["businessPhones"])
        assert [sorted(i) for i in user["identities"]] == [sorted(i) for i in original["identities"]]
        assert user["accountEnabled"] is True  # not masked: untouched
        secrets = [original[n] for n in masked_members if n != "identities"]
        secrets += [i["issuerAssignedId"] for i in original["identities"]]
        for value in secrets:
            for leaf in value if isinstance(value, list) else [value]:
                assert leaf is None or leaf.lower() not in r.text.lower(), leaf


def test_pages_are_masked_and_next_links_still_lead_on(gw, lookalike, reader):
    page = get(f"{GRAPH}/v1.0/users?$top=2", reader).json()
    seen = []
    while True:
        seen += page["value"]
        for user in page["value"]:
            assert_user_masked(user)
        link = page.get("@odata.nextLink")
        if not link:
            break
        assert link.startswith(f"{GRAPH}/v1.0/users?") and "$skiptoken=" in link and "[masked]" not in link
        page = get(link, reader).json()
    assert len(seen) == 5 and len({u["id"] for u in seen}) == 5


@pytest.mark.parametrize("content_encoding", ["gzip", "br", "zstd", "deflate"])
def test_every_content_encoding_is_masked_and_kept(gw, lookalike, reader, content_encoding):
    r = requests.get(f"{GRAPH}/v1.0/users", headers={**reader, "Accept-Encoding": content_encoding},
                     timeout=30, stream=True)
    raw = r.raw.read(decode_content=False)
    assert r.status_code == 200
    assert r.headers["Content-Encoding"] == content_encoding  # the look-alike sent it, the gateway kept it
    assert int(r.headers["Content-Length"]) == len(raw)
    body = json.loads(encoding.decode(raw, content_encoding))
    for user in body["value"]:
        assert_user_masked(user)
    assert ADELE.lower().encode() not in encoding.decode(raw, content_encoding).lower()


def test_batch_inner_bodies_are_masked_like_requests_sent_alone(gw, lookalike, reader):
    alone = get(f"{GRAPH}/v1.0/users('{ADELE}')", reader).json()
    body = {"requests": [
        {"id": "users", "method": "GET", "url": "/users?$top=3"},
        {"id": "adele", "method": "GET", "url": f"users('{ADELE}')"},
        {"id": "report", "method": "GET", "url": "reports/getOffice365ActiveUserDetail(period='D7')"},
    ]}
    r = requests.post(f"{GRAPH}/v1.0/$batch", json=body, headers=reader, timeout=30)
    assert r.status_code == 200, r.text
    out = {x["id"]: x for x in r.json()["responses"]}
    for user in out["users"]["body"]["value"]:
        assert_user_masked(user)
    adele = out["adele"]["body"]
    assert_user_masked(adele)
    assert adele["userPrincipalName"] == alone["userPrincipalName"]  # one deployment, one pseudonym
    assert adele["mail"] == alone["mail"] == "A***@nhilab.onmicrosoft.com"
    assert ADELE.lower() not in r.text.lower()


def test_text_report_is_scanned_by_the_detectors(gw, lookalike, reader):
    mark = marker()
    r = get(f"{GRAPH}/v1.0/reports/getOffice365ActiveUserDetail(period='D7')?m={mark}", reader)
    assert r.headers["Content-Type"].startswith("text/csv") and reached_graph(lookalike, mark)
    header, *rows = r.text.strip().splitlines()
    assert header.startswith("Report Refresh Date,User Principal Name,Display Name")
    assert len(rows) == 5
    adele = next(row.split(",") for row in rows if "Adele Vance" in row)
    assert adele[1] == "A***@nhilab.onmicrosoft.com" and adele[5] == "[masked]"
    assert "@nhilab.onmicrosoft.com" in r.text and ADELE.lower() not in r.text.lower()
    assert "555 0109" not in r.text
    line = next(a for a in gw.audit() if mark in a["url"])
    assert line["masked_fields"] == 5 + 4  # five addresses and four phone numbers


def test_add_password_answer_never_shows_the_secret(gw, lookalike, tokens, monkeypatch):
    use_proxy(monkeypatch, gw)
    bot = lookalike.app("rotation-bot")
    token = tokens(app_id=bot["client_id"], object_id=bot["object_id"], display_name="rotation-bot",
                   roles=tuple(bot["roles"]))
    app_id = lookalike.app("mcp-directory")["application_object_id"]
    mark = marker()
    r = requests.post(f"{GRAPH}/v1.0/applications/{app_id}/addPassword?m={mark}",
                      json={"passwordCredential": {"displayName": f"rotated {mark}"}},
                      headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["secretText"] == "[masked]"
    assert answer["hint"] == "***"  # partial of a three-character hint keeps nothing of it
    # secretText is named twice (a field: redact; graph_secret by name: partial): the strongest wins.
    assert answer["displayName"] == f"rotated {mark}" and answer["keyId"]
    # The look-alike keeps the secret it minted: it must be nowhere the gateway wrote.
    stored = json.loads((lookalike.state_dir / "directory" / "clients.json").read_text())
    secret = next(p["secret"] for p in stored["mcp-directory"]["passwords"] if p["display_name"] == f"rotated {mark}")
    written = b"".join(f.read_bytes() for f in gw.recording_files()) + gw.log.read_bytes() \
        + (gw.recordings / "audit.jsonl").read_bytes()
    assert secret not in r.text and secret.encode() not in written and secret[:8].encode() not in written
    flows = []
    for path in gw.recording_files():
        with open(path, "rb") as f:
            flows += [fl for fl in io.FlowReader(f).stream() if mark in fl.request.path]
    assert len(flows) == 1
    # Masked for the client, and redacted again by the recorder's own credential redaction.
    assert json.loads(flows[0].response.content)["secretText"] in ("[masked]", "[redacted]")


def test_the_key_is_never_in_the_log_the_audit_or_the_recordings(gw, lookalike, reader):
    get(f"{GRAPH}/v1.0/users", reader)
    written = b"".join(f.read_bytes() for f in gw.recording_files()) + gw.log.read_bytes() \
        + (gw.recordings / "audit.jsonl").read_bytes()
    assert KEY.encode() not in written


@pytest.mark.parametrize(("env", "words"), [
    ({}, f"environment variable {KEY_ENV} is not set"),
    ({KEY_ENV: "short-key"}, "is 9 bytes long"),
])
def test_the_gateway_refuses_to_start_without_its_pseudonym_key(gw, tmp_path, env, words):
    clean = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    out = subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", "run", "--policy", str(gw.extra["policy"]),
                          "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "c")],
                         capture_output=True, text=True, timeout=60, env={**clean, **env})
    assert out.returncode == 2, out.stdout + out.stderr
    line = next(i for i, text in enumerate(gw.extra["policy"].read_text().splitlines(), 1)
                if text.startswith("  pseudonym_key_env"))
    assert f"masking.yaml:{line}:" in out.stderr and words in out.stderr
    assert "short-key" not in out.stderr and KEY not in out.stderr
