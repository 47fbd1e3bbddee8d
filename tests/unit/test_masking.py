import json

import pytest

"""The masking walk with member names (the older ``fields: [list]`` form, each redacted), and
what every body must be to be masked at all. Styles, paths, detectors and bodies of other types:
test_masking_profiles.py; the policy's ``masking:`` section: test_masking_policy.py; the addon:
test_masking_addon.py."""

from nhi_gateway.masking.masks import (
    MASK,
    MAX_DEPTH,
    MaskingError,
    MaskProfile,
    is_json_content_type,
    mask_document,
    mask_json_bytes,
)

USER_FIELDS = frozenset({"mail", "userPrincipalName", "mobilePhone", "issuerAssignedId"})
SECRET_FIELDS = frozenset({"secretText", "hint", "key"})


@pytest.mark.parametrize(
    ("doc", "fields", "expected", "count"),
    [
        pytest.param(
            {"id": "1", "mail": "a@contoso.com"},
            USER_FIELDS,
            {"id": "1", "mail": MASK},
            1,
            id="top-level",
        ),
        pytest.param(
            {
                "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users",
                "value": [
                    {"id": "1", "mail": "a@contoso.com", "displayName": "A"},
                    {"id": "2", "mail": "b@contoso.com", "displayName": "B"},
                ],
            },
            USER_FIELDS,
            {
                "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users",
                "value": [
                    {"id": "1", "mail": MASK, "displayName": "A"},
                    {"id": "2", "mail": MASK, "displayName": "B"},
                ],
            },
            2,
            id="value-collection",
        ),
        pytest.param(
            {
                "id": "g1",
                "members": [{"id": "u1", "mail": "x@contoso.com", "manager": {"mail": "m"}}],
            },
            USER_FIELDS,
            {"id": "g1", "members": [{"id": "u1", "mail": MASK, "manager": {"mail": MASK}}]},
            2,
            id="nested-expand",
        ),
        pytest.param(
            {"identities": [{"signInType": "emailAddress", "issuerAssignedId": "a@b.c"}]},
            USER_FIELDS,
            {"identities": [{"signInType": "emailAddress", "issuerAssignedId": MASK}]},
            1,
            id="array-of-objects",
        ),
        pytest.param(
            {"MAIL": "a", "UserPrincipalName": "b", "mobilephone": "c"},
            USER_FIELDS,
            {"MAIL": MASK, "UserPrincipalName": MASK, "mobilephone": MASK},
            3,
            id="case-insensitive-names",
        ),
        pytest.param(
            {
                "keyCredentials": [
                    {"keyId": "k1", "key": {"raw": "MIIB"}},
                    {"keyId": "k2", "key": None},
                ]
            },
            SECRET_FIELDS,
            {"keyCredentials": [{"keyId": "k1", "key": {"raw": MASK}}, {"keyId": "k2", "key": None}]},
            2,
            id="object-keeps-its-keys-null-stays-null",
        ),
        pytest.param(
            {"mobilePhone": 5551234, "mail": ["a", "b"], "userPrincipalName": True},
            USER_FIELDS,
            {"mobilePhone": None, "mail": [MASK, MASK], "userPrincipalName": None},
            3,
            id="non-string-scalars-become-null-lists-stay-lists",
        ),
        pytest.param(
            {"keyId": "k", "displayName": "d", "hint": "abc", "secretText": "abc8Q~xyz"},
            SECRET_FIELDS,
            {"keyId": "k", "displayName": "d", "hint": MASK, "secretText": MASK},
            2,
            id="addPassword-answer",
        ),
        pytest.param(
            {"id": "1", "displayName": "no sensitive fields"},
            USER_FIELDS,
            {"id": "1", "displayName": "no sensitive fields"},
            0,
            id="nothing-to-mask",
        ),
        pytest.param(
            [{"mail": "a"}, "mail", 3], USER_FIELDS, [{"mail": MASK}, "mail", 3], 1, id="root-list"
        ),
        pytest.param("mail", USER_FIELDS, "mail", 0, id="root-scalar"),
    ],
)
def test_mask_document(doc, fields, expected, count):
    masked, n = mask_document(doc, fields)
    assert masked == expected
    assert n == count
    if isinstance(doc, (dict, list)):
        # Masked in place: the freshly parsed document is the gateway's own, so nothing is copied.
        assert masked is doc


def test_batch_response_bodies_are_masked_like_any_other():
    batch = {
        "responses": [
            {
                "id": "1",
                "status": 200,
                "headers": {"Content-Type": "application/json"},
                "body": {"value": [{"id": "u1", "mail": "a@contoso.com"}]},
            },
            {"id": "2", "status": 200, "body": {"id": "u2", "userPrincipalName": "b@contoso.com"}},
            {"id": "3", "status": 404, "body": {"error": {"code": "Request_ResourceNotFound"}}},
        ]
    }
    error = json.loads(json.dumps(batch["responses"][2]))
    masked, n = mask_document(batch, USER_FIELDS)
    assert n == 2
    assert masked["responses"][0]["body"]["value"][0] == {"id": "u1", "mail": MASK}
    assert masked["responses"][1]["body"] == {"id": "u2", "userPrincipalName": MASK}
    assert masked["responses"][2] == error
    assert "a@contoso.com" not in json.dumps(masked)


