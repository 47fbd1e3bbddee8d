"""Mask profiles: detectors, styles, JSON paths and bodies of every type, without a proxy.

The detector tables hold true positives and the look-alikes that must pass untouched (GUIDs, ISO
dates, OData contexts, display names); the look-alike tenant's seeded directory is the
false-positive benchmark of the high-entropy detector. The properties at the end hold for any
JSON document: a listed member never leaves unmasked, and the output is always JSON.
"""

from __future__ import annotations

import base64
import json
import logging
import pickle
import random
import re
import secrets
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nhi_gateway.lookalike.directory import Directory
from nhi_gateway.masking import masks
from nhi_gateway.masking.masks import (
    ENTROPY_MIN_LENGTH,
    MASK,
    MAX_DEPTH,
    PSEUDONYM_PREFIX,
    BinaryBodies,
    Detector,
    JSONPathError,
    MaskingError,
    MaskProfile,
    PseudonymKey,
    Style,
    body_kind,
    combine,
    compile_path,
    is_high_entropy,
    mask_body,
    property_of,
    mask_document,
    mask_json_bytes,
    partial,
    shannon_entropy,
    sniff,
)

from ..support.masking import leaves, redacted

KEY = PseudonymKey(b"k" * 32, "$TEST_KEY")
OTHER_KEY = PseudonymKey(b"o" * 32, "$OTHER_KEY")
SECRET = "abc8Q~" + "x7Yz0" * 6 + "Ab12"  # Entra's shape: 40 characters, "Q~" at offset 4
JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6IkpZaEFjVFBNWl9MWDZEQmxPV1E3SG4wTmVYRSJ9."
       "eyJhdWQiOiJodHRwczovL2dyYXBoLm1pY3Jvc29mdC5jb20iLCJvaWQiOiIxIn0."
       "c2lnbmF0dXJlLWJ5dGVzLW5vdC1yZWFsbHktcnNh")
DER = base64.b64encode(b"\x30\x82\x03\x21" + bytes(range(256)) * 3).decode()


def scan(detector: str, text: str, style: str = "redact") -> tuple[str, int]:
    return MaskProfile("t", detectors={detector: style}, pseudonym_key=KEY).scan_text(text)


# --- detectors: what they find ----------------------------------------------------------------------

