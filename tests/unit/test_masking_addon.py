"""The masking addon on real mitmproxy flows: every Content-Encoding mitmproxy speaks, text and
binary bodies, $batch inner bodies, and what is refused (502) instead of being passed on."""

from __future__ import annotations

import base64
import json
import logging

import pytest
from mitmproxy.net import encoding
from mitmproxy.test import tflow

from nhi_gateway.policy.decision import REFUSED_KEY, decision_of, set_decision
from nhi_gateway.addons.masking import Masking
from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.masking.masks import MASK
from nhi_gateway.policy.loader import PolicyStore, parse_policy

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
KEY = "addon-test-pseudonym-key-0123456789"
POLICY = f"""\
version: 1
identity:
  tenants: [{TENANT}]
  audiences: [https://graph.microsoft.com]
  issuers: ["https://login.microsoftonline.com/{{tenantid}}/v2.0"]
upstreams: [{{host: graph.microsoft.com}}]
masking:
  pseudonym_key_env: NHI_MASK_KEY
  profiles:
    pii:
      fields: {{mail: redact, userPrincipalName: pseudonym}}
      detectors: {{email: partial, phone: redact}}
    fields-only:
      fields: [mail]
    photos:
      detectors: [email]
      binary: pass
"""
MAIL = "adele.vance@contoso.com"
USERS = {"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users",
         "value": [{"id": "1", "mail": MAIL, "userPrincipalName": "AdeleV@contoso.com",
                    "aboutMe": "ring +1 425 555 0109 or write adele@example.com"}]}


@pytest.fixture
def addon() -> Masking:
    return Masking(PolicyStore(parse_policy(POLICY, "policy.yaml", environ={"NHI_MASK_KEY": KEY})))


def allowed_flow(body: bytes, content_type: str | None = "application/json", content_encoding: str | None = None,
                 profile: str = "pii", extra: dict | None = None):
    f = tflow.tflow(resp=True)
    f.response.headers.clear()
    if content_type is not None:
        f.response.headers["Content-Type"] = content_type
    if content_encoding:
        f.response.headers["Content-Encoding"] = content_encoding
        f.response.raw_content = encoding.encode(body, content_encoding)
    else:
        f.response.raw_content = body
    f.response.headers["Content-Length"] = str(len(f.response.raw_content))
    set_decision(f, Decision(action=Action.ALLOW, stage=Stage.POLICY, reason="allowed", rule_id="r",
                             mask_profile=profile, extra=extra or {}))
    return f


def refused(f) -> dict:
    assert f.metadata.get(REFUSED_KEY) is True
    assert f.response.status_code == 502
    d = decision_of(f)
    assert (d.stage, d.check, d.rule_id) == (Stage.MASKING, "masking", "r")
    return json.loads(f.response.content)["error"]


@pytest.mark.parametrize("content_encoding", [None, "identity", "gzip", "br", "zstd", "deflate"])
def test_every_encoding_is_masked_and_keeps_its_content_encoding(addon, content_encoding):
    f = allowed_flow(json.dumps(USERS).encode(), content_encoding=content_encoding)
    if content_encoding not in (None, "identity", "br"):  # brotli stores small bodies as they are
        assert MAIL.encode() not in f.response.raw_content  # really compressed on the wire
    addon.response(f)
    assert f.response.status_code == 200 and not f.metadata.get(REFUSED_KEY)
    assert f.response.headers.get("Content-Encoding") == content_encoding
    raw = f.response.raw_content
    assert int(f.response.headers["Content-Length"]) == len(raw)
    plain = encoding.decode(raw, content_encoding) if content_encoding else raw  # what a client decodes
    user = json.loads(plain)["value"][0]
    assert user["mail"] == MASK and user["userPrincipalName"].startswith("pseudonym:")
    assert user["aboutMe"] == f"ring {MASK} or write a***@example.com"
    assert MAIL.encode() not in plain and b"AdeleV" not in plain
    assert decision_of(f).extra["masked_fields"] == 4


@pytest.mark.parametrize("content_encoding", ["gzip", "br", "zstd", "deflate"])
def test_a_body_that_does_not_decode_is_withheld(addon, content_encoding):
    f = allowed_flow(b"", content_encoding=None)
    f.response.headers["Content-Encoding"] = content_encoding
    f.response.raw_content = b"not " + content_encoding.encode() + b": " + MAIL.encode()
    addon.response(f)
    assert "could not be masked" in refused(f)["message"]
    assert MAIL.encode() not in f.response.content


@pytest.mark.parametrize("content_encoding", ["compress", "x-unknown", "utf-8", "gzip, br"])
def test_an_unknown_content_encoding_is_withheld(addon, content_encoding):
    f = allowed_flow(json.dumps(USERS).encode())
    f.response.headers["Content-Encoding"] = content_encoding
    addon.response(f)
    refused(f)
    assert MAIL.encode() not in f.response.content


@pytest.mark.parametrize("content_encoding", [None, "gzip", "br", "zstd", "deflate"])
def test_text_bodies_are_scanned_in_every_encoding(addon, content_encoding):
    text = f"User Principal Name,Phone\n{MAIL},+1 425 555 0109\n".encode()
    f = allowed_flow(text, "text/csv; charset=utf-8", content_encoding)
    addon.response(f)
    assert f.response.headers.get("Content-Encoding") == content_encoding
    assert f.response.get_content() == f"User Principal Name,Phone\na***@contoso.com,{MASK}\n".encode()
    assert decision_of(f).extra["masked_fields"] == 2