def test_deep_nesting_raises_masking_error_not_recursion_error():
    doc: object = {"mail": "x"}
    for _ in range(100_000):
        doc = {"a": [doc]}
    with pytest.raises(MaskingError, match="deeper than"):
        mask_document(doc, USER_FIELDS)


def test_depth_limit_is_exact():
    def nested(depth):
        doc: object = {"mail": "x"}
        for _ in range(depth - 1):
            doc = {"a": doc}
        return doc

    _, n = mask_document(nested(MAX_DEPTH), USER_FIELDS)
    assert n == 1
    with pytest.raises(MaskingError):
        mask_document(nested(MAX_DEPTH + 1), USER_FIELDS)


def test_a_masked_subtree_keeps_its_shape():
    masked, n = mask_document({"mail": [["a", ["b"]], {"c": [1, None]}]}, USER_FIELDS)
    assert masked == {"mail": [[MASK, [MASK]], {"c": [None, None]}]} and n == 1


@pytest.mark.parametrize(
    ("body", "expected", "count"),
    [
        (b'{"mail":"a@contoso.com","id":"1"}', {"mail": MASK, "id": "1"}, 1),
        (
            b'{"displayName":"J\xc3\xa9r\xc3\xb4me","mail":"j@contoso.com"}',
            {"displayName": "Jérôme", "mail": MASK},
            1,
        ),
        # Duplicate keys: the parser keeps the last; output has one key, masked.
        (b'{"mail":"first@contoso.com","mail":"second@contoso.com"}', {"mail": MASK}, 1),
        (b'{"mail":"a","MAIL":"b"}', {"mail": MASK, "MAIL": MASK}, 2),
        (b'\xef\xbb\xbf{"mail":"bom"}', {"mail": MASK}, 1),
        (b'{"value":[]}', {"value": []}, 0),
    ],
)
def test_mask_json_bytes(body, expected, count):
    out, n = mask_json_bytes(body, USER_FIELDS)
    assert json.loads(out) == expected
    assert n == count


def test_mask_json_bytes_output_is_compact_utf8():
    out, _ = mask_json_bytes('{ "displayName" : "Jérôme" ,\n "mail": "x" }'.encode(), USER_FIELDS)
    assert out == '{"displayName":"Jérôme","mail":"[masked]"}'.encode()


def test_duplicate_key_cannot_smuggle_a_value_past_masking():
    out, _ = mask_json_bytes(b'{"mail":"hidden@contoso.com","mail":"x"}', USER_FIELDS)
    assert b"hidden@contoso.com" not in out


def test_lone_surrogate_is_kept_escaped():
    out, n = mask_json_bytes(b'{"displayName":"\\ud800","mail":"x"}', USER_FIELDS)
    assert n == 1
    assert json.loads(out) == {"displayName": "\ud800", "mail": MASK}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b'{"mail": "a"', id="truncated"),
        pytest.param(b"<html>error</html>", id="html"),
        pytest.param(b'{"mail": NaN}', id="nan"),
        pytest.param(b'{"mail": Infinity}', id="infinity"),
        pytest.param(b'{"mail": "\xff\xfe"}', id="invalid-utf8"),
        pytest.param(b'{"a": 1} {"mail": "x"}', id="trailing-document"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeper-than-the-parser"),
        pytest.param(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), id="deeper-than-the-limit"),
    ],
)
def test_mask_json_bytes_refuses_what_is_not_json(body):
    with pytest.raises(MaskingError):
        mask_json_bytes(body, USER_FIELDS)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("identities[].issuerAssignedId", "issuerAssignedId"),
        ("keyCredentials[].key", "'key'"),
    ],
)
def test_path_spelt_field_names_are_rejected_not_silently_ignored(name, why):
    with pytest.raises(ValueError, match=why) as e:
        MaskProfile("p", [name])
    assert "paths" in str(e.value)  # says where a path belongs
    with pytest.raises(ValueError):
        mask_document({"identities": [{"issuerAssignedId": "x"}]}, frozenset({name}))


def test_mask_fields_accepts_graph_names():
    fields = MaskProfile("p", ["mail", "@microsoft.graph.downloadUrl"])
    masked, n = mask_document({"@Microsoft.Graph.DownloadUrl": "https://x/?tempauth=1"}, fields)
    assert masked == {"@Microsoft.Graph.DownloadUrl": MASK} and n == 1


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        (
            "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false",
            True,
        ),
        ("Application/JSON", True),
        ("application/problem+json", True),
        ("application/vnd.api+json; charset=utf-8", True),
        ("text/json", True),
        ("text/html", False),
        ("text/plain", False),
        ("application/jsonp", False),
        ("application/+json", False),
        ("application/x-www-form-urlencoded", False),
        ("image/svg+xml", False),
        ("", False),
    ],
)
def test_is_json_content_type(content_type, expected):
    assert is_json_content_type(content_type) is expected