FOUND = [
    # (detector, text, masked text with redact)
    ("email", "adele.vance@contoso.com", MASK),
    ("email", "Contact AdeleV@nhilab.onmicrosoft.com.", f"Contact {MASK}."),
    ("email", "SMTP:adele@contoso.com", f"SMTP:{MASK}"),
    ("email", "jordan.reyes_example.com#EXT#@nhilab.onmicrosoft.com", MASK),
    ("email", "Resource 'adele@contoso.com' does not exist", f"Resource '{MASK}' does not exist"),
    ("email", "a+tag@x.io and b@y.org", f"{MASK} and {MASK}"),
    ("phone", "+1 425 555 0109", MASK),
    ("phone", "+44 20 7946 0958", MASK),
    ("phone", "call (425) 555-0109 now", f"call {MASK} now"),
    ("phone", "425-555-0109", MASK),
    ("phone", "425.555.0109", MASK),
    ("phone", "+49 (0)30 1234567", MASK),
    ("phone", "tel:+14255550109", f"tel:{MASK}"),
    ("jwt", JWT, MASK),
    ("jwt", f"token={JWT}&x=1", f"token={MASK}&x=1"),
    ("jwt", "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.", MASK),  # unsigned: empty signature
    ("bearer", "Authorization: Bearer 0.AXoA1234abcd-efgh_ijkl", f"Authorization: Bearer {MASK}"),
    ("bearer", "bearer abcdefghijklmnopqrstuvwxyz0123", f"bearer {MASK}"),
    ("bearer", "Basic dXNlcjpwYXNzd29yZDEyMzQ=", f"Basic {MASK}"),
    ("bearer", "PoP eyJhbGciOiJSUzI1NiJ9.e30.sig12345", f"PoP {MASK}"),
    ("graph_secret", SECRET, MASK),
    ("graph_secret", f"new secret: {SECRET}.", f"new secret: {MASK}."),
    ("graph_secret", DER, MASK),
    ("graph_secret", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----", MASK),
    ("high_entropy", "aZ3kP9qLm2Xv8Rt5Wn7Yb4Hc6Jd1Fg0S", MASK),
    ("high_entropy", "key=" + base64.b64encode(bytes(range(100, 132))).decode(), MASK),
    ("high_entropy", "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8", MASK),
]


@pytest.mark.parametrize(("detector", "text", "expected"), FOUND, ids=[f"{d}-{t[:24]}" for d, t, _ in FOUND])
def test_detectors_find_what_they_name(detector, text, expected):
    masked, n = scan(detector, text)
    assert masked == expected
    assert n == expected.count(MASK)


LOOK_ALIKES = [
    # Values Graph returns all the time: every detector must leave them as they are.
    "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96",
    "{8A1F3C52-6D4E-4B7A-9C2F-5E0D1B7A3F96}",
    "2024-03-14T09:26:53Z",
    "2024-03-14T09:26:53.1234567Z",
    "2025-08-01T00:00:00+02:00",
    "2025-08-01T00:00:00+10:00",
    "https://graph.microsoft.com/v1.0/$metadata#users(mail,displayName)",
    "https://graph.microsoft.com/v1.0/$metadata#microsoft.graph.passwordCredential",
    "#microsoft.graph.user",
    "@odata.context",
    "Adele Vance",
    "Retail Manager",
    "NHI Directory Readers",
    "ApplicationReadWriteOwnedByPermissionGrant",
    "ExchangeOnlineProtection-Microsoft.Exchange.Management.Tasks",
    "S-1-5-21-1180699209-877415012-3182924384-1104",
    "8CE1366A8743B0D43BB26F206EB53F847EA0E742",  # a certificate thumbprint (hex)
    "a" * 64,
    "/subscriptions/0b1c2d3e-0000-4000-8000-000000000042/resourcegroups/rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/agent",
    "api://5e0b1683-de22-5eac-9334-fb85a741f6ff/access_as_user",
    "https://login.microsoftonline.com/8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96/oauth2/v2.0/token",
    "application/json;odata.metadata=minimal;odata.streaming=true",
    "18/2111", "98004", "E10492", "v1.0", "10.0.0.1", "192.168.100.1000", "1234567890", "+1",
    "Version 12.345.6789", "x@y", "user@localhost", "price 5@10.00",
    "basic information about the users", "Bearer token-based authentication",
    "Xq2", "mX4l1dQ2dUqYb3V8vS3Lhg==",
    "CN=mcp-directory, O=nhilab, L=Redmond, S=Washington, C=US",
    "en-US", "AzureADMyOrg", "AsymmetricX509Cert",
]


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_pass_every_detector(text):
    profile = MaskProfile("all", detectors=list(Detector))
    assert profile.scan_text(text) == (text, 0)


def test_jwt_detector_does_not_match_inside_other_tokens():
    assert scan("jwt", "xeyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.sig")[1] == 0


def test_a_der_run_inside_a_jwt_is_not_masked_as_a_certificate():
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxIn0.ab-MII" + "A" * 80
    assert scan("graph_secret", token) == (token, 0)


@pytest.mark.parametrize("text", [
    "x" * 200_000,
    "a" * 100_000 + "@",
    "1-" * 50_000,
    "eyJ" * 30_000,
    "-----BEGIN X-----" * 5000,
])
def test_detectors_stay_linear_on_hostile_strings(text):
    # Each would take minutes with unbounded backtracking; bounded patterns finish at once.
    MaskProfile("all", detectors=list(Detector)).scan_text(text)


# --- high entropy ---------------------------------------------------------------------------------


def test_high_entropy_rules():
    assert is_high_entropy("aZ3kP9qLm2Xv8Rt5Wn7Yb4Hc6Jd1Fg0S")
    assert not is_high_entropy("aZ3kP9qLm2Xv8Rt5Wn7Yb4Hc6Jd1Fg0"[:ENTROPY_MIN_LENGTH - 1])  # too short
    assert not is_high_entropy("abcdefghijklmnopqrstuvwxyzABCDEFGH")  # no digit: words, not secrets
    assert not is_high_entropy(secrets.token_hex(32))  # hex never reaches 4 bits per character
    assert not is_high_entropy("//graph.microsoft.com/v1.0/users/delta/microsoft.graph.x")  # a URL, by segment
    assert is_high_entropy("/sites/aZ3kP9qLm2Xv8Rt5Wn7Yb4Hc6Jd1Fg0S")  # ... whose segment may be a secret
    assert not is_high_entropy("aZ3kP9qLm2Xv8Rt5Wn7Yb4Hc6Jd1Fg0S-8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96")  # holds a GUID
    assert shannon_entropy("") == 0 and shannon_entropy("aaaa") == 0 and shannon_entropy("ab") == 1


RNG = random.Random(20240314)  # seeded: the rate below is a measurement, not a coin toss
SECRET_ALPHABET = string.ascii_letters + string.digits + "_-.~"


def entra_secret() -> str:
    pick = lambda n: "".join(RNG.choice(SECRET_ALPHABET) for _ in range(n))  # noqa: E731
    return f"{pick(3)}8Q~{pick(34)}"


@pytest.mark.parametrize("make", [
    pytest.param(entra_secret, id="entra-secret"),
    pytest.param(lambda: base64.b64encode(RNG.randbytes(32)).decode(), id="base64-32-bytes"),
    pytest.param(lambda: base64.urlsafe_b64encode(RNG.randbytes(32)).decode().rstrip("="), id="urlsafe-32-bytes"),
    pytest.param(lambda: "".join(RNG.choice(string.ascii_letters + string.digits) for _ in range(40)), id="alnum-40"),
])
def test_high_entropy_catches_random_secrets(make):
    # A safety net for secrets no other rule names: at most 1 in 100 may slip under it.
    missed = sum(not scan("high_entropy", make())[1] for _ in range(1000))
    assert missed <= 10


def directory_documents(tmp_path) -> dict[str, object]:
    """Everything the look-alike tenant serves, as Graph shapes it."""
    d = Directory(tmp_path / "state")
    ctx = "https://graph.microsoft.com/v1.0/$metadata#"
    return {
        "users": {"@odata.context": f"{ctx}users", "value": d.users,
                  "@odata.nextLink": "https://graph.microsoft.com/v1.0/users?$top=5&$skiptoken="
                                     + base64.urlsafe_b64encode(secrets.token_bytes(60)).decode()},
        "groups": {"@odata.context": f"{ctx}groups", "value": d.groups},
        "applications": {"@odata.context": f"{ctx}applications", "value": d.applications()},
        "servicePrincipals": {"@odata.context": f"{ctx}servicePrincipals", "value": d.service_principals()},
        "delta": {"@odata.deltaLink": "https://graph.microsoft.com/v1.0/users/delta?$deltatoken="
                                      "oEcOySpF_hWYmTIUZBOIfPzcwisr_rPe8o9M54L45qEXQGmvQC6T2dbL-9O7nieoZ",
                  "@odata.etag": 'W/"ZjY3YjVhMmYtZmE3ZC00YTM3LTk0MTUtMmJlNjFmNTU5OGIx"', "value": []},
        "messages": {"value": [{"id": "AAMkAGVmMDEzMTM4LTZmYWUtNDdkNC1hMDZiLTU1OGY5OTZhYmY4OABGAAAAAAAiQ8W967B7T",
                                "changeKey": "CQAAABYAAAAiIsqMbYjsT5e/T7KzowPTAAAYbvZD",
                                "parentFolderId": "AAMkAGVmMDEzMTM4LTZmYWUtNDdkNC1hMDZiLTU1OGY5OTZhYmY4OAAuAAAAAAAiQ8W9",
                                "subject": "Quarterly review", "bodyPreview": "See the attached deck."}]},
        "drive": {"value": [{"id": "01BYE5RZ6QN3ZWBTUFOFD3GSPGOHDJD36K",
                             "eTag": '"{8A1F3C52-6D4E-4B7A-9C2F-5E0D1B7A3F96},1"', "name": "plan.docx"}]},
    }


def test_no_false_positives_of_secret_detectors_on_the_seeded_directory(tmp_path):
    """jwt, bearer, graph_secret and high_entropy change nothing the look-alike tenant serves
    (GUIDs, ids, thumbprints, SIDs, immutable ids, dates, paging links, etags): 0 false positives
    over every string value."""
    docs = directory_documents(tmp_path)
    values = json.dumps(docs).count('"')  # plenty of strings: this is not a tiny sample
    assert values > 600
    profile = MaskProfile("secrets", detectors=["jwt", "bearer", "graph_secret", "high_entropy"])
    before = json.loads(json.dumps(docs))
    # graph_secret masks members by name too (hint, key, secretText, password): take those away
    # from the comparison, they are masked on purpose.
    masked, _ = mask_document(docs, profile)
    by_name = {"hint", "key", "secrettext", "password", "passwordbase64"}

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k.casefold() not in by_name}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    assert strip(masked) == strip(before)