@pytest.mark.parametrize(("body", "content_type", "profile", "words"), [
    (b'{"mail": "' + MAIL.encode() + b'"', "application/json", "pii", "not valid JSON"),
    (MAIL.encode() + b" \xff\xfe", "text/plain", "pii", "not valid utf-8"),
    (MAIL.encode() + b" \xff\xfe", "application/xml; charset=utf-8", "pii", "not valid utf-8"),
    (b"\x89PNG\r\n\x1a\n" + MAIL.encode(), "image/png", "pii", "binary: pass"),
    (b"\x00\x01" + MAIL.encode(), None, "pii", "cannot be scanned"),
    (b'{"mail": "' + MAIL.encode() + b'", "x": NaN}', None, "fields-only", "not valid JSON"),
])
def test_bodies_that_cannot_be_masked_are_withheld(addon, body, content_type, profile, words):
    f = allowed_flow(body, content_type, "gzip", profile=profile)
    addon.response(f)
    assert words in refused(f)["message"]
    assert MAIL.encode() not in f.response.content


@pytest.mark.parametrize(("content_type", "profile"), [
    ("image/jpeg", "fields-only"),  # nothing a field can name is in a photo
    ("image/jpeg", "photos"),  # detectors, but the profile lets binary bodies pass
    ("application/octet-stream", "fields-only"),
    ("text/plain", "fields-only"),  # no detectors: text is not even decoded
])
def test_bodies_the_profile_cannot_change_pass_byte_for_byte(addon, content_type, profile):
    f = allowed_flow(b"\xff\xd8\xff\xe0 " + MAIL.encode() + b" \xff", content_type, "gzip", profile=profile)
    raw = f.response.raw_content
    addon.response(f)
    assert f.response.raw_content is raw and f.response.status_code == 200
    assert "masked_fields" not in decision_of(f).extra


def test_untyped_bodies_are_sniffed(addon):
    f = allowed_flow(json.dumps(USERS).encode(), None, "br", profile="fields-only")
    addon.response(f)
    assert json.loads(f.response.get_content())["value"][0]["mail"] == MASK
    g = allowed_flow(f"write to {MAIL}".encode(), None, None)
    addon.response(g)
    assert g.response.content == b"write to a***@contoso.com"


def test_the_pseudonym_key_is_never_logged_or_recorded(addon, caplog):
    with caplog.at_level(logging.DEBUG):
        f = allowed_flow(json.dumps(USERS).encode())
        addon.response(f)
        bad = allowed_flow(b"\x00" + MAIL.encode(), None)
        addon.response(bad)  # a refusal writes a warning
    assert caplog.text and KEY not in caplog.text
    assert KEY.encode() not in f.response.content + bad.response.content
    assert KEY not in json.dumps(f.metadata, default=str) + json.dumps(bad.metadata, default=str)


# --- $batch ---------------------------------------------------------------------------------------


def batch_flow(responses: list[dict], content_encoding: str | None = "gzip", profiles=("pii", "fields-only", None)):
    entries = [{"id": str(i + 1), "index": i, "mask_profile": p or ""} for i, p in enumerate(profiles)]
    return allowed_flow(json.dumps({"responses": responses}).encode(), "application/json", content_encoding,
                        profile="", extra={"batch": entries})


def inner(rid: str, body, content_type="application/json", status=200) -> dict:
    return {"id": rid, "status": status, "headers": {"Content-Type": content_type}, "body": body}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_each_inner_body_by_its_own_profile_text_included(addon):
    csv = f"upn,phone\n{MAIL},+1 425 555 0109\n".encode()
    f = batch_flow([inner("1", USERS), inner("2", b64(csv), "text/csv"), inner("3", USERS)])
    addon.response(f)
    assert f.response.status_code == 200, f.response.content
    assert f.response.headers["Content-Encoding"] == "gzip"
    out = {r["id"]: r["body"] for r in json.loads(f.response.get_content())["responses"]}
    assert out["1"]["value"][0]["mail"] == MASK and out["1"]["value"][0]["userPrincipalName"].startswith("pseudonym:")
    assert base64.b64decode(out["2"]) == csv  # fields-only: text bodies are not scanned
    assert out["3"] == USERS  # no profile
    entries = {e["id"]: e for e in decision_of(f).extra["batch"]}
    assert (entries["1"]["masked_fields"], entries["2"]["masked_fields"], entries["3"]["masked_fields"]) == (4, 0, 0)


def test_an_inner_text_body_is_scanned_by_an_inner_profile_with_detectors(addon):
    csv = f"upn\n{MAIL}\n".encode()
    f = batch_flow([inner("1", b64(csv), "text/csv; charset=utf-8")], profiles=("pii",))
    addon.response(f)
    body = json.loads(f.response.get_content())["responses"][0]["body"]
    assert base64.b64decode(body) == b"upn\na***@contoso.com\n"


@pytest.mark.parametrize(("body", "content_type"), [
    (b64(b"\x89PNG\r\n\x1a\n" + MAIL.encode()), "image/png"),
    (b64(MAIL.encode() + b"\xff"), "text/plain"),
    (b64(b'{"mail": '), "application/json"),
])
def test_an_inner_body_that_cannot_be_masked_withholds_the_batch(addon, body, content_type):
    f = batch_flow([inner("1", body, content_type)], profiles=("pii",))
    addon.response(f)
    assert "could not be masked" in refused(f)["message"]
