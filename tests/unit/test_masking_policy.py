"""The policy's ``masking:`` section: profile syntax, errors with file:line:column, the pseudonym
key from the environment, and the schema agreeing with the loader on it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from nhi_gateway.masking.masks import MASK, BinaryBodies, Detector, Style, mask_document
from nhi_gateway.policy.loader import PolicyError, PolicyStore, load_policy, parse_policy

from ..support.policies import policy_head

POLICIES = Path(__file__).resolve().parents[2] / "policies"
TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
KEY = "a-long-random-pseudonym-key-for-tests"
ENV = {"NHI_MASK_KEY": KEY}

HEAD = policy_head(TENANT)

FULL = HEAD + """\
masking:
  default_profile: directory-pii
  pseudonym_key_env: NHI_MASK_KEY
  profiles:
    directory-pii:
      fields: {mail: partial, userPrincipalName: pseudonym, mobilePhone: redact}
      paths: {"$.value[*].identities[*].issuerAssignedId": redact}
      detectors: {email: partial, phone: redact, jwt: redact, graph_secret: redact, high_entropy: redact}
    legacy:
      fields: [mail, otherMails]
    secrets-only:
      detectors: [graph_secret]
      binary: pass
"""


def test_the_full_syntax():
    policy = parse_policy(FULL, "p.yaml", environ=ENV)
    pii = policy.mask_profiles["directory-pii"]
    assert dict(pii.fields) == {"mail": Style.PARTIAL, "userPrincipalName": Style.PSEUDONYM,
                                "mobilePhone": Style.REDACT}
    assert dict(pii.paths) == {"$.value[*].identities[*].issuerAssignedId": Style.REDACT}
    assert pii.detectors[Detector.EMAIL] is Style.PARTIAL and len(pii.detectors) == 5
    assert pii.binary is BinaryBodies.REFUSE and pii.pseudonym_key is not None
    assert dict(policy.mask_profiles["legacy"].fields) == {"mail": Style.REDACT, "otherMails": Style.REDACT}
    assert policy.mask_profiles["legacy"].pseudonym_key is None  # only profiles that make pseudonyms hold it
    secrets_only = policy.mask_profiles["secrets-only"]
    assert secrets_only.binary is BinaryBodies.PASS and not secrets_only.fields
    doc = {"value": [{"mail": "adele@contoso.com", "userPrincipalName": "AdeleV@contoso.com", "mobilePhone": "x",
                      "identities": [{"issuerAssignedId": "adele"}], "aboutMe": "call +1 425 555 0109"}]}
    masked, n = mask_document(doc, pii)
    user = masked["value"][0]
    assert user["mail"] == "a***@contoso.com" and user["userPrincipalName"].startswith("pseudonym:")
    assert user["mobilePhone"] == MASK and user["identities"][0]["issuerAssignedId"] == MASK
    assert user["aboutMe"] == f"call {MASK}" and n == 5


def test_pseudonyms_follow_the_key_of_the_deployment():
    doc = {"value": [{"userPrincipalName": "AdeleV@contoso.com"}]}

    def token(env):
        profile = parse_policy(FULL, "p.yaml", environ=env).mask_profiles["directory-pii"]
        return mask_document(json.loads(json.dumps(doc)), profile)[0]["value"][0]["userPrincipalName"]

    assert token(ENV) == token(dict(ENV)) != token({"NHI_MASK_KEY": KEY + "-rotated"})


def where(text: str, needle: str, occurrence: int = 1) -> tuple[int, int]:
    """1-based line and column of the ``occurrence``-th ``needle`` in ``text``."""
    offset = -1
    for _ in range(occurrence):
        offset = text.index(needle, offset + 1)
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def profile(body: str, extra: str = "") -> str:
    return HEAD + "masking:\n" + extra + "  profiles:\n    p:\n" + body


ERRORS = [
    # (profile body, extra masking lines, the text the error points at, words in the message)
    ("      fields: {mail: partly}\n", "", "partly", "must be one of redact, partial, pseudonym"),
    ("      fields: {mail: }\n", "", "mail", "has no style"),
    ("      fields: {}\n", "", "{}", "must not be empty"),
    ("      fields: mail\n", "", "mail", "must be a list"),
    ('      fields: ["identities[].issuerAssignedId"]\n', "", '"identities', "list it under paths as "
                                                                             "'$..identities[*].issuerAssignedId'"),
    ('      fields: ["$.value[*].mail"]\n', "", '"$.value', "is a path"),
    ("      fields: {mail: partial, MAIL: redact}\n", "", "MAIL", "listed twice with different styles"),
    ("      detectors: [emails]\n", "", "emails", "did you mean 'email'"),
    ("      detectors: {phone: hide}\n", "", "hide", "must be one of"),
    ('      paths: ["$.value[?(@.mail)].mail"]\n', "", "?(@", "filters ([?...]) are not supported"),
    ('      paths: ["value[*].mail"]\n', "", "value[*]", "starts with '$'"),
    ("      paths: {'$..*': redact}\n", "", "*'", "matches every value"),
    ("      binary: maybe\n      detectors: [email]\n", "", "maybe", "must be one of pass, refuse"),
    ("      binary: pass\n", "", "    p:", "masks nothing"),
    ("      field: [mail]\n", "", "field:", "did you mean 'fields'"),
    ("      fields: {mail: pseudonym}\n", "", "mail", "masking.pseudonym_key_env is not set"),
    ("      fields: {mail: pseudonym}\n", "  pseudonym_key_env: NHI_UNSET\n", "NHI_UNSET",
     "environment variable NHI_UNSET is not set"),
    ("      fields: {mail: pseudonym}\n", "  pseudonym_key_env: SHORT_KEY\n", "SHORT_KEY", "is 9 bytes long"),
    ("      fields: [mail]\n", "  pseudonym_key_env: 'NHI MASK KEY'\n", "'NHI MASK", "not an environment variable"),
]


@pytest.mark.parametrize(("body", "extra", "at", "words"), ERRORS, ids=[e[3][:40] for e in ERRORS])
def test_profile_errors_say_what_and_where(body, extra, at, words):
    text = profile(body, extra)
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "policy.yaml", environ={"SHORT_KEY": "too-short"})
    assert words in str(e.value)
    line, column = where(text, at)
    column += len(at) - len(at.lstrip())
    assert (e.value.source, e.value.line, e.value.column) == ("policy.yaml", line, column), str(e.value)


def test_a_path_error_points_at_the_character():
    text = profile('      paths: ["$.value[*].identities[0:2].issuerAssignedId"]\n')
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "policy.yaml")
    assert (e.value.line, e.value.column) == where(text, ":2]")
    assert "slices" in str(e.value) and "at character" in str(e.value)


def test_the_key_never_appears_in_errors_reprs_or_the_policy(tmp_path):
    short = "sixteen-minus-1"  # 15 bytes: refused, and its value must not be echoed
    text = profile("      fields: {mail: pseudonym}\n", "  pseudonym_key_env: NHI_MASK_KEY\n")
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml", environ={"NHI_MASK_KEY": short})
    assert short not in str(e.value) and "15 bytes" in str(e.value)
    policy = parse_policy(text, "p.yaml", environ=ENV)
    shown = repr(policy) + repr(policy.mask_profiles) + repr(policy.mask_profiles["p"].pseudonym_key)
    assert KEY not in shown and "$NHI_MASK_KEY" in shown


def test_a_reload_without_the_key_keeps_the_last_good_policy(tmp_path, monkeypatch):
    path = tmp_path / "policy.yaml"
    path.write_text(profile("      fields: [mail]\n"))
    store = PolicyStore(load_policy(path))
    monkeypatch.delenv("NHI_MASK_KEY", raising=False)
    path.write_text(profile("      fields: {mail: pseudonym}\n", "  pseudonym_key_env: NHI_MASK_KEY\n"))
    with pytest.raises(PolicyError, match="NHI_MASK_KEY is not set"):
        store.reload()
    assert store.current.mask_profiles["p"].fields["mail"] is Style.REDACT
    monkeypatch.setenv("NHI_MASK_KEY", KEY)
    assert store.reload().mask_profiles["p"].fields["mail"] is Style.PSEUDONYM


def test_an_unused_key_variable_need_not_be_set():
    policy = parse_policy(profile("      fields: [mail]\n", "  pseudonym_key_env: NHI_NOT_SET_ANYWHERE\n"), "p.yaml",
                          environ={})
    assert policy.mask_profiles["p"].pseudonym_key is None


def test_the_example_policy_masks_with_fields_paths_and_detectors():
    example = load_policy(POLICIES / "example.yaml")
    pii = example.mask_profiles[example.default_profile]
    assert "secretText" in pii.fields and pii.paths and Detector.EMAIL in pii.detectors
    # The token endpoint's rule names no mask, so its answer gets this profile: a token must pass.
    answer = {"token_type": "Bearer", "expires_in": 3599,
              "access_token": "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL2dyYXBoIn0.c2ln-MII" + "A" * 90}
    assert mask_document(copy.deepcopy(answer), pii) == (answer, 0)


# --- the schema and the loader agree on masking --------------------------------------------------

jsonschema = pytest.importorskip("jsonschema")
VALIDATOR = jsonschema.Draft202012Validator(json.loads((POLICIES / "policy.schema.json").read_text()))
BASE = {
    "version": 1,
    "identity": {"tenants": [TENANT], "bearer": {"audiences": ["https://graph.microsoft.com"],
                 "issuers": ["https://login.microsoftonline.com/{tenantid}/v2.0"]}},
    "upstreams": [{"host": "graph.microsoft.com"}],
}

AGREE = [
    ({"profiles": {"p": {"fields": ["mail"]}}}, True),
    ({"profiles": {"p": {"fields": {"mail": "partial", "upn": "redact"}}}}, True),
    ({"profiles": {"p": {"paths": ["$.value[*].mail"]}}}, True),
    ({"profiles": {"p": {"paths": {"$..keyCredentials[*].key": "partial"}}}}, True),
    ({"profiles": {"p": {"detectors": ["email", "phone", "jwt", "bearer", "graph_secret", "high_entropy"]}}}, True),
    ({"profiles": {"p": {"detectors": {"email": "partial"}, "binary": "pass"}}}, True),
    ({"profiles": {"p": {"fields": ["mail"], "paths": None, "detectors": None, "binary": None}}}, True),
    ({"pseudonym_key_env": "NHI_MASK_KEY", "profiles": {"p": {"fields": {"mail": "pseudonym"}}}}, True),
    ({"pseudonym_key_env": None, "profiles": {"p": {"fields": ["mail"]}}}, True),
    ({"profiles": {"p": {}}}, False),
    ({"profiles": {"p": {"binary": "pass"}}}, False),
    ({"profiles": {"p": {"fields": []}}}, False),
    ({"profiles": {"p": {"fields": {}}}}, False),
    ({"profiles": {"p": {"fields": {"mail": "hide"}}}}, False),
    ({"profiles": {"p": {"fields": {"mail": None}}}}, False),
    ({"profiles": {"p": {"fields": ["identities[].issuerAssignedId"]}}}, False),
    ({"profiles": {"p": {"fields": {"": "redact"}}}}, False),
    ({"profiles": {"p": {"paths": ["value[*].mail"]}}}, False),
    ({"profiles": {"p": {"detectors": ["emails"]}}}, False),
    ({"profiles": {"p": {"detectors": {"email": "hide"}}}}, False),
    ({"profiles": {"p": {"detectors": ["email"], "binary": "maybe"}}}, False),
    ({"profiles": {"p": {"fields": ["mail"], "style": "redact"}}}, False),
    ({"pseudonym_key_env": "NHI MASK", "profiles": {"p": {"fields": ["mail"]}}}, False),
]


@pytest.mark.parametrize(("masking", "accepted"), AGREE, ids=[json.dumps(m)[:60] for m, _ in AGREE])
def test_the_loader_and_the_schema_agree_on_masking(masking, accepted):
    doc = {**BASE, "masking": masking}
    try:
        parse_policy(json.dumps(doc), "doc.json", environ=ENV)
        loader = True
    except PolicyError:
        loader = False
    assert (loader, VALIDATOR.is_valid(doc)) == (accepted, accepted)


@pytest.mark.parametrize("masking", [
    {"profiles": {"p": {"paths": ["$.value[?(@.x)].mail"]}}},  # the schema cannot parse a path
    {"profiles": {"p": {"fields": {"mail": "partial", "MAIL": "redact"}}}},
    {"pseudonym_key_env": "NHI_NOT_SET", "profiles": {"p": {"fields": {"mail": "pseudonym"}}}},
    {"profiles": {"p": {"fields": {"mail": "pseudonym"}}}},
])
def test_what_only_the_loader_checks_about_masking(masking):
    doc = {**BASE, "masking": masking}
    assert VALIDATOR.is_valid(doc)
    with pytest.raises(PolicyError):
        parse_policy(json.dumps(doc), "doc.json", environ=ENV)