def test_the_seeded_directory_under_pii_detectors_loses_only_pii(tmp_path):
    docs = directory_documents(tmp_path)
    profile = MaskProfile("pii", detectors={"email": "redact", "phone": "redact"})
    masked, n = mask_document(docs, profile)
    text = json.dumps(masked)
    assert "@nhilab.onmicrosoft.com" not in text and "555 01" not in text and "@example.com" not in text
    adele = masked["users"]["value"][0]
    assert adele["proxyAddresses"] == [f"SMTP:{MASK}"]
    assert adele["displayName"] == "Adele Vance" and adele["onPremisesSecurityIdentifier"].startswith("S-1-5-21-")
    assert adele["createdDateTime"] == "2024-03-14T09:26:53Z" and adele["postalCode"] == "98004"
    assert masked["users"]["@odata.nextLink"].startswith("https://graph.microsoft.com/v1.0/users?$top=5&$skiptoken=")


def test_odata_annotations_and_identifiers_are_left_followable(tmp_path):
    docs = directory_documents(tmp_path)
    links = (docs["users"]["@odata.nextLink"], docs["delta"]["@odata.deltaLink"])
    ids = json.dumps(docs["messages"]), json.dumps(docs["drive"])
    masked, _ = mask_document(docs, MaskProfile("all", detectors=list(Detector)))
    assert (masked["users"]["@odata.nextLink"], masked["delta"]["@odata.deltaLink"]) == links
    assert (json.dumps(masked["messages"]), json.dumps(masked["drive"])) == ids
    # Only OData's own annotations: a made-up one is scanned like any member.
    odd, n = mask_document({"@odata.hidden": "a@b.co", "members@odata.nextLink": "https://x/?u=a@b.co"},
                           MaskProfile("e", detectors=["email"]))
    assert odd == {"@odata.hidden": MASK, "members@odata.nextLink": "https://x/?u=a@b.co"} and n == 1
    # The same skip token anywhere else is a long random string, and masked as one.
    other, n = mask_document({"note": links[0]}, MaskProfile("he", detectors=["high_entropy"]))
    assert n == 1 and MASK in other["note"]


