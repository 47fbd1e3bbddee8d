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

from ..support.policies import policy_head

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
KEY = "addon-test-pseudonym-key-0123456789"
POLICY = policy_head(TENANT) + """\
masking:
  pseudonym_key_env: NHI_MASK_KEY
  profiles:
    pii:
      fields: {mail: redact, userPrincipalName: pseudonym}
      detectors: {email: partial, phone: redact}
    fields-only:
      fields: [mail]
    fields-pass:
      fields: [mail]
      binary: pass
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
    ("image/jpeg", "photos"),  # detectors, but the profile lets binary bodies pass
    ("image/jpeg", "fields-pass"),
    ("application/octet-stream", "fields-pass"),
    ("text/plain", "fields-pass"),  # no detectors and binary: pass: text is let through as it is
])
def test_bodies_the_profile_cannot_change_pass_byte_for_byte(addon, content_type, profile):
    f = allowed_flow(b"\xff\xd8\xff\xe0 " + MAIL.encode() + b" \xff", content_type, "gzip", profile=profile)
    raw = f.response.raw_content
    addon.response(f)
    assert f.response.raw_content is raw and f.response.status_code == 200
    assert "masked_fields" not in decision_of(f).extra


# --- masking reads the body, not its label (issue 18.4) -------------------------------------------


@pytest.mark.parametrize("content_type", [
    "application/octet-stream", "text/plain", "text/plain; charset=utf-8", "application/x-json", "text/html",
    "image/png", "application/x-www-form-urlencoded", None,
])
@pytest.mark.parametrize("profile", ["fields-only", "fields-pass", "pii"])
def test_json_is_masked_as_json_whatever_its_label_says(addon, content_type, profile):
    f = allowed_flow(b"  " + json.dumps(USERS).encode(), content_type, "gzip", profile=profile)
    addon.response(f)
    assert f.response.status_code == 200, f.response.content
    assert json.loads(f.response.get_content())["value"][0]["mail"] == MASK
    assert MAIL.encode() not in f.response.get_content()


@pytest.mark.parametrize("content_types", [
    ["application/json", "application/json"],
    ["text/plain", "application/json"],
    ["application/json, text/plain"],
])
def test_duplicate_or_conflicting_content_types_are_withheld(addon, content_types):
    f = allowed_flow(json.dumps(USERS).encode(), None, profile="fields-only")
    for value in content_types:
        f.response.headers.add("Content-Type", value)
    addon.response(f)
    assert "Content-Type" in refused(f)["message"]
    assert MAIL.encode() not in f.response.content


@pytest.mark.parametrize(("body", "content_type"), [
    (f"mail: {MAIL}".encode(), "text/plain"),
    (b"\x89PNG\r\n\x1a\n" + MAIL.encode(), "image/png"),
    (b"\x00\x01" + MAIL.encode(), "application/octet-stream"),
    (f"mail: {MAIL}".encode(), None),
])
def test_a_profile_refuses_bodies_it_cannot_read(addon, body, content_type):
    f = allowed_flow(body, content_type, profile="fields-only")
    addon.response(f)
    assert "binary: pass" in refused(f)["message"]
    assert MAIL.encode() not in f.response.content


def test_response_headers_are_masked_by_detectors_and_by_masked_values(addon):
    f = allowed_flow(json.dumps(USERS).encode(), profile="pii")
    f.response.headers["X-Owner"] = f"owner {MAIL.upper()}"
    f.response.headers["Location"] = "https://graph.microsoft.com/v1.0/users/AdeleV%40contoso.com"
    f.response.headers["X-Phone"] = "+1 425 555 0109"
    f.response.headers["request-id"] = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
    addon.response(f)
    assert f.response.status_code == 200
    assert f.response.headers["X-Owner"] == f"owner {MASK}"
    assert "AdeleV" not in f.response.headers["Location"]  # the pseudonymised userPrincipalName, percent-encoded
    assert f.response.headers["X-Phone"] == MASK
    assert f.response.headers["request-id"] == "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
    # A profile without detectors masks the values it masked in the body wherever a header repeats them.
    g = allowed_flow(json.dumps(USERS).encode(), profile="fields-only")
    g.response.headers["X-Owner"] = MAIL
    addon.response(g)
    assert g.response.headers["X-Owner"] == MASK and MAIL not in str(g.response.headers)


def test_headers_are_masked_on_answers_without_a_body(addon):
    f = allowed_flow(b"", None, profile="pii")
    f.response.status_code = 201
    f.response.headers["Location"] = f"https://graph.microsoft.com/v1.0/users('{MAIL}')"
    addon.response(f)
    assert MAIL not in f.response.headers["Location"]


def test_a_masked_value_in_a_framing_header_withholds_the_answer(addon):
    f = allowed_flow(json.dumps(USERS).encode(), "application/json; x-owner=" + MAIL, profile="fields-only")
    addon.response(f)
    refused(f)
    assert MAIL.encode() not in f.response.content


@pytest.mark.parametrize("charset", ["iso-8859-1", "utf-16", "windows-1252", "utf-8"])
def test_the_declared_charset_is_kept(addon, charset):
    doc = {"value": [{"displayName": "J\u00e9r\u00f4me", "mail": MAIL}]}
    text = json.dumps(doc, ensure_ascii=False)
    f = allowed_flow(text.encode(charset), f"application/json; charset={charset}", "gzip", profile="fields-only")
    addon.response(f)
    assert f.response.status_code == 200, f.response.content
    assert charset in f.response.headers["Content-Type"]
    out = json.loads(f.response.get_content().decode(charset))
    assert out["value"][0] == {"displayName": "J\u00e9r\u00f4me", "mail": MASK}


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
    f = batch_flow([inner("1", USERS), inner("2", b64(csv), "text/csv"), inner("3", USERS)],
                   profiles=("pii", "fields-pass", None))
    addon.response(f)
    assert f.response.status_code == 200, f.response.content
    assert f.response.headers["Content-Encoding"] == "gzip"
    out = {r["id"]: r["body"] for r in json.loads(f.response.get_content())["responses"]}
    assert out["1"]["value"][0]["mail"] == MASK and out["1"]["value"][0]["userPrincipalName"].startswith("pseudonym:")
    assert base64.b64decode(out["2"]) == csv  # no detectors and binary: pass: text bodies are not scanned
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


def test_batch_headers_inner_and_outer_are_masked_and_json_in_text_is_masked_as_json(addon):
    item = inner("1", b64(json.dumps(USERS).encode()), "text/plain")
    item["headers"]["X-Owner"] = MAIL
    f = batch_flow([item], profiles=("fields-only",))
    f.response.headers["X-Owner"] = f"owner: {MAIL}"
    addon.response(f)
    assert f.response.status_code == 200, f.response.content
    answer = json.loads(f.response.get_content())["responses"][0]
    assert answer["headers"]["X-Owner"] == MASK
    assert json.loads(base64.b64decode(answer["body"]))["value"][0]["mail"] == MASK
    assert f.response.headers["X-Owner"] == f"owner: {MASK}"
    assert MAIL.encode() not in f.response.get_content()


def test_a_batch_answer_with_two_content_types_is_withheld(addon):
    f = batch_flow([inner("1", USERS)], profiles=("fields-only",))
    f.response.headers.add("Content-Type", "text/plain")
    addon.response(f)
    assert "Content-Type" in refused(f)["message"]