# --- styles ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "kind", "expected"), [
    ("adele.vance@contoso.com", None, "a***@contoso.com"),
    ("Jordan.Reyes_example.com#EXT#@nhilab.onmicrosoft.com", None, "J***@nhilab.onmicrosoft.com"),
    ("+1 425 555 0109", None, "***09"),
    ("+1 425 555 0109", Detector.PHONE, "***09"),
    ("Retail Manager", None, "Ret***"),
    ("E10492", None, "E***"),
    ("abc", None, "***"),
    ("", None, "***"),
    (SECRET, Detector.GRAPH_SECRET, "abc***"),
    (JWT, Detector.JWT, "eyJ***"),
])
def test_partial_keeps_a_hint_never_more_than_three_characters(value, kind, expected):
    assert partial(value, kind) == expected


def test_partial_detector_keeps_the_mail_domain_in_text():
    assert scan("email", "from Adele@Contoso.com, cc b@x.org", "partial") == (
        "from A***@Contoso.com, cc b***@x.org", 2)
    assert scan("bearer", "Bearer abcdefghijklmnop1234", "partial") == ("Bearer abc***", 1)


def test_pseudonyms_are_stable_keyed_and_case_insensitive_for_mail():
    profile = MaskProfile("p", {"mail": "pseudonym", "employeeId": "pseudonym"},
                          detectors={"email": "pseudonym"}, pseudonym_key=KEY)
    first, _ = mask_document({"mail": "Adele@Contoso.com", "employeeId": "E10492",
                              "note": "ask adele@contoso.com"}, profile)
    again, _ = mask_document({"mail": "adele@contoso.com", "employeeId": "E10492"}, profile)
    token = first["mail"]
    assert re.fullmatch(re.escape(PSEUDONYM_PREFIX) + r"[0-9a-f]{16}", token)
    assert again["mail"] == token == first["note"].removeprefix("ask ")  # same address, same token
    assert again["employeeId"] == first["employeeId"] != token
    other = MaskProfile("p", {"mail": "pseudonym"}, pseudonym_key=OTHER_KEY)
    assert mask_document({"mail": "adele@contoso.com"}, other)[0]["mail"] != token  # another deployment
    assert KEY.pseudonym("E10492") != KEY.pseudonym("e10492")  # only mail is case-folded


def test_the_pseudonym_key_is_never_shown(caplog):
    raw = b"super-secret-pseudonym-key-0123456789"
    key = PseudonymKey(raw, "$NHI_MASK_KEY")
    profile = MaskProfile("p", {"mail": "pseudonym"}, pseudonym_key=key)
    with caplog.at_level(logging.DEBUG):
        mask_document({"mail": "a@b.co"}, profile)
    shown = " ".join([repr(key), str(key), repr(profile), caplog.text])
    assert raw.decode() not in shown and "NHI_MASK_KEY" in repr(key)
    with pytest.raises(TypeError):
        pickle.dumps(key)
    with pytest.raises(ValueError, match="at least 16") as e:
        PseudonymKey(b"short-key", "$K")
    assert "short-key" not in str(e.value)


def test_pseudonym_without_a_key_is_refused_when_the_profile_is_built():
    with pytest.raises(ValueError, match="no pseudonym key"):
        MaskProfile("p", {"mail": "pseudonym"})
    with pytest.raises(ValueError, match="no pseudonym key"):
        MaskProfile("p", detectors={"email": "pseudonym"})


@pytest.mark.parametrize(("style", "expected"), [
    ("redact", {"mail": MASK, "otherMails": [MASK, {"x": None}], "mobilePhone": None,
                "manager": {"mail": MASK, "officeLocation": None}, "employeeId": None, "businessPhones": [],
                "accountEnabled": None}),
    ("partial", {"mail": "a***@contoso.com", "otherMails": ["a***@example.com", {"x": None}], "mobilePhone": None,
                 "manager": {"mail": "m***@contoso.com", "officeLocation": None}, "employeeId": None,
                 "businessPhones": [], "accountEnabled": None}),
])
def test_each_style_keeps_the_json_type_of_every_kind_of_value(style, expected):
    """Typed clients (msgraph-sdk) deserialise masked answers: a string stays a string without the
    original, a list stays a list with each item masked, an object keeps its keys with masked
    values, null stays null, and a number or a boolean becomes null."""
    doc = {"mail": "adele@contoso.com", "otherMails": ["adele@example.com", {"x": 1}], "mobilePhone": 4255550109,
           "manager": {"mail": "m@contoso.com", "officeLocation": 12.5}, "employeeId": None, "businessPhones": [],
           "accountEnabled": True}
    profile = MaskProfile("p", dict.fromkeys(expected, style))
    masked, n = mask_document(doc, profile)
    assert masked == expected and n == 7
    assert "adele" not in json.dumps(masked) and "4255550109" not in json.dumps(masked)


def test_pseudonyms_keep_the_json_type_too():
    profile = MaskProfile("p", {"otherMails": "pseudonym", "n": "pseudonym"}, pseudonym_key=PseudonymKey(b"k" * 16, "$K"))
    masked, _ = mask_document({"otherMails": ["A@x.co", "a@x.co", None], "n": 5}, profile)
    assert masked["otherMails"][0] == masked["otherMails"][1] and masked["otherMails"][0].startswith("pseudonym:")
    assert masked["otherMails"][2] is None and masked["n"] is None


def test_masked_values_nested_beyond_the_depth_limit_are_refused():
    deep: object = "x"
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(MaskingError, match="deeper"):
        mask_document({"mail": deep}, MaskProfile("p", ["mail"]))


def test_the_strongest_style_wins():
    profile = MaskProfile("p", {"mail": "partial"}, paths={"$.mail": "redact", "$.other": "partial"},
                          detectors={"graph_secret": "partial"})
    masked, _ = mask_document({"mail": "a@b.co", "other": "x@y.co", "secretText": SECRET}, profile)
    assert masked == {"mail": MASK, "other": "x***@y.co", "secretText": "abc***"}
    both = combine([MaskProfile("a", {"mail": "partial"}), MaskProfile("b", {"MAIL": "redact"}, detectors=["email"])])
    assert mask_document({"mail": "a@b.co", "note": "c@d.co"}, both)[0] == {"mail": MASK, "note": MASK}
    assert both.refuses_binary


def test_graph_secret_masks_its_members_by_name():
    profile = MaskProfile("s", detectors={"graph_secret": "redact"})
    answer = {"keyId": "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96", "displayName": "rotation", "hint": "abc",
              "secretText": "short-but-named", "startDateTime": "2024-03-14T09:26:53Z",
              "@microsoft.graph.downloadUrl": "https://x/download?tempauth=abc", "passwordBase64": "cGFzcw=="}
    masked, n = mask_document(answer, profile)
    assert n == 4
    assert {k for k, v in masked.items() if v == MASK} == {"hint", "secretText", "@microsoft.graph.downloadUrl",
                                                          "passwordBase64"}


# --- JSON paths -----------------------------------------------------------------------------------


USERS = {
    "@odata.context": "x",
    "value": [
        {"id": "1", "mail": "a@x.co", "identities": [{"issuer": "contoso", "issuerAssignedId": "a@x.co"},
                                                     {"issuer": "b2c", "issuerAssignedId": "alice"}],
         "manager": {"mail": "m@x.co", "keyCredentials": [{"key": "MIIB", "keyId": "k"}]}},
        {"id": "2", "mail": "b@x.co", "identities": []},
    ],
    "mail": "top@x.co",
}


@pytest.mark.parametrize(("path", "masked_at"), [
    ("$.value[*].identities[*].issuerAssignedId",
     [("value", 0, "identities", 0, "issuerAssignedId"), ("value", 0, "identities", 1, "issuerAssignedId")]),
    ("$.value[*].mail", [("value", 0, "mail"), ("value", 1, "mail")]),
    ("$.value[1].mail", [("value", 1, "mail")]),
    ("$.VALUE[0].Mail", [("value", 0, "mail")]),  # names are case-insensitive
    ("$['value'][0][\"mail\"]", [("value", 0, "mail")]),
    ("$.mail", [("mail",)]),
    ("$..mail", [("value", 0, "mail"), ("value", 0, "manager", "mail"), ("value", 1, "mail"), ("mail",)]),
    ("$..keyCredentials[*].key", [("value", 0, "manager", "keyCredentials", 0, "key")]),
    ("$..manager.*", [("value", 0, "manager", "mail"), ("value", 0, "manager", "keyCredentials")]),
    ("$.value[*].identities[0]", [("value", 0, "identities", 0)]),
    ("$.value[5].mail", []),
    ("$.nothing.here", []),
])
def test_json_paths(path, masked_at):
    doc = json.loads(json.dumps(USERS))
    masked, n = mask_document(doc, MaskProfile("p", paths=[path]))
    assert n == len(masked_at)
    expected = json.loads(json.dumps(USERS))
    for where in masked_at:
        node = expected
        for step in where[:-1]:
            node = node[step]
        node[where[-1]] = redacted(node[where[-1]])
    assert masked == expected


@pytest.mark.parametrize(("path", "offset", "words"), [
    ("value[*].mail", 0, "starts with '$'"),
    ("$", 0, "whole body"),
    ("$.value[?(@.mail)].mail", 8, "filters"),
    ("$.value[0:2].mail", 9, "slices"),
    ("$.value[0,1].mail", 9, "unions"),
    ("$.value[-1].mail", 8, "negative"),
    ("$..*", 3, "every value"),
    ("$.value[*", 9, "']'"),
    ("$.value.", 8, "member name"),
    ("$.@odata.type", 2, "quote names"),
    ("$.value[01]", 8, "leading zeros"),
    ("$[''x]", 1, "['name']"),
    ("$ .x", 1, "unexpected"),
])
def test_paths_outside_the_subset_are_refused_with_the_character(path, offset, words):
    with pytest.raises(JSONPathError) as e:
        compile_path(path)
    assert e.value.offset == offset
    assert words in f"{e.value.message} {e.value.hint}"


def test_bracket_names_hold_what_shorthand_cannot():
    doc = {"value": [{"@odata.type": "#microsoft.graph.user", "@microsoft.graph.downloadUrl": "https://x?t=1"}]}
    masked, n = mask_document(doc, MaskProfile("p", paths=["$.value[*]['@microsoft.graph.downloadUrl']"]))
    assert n == 1 and masked["value"][0]["@odata.type"] == "#microsoft.graph.user"


# --- bodies ---------------------------------------------------------------------------------------

PII = MaskProfile("pii", ["mail"], detectors={"email": "partial", "phone": "redact"})
FIELDS_ONLY = MaskProfile("fields", ["mail"])


@pytest.mark.parametrize(("content_type", "kind"), [
    ("application/json", "json"),
    ("application/json;odata.metadata=minimal;odata.streaming=true", "json"),
    ("text/plain; charset=utf-8", "text"),
    ("text/csv", "text"),
    ("text/html", "text"),
    ("application/xml", "text"),
    ("application/atom+xml", "text"),
    ("image/svg+xml", "text"),
    ("application/javascript", "text"),
    ("application/x-www-form-urlencoded", "form"),
    ("image/jpeg", "binary"),
    ("application/octet-stream", "binary"),
    ("application/pdf", "binary"),
    ("multipart/mixed; boundary=x", "binary"),
    ("", "untyped"),
])
def test_body_kinds(content_type, kind):
    assert body_kind(content_type).value == kind


def test_text_bodies_are_scanned_in_place():
    body = "User Principal Name,Display Name,Phone\nadele@contoso.com,Adele Vance,+1 425 555 0109\n".encode()
    out, n = mask_body(body, "text/csv; charset=utf-8", PII)
    assert out == f"User Principal Name,Display Name,Phone\na***@contoso.com,Adele Vance,{MASK}\n".encode()
    assert n == 2


def test_text_bodies_keep_their_charset():
    body = "Jérôme: jerome@contoso.com".encode("latin-1")
    out, n = mask_body(body, "text/plain; charset=ISO-8859-1", PII)
    assert out.decode("latin-1") == "Jérôme: j***@contoso.com" and n == 1


@pytest.mark.parametrize(("body", "content_type", "words"), [
    (b"adele@contoso.com \xff\xfe", "text/plain", "not valid utf-8"),
    (b"adele@contoso.com \xff\xfe", "text/plain; charset=utf-8", "not valid utf-8"),
    (b"x", "text/plain; charset=no-such-charset", "unknown charset"),
    (b'{"mail": "a@b.co"', "application/json", "not valid JSON"),
    (b"\x89PNG\r\n\x1a\n adele@contoso.com", "image/png", "binary: pass"),
    (b"%PDF-1.7 adele@contoso.com", "application/pdf", "cannot be scanned"),
    (b"\x00\x01\x02 adele@contoso.com", "", "cannot be scanned"),  # untyped, not text
    (b"a=1&&b", "application/x-www-form-urlencoded", "form"),
])
def test_bodies_that_are_not_what_they_claim_are_refused(body, content_type, words):
    with pytest.raises(MaskingError) as e:
        mask_body(body, content_type, PII)
    assert words in str(e.value)


def test_bodies_a_profile_cannot_read_pass_only_when_it_says_so():
    photo = b"\xff\xd8\xff\xe0 jpeg adele@contoso.com"
    assert FIELDS_ONLY.binary is BinaryBodies.REFUSE and PII.binary is BinaryBodies.REFUSE
    with pytest.raises(MaskingError, match="binary: pass"):  # no field can be shown absent from a photo
        mask_body(photo, "image/jpeg", FIELDS_ONLY)
    passing = MaskProfile("p", detectors=["email"], binary="pass")
    assert mask_body(photo, "image/jpeg", passing)[0] is photo
    fields_passing = MaskProfile("p", ["mail"], binary="pass")
    assert mask_body(photo, "image/jpeg", fields_passing)[0] is photo


def test_text_without_detectors_is_refused_unless_the_profile_lets_it_pass():
    body = b"adele@contoso.com \xff"
    with pytest.raises(MaskingError, match="has no detectors"):
        mask_body(body, "text/plain", FIELDS_ONLY)
    assert mask_body(body, "text/plain", MaskProfile("p", ["mail"], binary="pass"))[0] is body


def test_untyped_bodies_are_looked_at():
    assert json.loads(mask_body(b'{"mail": "a@b.co"}', "", FIELDS_ONLY)[0]) == {"mail": MASK}
    assert mask_body(b"mail adele@contoso.com", "", PII)[0] == b"mail a***@contoso.com"
    assert sniff(b"plain text") == sniff(b"") == body_kind("text/plain")
    assert sniff(b"\xef\xbb\xbf [1, 2") == body_kind("application/json")
    with pytest.raises(MaskingError, match="not valid JSON"):  # looks like JSON: must be JSON
        mask_body(b'[{"mail": "a@b.co"', "", FIELDS_ONLY)


def test_form_bodies_are_masked_by_parameter_name_and_detectors():
    body = b"mail=adele%40contoso.com&note=call+%2B1+425+555+0109&id=42"
    out, n = mask_body(body, "application/x-www-form-urlencoded", PII)
    assert out == b"mail=%5Bmasked%5D&note=call+%5Bmasked%5D&id=42" and n == 2
    assert mask_body(b"id=42", "application/x-www-form-urlencoded", PII)[0] == b"id=42"


def test_json_bodies_are_parsed_and_written_once(monkeypatch):
    calls = {"loads": 0, "dumps": 0}
    real_loads, real_dumps = json.loads, json.dumps

    def loads(*a, **k):
        calls["loads"] += 1
        return real_loads(*a, **k)

    def dumps(*a, **k):
        calls["dumps"] += 1
        return real_dumps(*a, **k)

    class Counting:  # the masking module's own decoder and encoder, counted the same way
        def __init__(self, real, key):
            self.real, self.key = real, key

        def decode(self, *a, **k):
            calls[self.key] += 1
            return self.real.decode(*a, **k)

        def encode(self, *a, **k):
            calls[self.key] += 1
            return self.real.encode(*a, **k)

    monkeypatch.setattr(json, "loads", loads)
    monkeypatch.setattr(json, "dumps", dumps)
    monkeypatch.setattr(masks, "_DECODER", Counting(masks._DECODER, "loads"))
    monkeypatch.setattr(masks, "_ENCODER", Counting(masks._ENCODER, "dumps"))
    body = real_dumps({"value": [{"mail": f"u{i}@x.co", "note": f"call +1 425 555 01{i:02}"} for i in range(50)]})
    out, n = mask_json_bytes(body.encode(), PII)
    assert calls == {"loads": 1, "dumps": 1}
    assert n == 100


# --- properties: for any document -----------------------------------------------------------------

LISTED = ("mail", "userPrincipalName", "secretText", "issuerAssignedId")
SENTINEL = "LEAK-7f3a9c"  # never part of a masked form: its appearance in the output is a leak

json_scalars = st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=20)
json_docs = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=40,
)
secret_values = st.one_of(
    st.just(SENTINEL), st.lists(st.just(SENTINEL), min_size=1, max_size=3),
    st.fixed_dictionaries({"x": st.just(SENTINEL)}), st.just(f"{SENTINEL}@contoso.com"),
)


@st.composite
def documents_with_listed_fields(draw):
    """A random JSON document with listed members (in random letter case) inserted anywhere."""
    doc = draw(st.dictionaries(st.text(max_size=10), json_docs, max_size=4))
    for _ in range(draw(st.integers(1, 6))):
        name = draw(st.sampled_from(LISTED))
        name = "".join(c.upper() if draw(st.booleans()) else c for c in name)
        value = draw(secret_values)
        containers = [doc]
        stack = [doc]
        while stack:
            node = stack.pop()
            for child in (node.values() if isinstance(node, dict) else node):
                if isinstance(child, (dict, list)):
                    containers.append(child)
                    stack.append(child)
        target = draw(st.sampled_from(containers))
        if isinstance(target, dict):
            target[name] = value
        else:
            target.insert(draw(st.integers(0, len(target))), {name: value})
    return doc


STYLED = [
    MaskProfile("redact", list(LISTED)),
    MaskProfile("partial", dict.fromkeys(LISTED, "partial")),
    MaskProfile("pseudonym", dict.fromkeys(LISTED, "pseudonym"), pseudonym_key=KEY),
    MaskProfile("with-detectors", dict.fromkeys(LISTED, "partial"), detectors=list(Detector)),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents_with_listed_fields(), st.sampled_from(STYLED))
def test_a_listed_field_never_leaves_unmasked_and_the_output_is_json(doc, profile):
    out, _ = mask_json_bytes(json.dumps(doc).encode(), profile)
    text = out.decode("utf-8")
    parsed = json.loads(text)  # always valid JSON
    assert SENTINEL not in text  # the partial form keeps at most 3 characters: "LEA***"
    stack = [parsed]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            if isinstance(k, str) and k.casefold() in {n.casefold() for n in LISTED}:
                assert all(f is None or f == MASK or (isinstance(f, str) and ("***" in f or f.startswith(PSEUDONYM_PREFIX)))
                           for f in leaves(v)), (k, v)
            elif isinstance(v, (dict, list)):
                stack.append(v)


@settings(max_examples=200, deadline=None)
@given(json_docs)
def test_masking_a_document_without_listed_fields_changes_nothing(doc):
    if isinstance(doc, (dict, list)):
        body = json.dumps(doc).encode()
        out, n = mask_json_bytes(body, MaskProfile("p", ["never-a-member-of-these-documents"]))
        assert n == 0 and json.loads(out) == json.loads(body)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_text_scanning_never_raises_and_is_idempotent(text):
    profile = MaskProfile("all", detectors=list(Detector))
    once, _ = profile.scan_text(text)
    twice, n = profile.scan_text(once)
    assert twice == once and n == 0


def test_style_and_detector_names_are_the_documented_ones():
    assert [s.value for s in Style] == ["redact", "partial", "pseudonym"]
    assert [d.value for d in Detector] == ["email", "phone", "jwt", "bearer", "graph_secret", "high_entropy"]


@pytest.mark.parametrize(("path", "asked"), [
    ("/v1.0/users/x/mobilephone", ("mobilephone", False)),
    ("/beta/users/x/mobilephone/$value", ("mobilephone", True)),
    ("/v1.0/me/mail", ("mail", False)),
    ("/v1.0/users", None),
    ("/v1.0/users/$count", None),
    ("/v1.0/users/x/photo/$value", ("photo", True)),
])
def test_the_property_a_path_asks_for(path, asked):
    assert property_of(path) == asked


def test_a_property_path_is_masked_by_the_propertys_name():
    profile = MaskProfile("p", {"mobilePhone": "partial", "businessPhones": "redact"},
                          paths={"$..employeeId": "redact"})
    answer = json.dumps({"@odata.context": "https://graph/$metadata#users('x')/mobilePhone",
                         "value": "+1 425 555 0109"}).encode()
    out, n = mask_body(answer, "application/json", profile, path="/v1.0/users/x/mobilephone")
    assert json.loads(out) == {"@odata.context": "https://graph/$metadata#users('x')/mobilePhone", "value": "***09"}
    out, _ = mask_body(b'{"value": ["+1 425 555 0101"]}', "application/json", profile,
                       path="/v1.0/users/x/BusinessPhones")
    assert json.loads(out) == {"value": [MASK]}
    out, _ = mask_body(b"E10492", "text/plain", profile, path="/v1.0/users/x/employeeid/$value")
    assert out == MASK.encode()  # a path ending on the name masks it too
    assert mask_body(b'{"value": "Adele"}', "application/json", profile, path="/v1.0/users/x/displayname")[1] == 0
