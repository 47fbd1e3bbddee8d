"""Admission checks: size limits, transfer codings and method overrides, before any rule."""

from __future__ import annotations

import json

import pytest

from nhi_gateway.policy.admission import (
    LIMITS,
    method_override,
    protocol_error_body,
    size_refusal,
    transfer_encoding_refusal,
)

TOKEN_HEADER = ("Authorization", "Bearer " + "a" * 6000)  # a large real token: well within the limits
SDK_HEADERS = [("Host", "graph.microsoft.com"), ("User-Agent", "msgraph-sdk-python/1.0"), TOKEN_HEADER,
               ("Accept", "application/json"), ("ConsistencyLevel", "eventual"),
               ("client-request-id", "7d3b0f0e-3c51-4f0e-9d1b-6a4cbb1c2a10"), ("SdkVersion", "graph-python/1.0")]


def test_what_graph_clients_send_is_within_the_limits():
    target = "/v1.0/users?$filter=" + " or ".join(f"id eq '{i:036d}'" for i in range(15)) + "&$select=id,displayName"
    assert size_refusal(target, SDK_HEADERS) is None


@pytest.mark.parametrize("target, fields, status, says", [
    ("/v1.0/users?x=" + "a" * LIMITS.target, [], 414, "request target"),
    ("/v1.0/users", [("X-Big", "b" * LIMITS.header_field)], 431, "'X-Big'"),
    ("/v1.0/users", [(f"X-{i}", "v") for i in range(LIMITS.header_count + 1)], 431, "header fields"),
    ("/v1.0/users", [(f"X-{i}", "v" * 8000) for i in range(9)], 431, "together"),
    # bytes, as sent: a non-UTF-8 target is counted, not decoded
    (b"/v1.0/users?" + b"\xff" * (LIMITS.target + 1), [], 414, "request target"),
])
def test_oversized_targets_and_headers_are_refused(target, fields, status, says):
    refusal = size_refusal(target, fields)
    assert refusal is not None and refusal.status == status and refusal.check == "size"
    assert says in refusal.message
    assert refusal.decision().to_dict()["stage"] == "request"


@pytest.mark.parametrize("values, refused", [
    ([], False),
    (["chunked"], False),
    ([" Chunked "], False),
    (["gzip, chunked"], True),
    (["gzip"], True),
    (["identity"], True),
    (["chunked", "chunked"], True),
    (["deflate", "chunked"], True),
    (["xchunked"], True),
])
def test_only_chunked_transfer_coding_is_accepted(values, refused):
    refusal = transfer_encoding_refusal(values)
    assert (refusal is not None) is refused
    if refused:
        assert refusal.status == 400 and refusal.check == "transfer_encoding"


@pytest.mark.parametrize("headers, query, body, content_type", [
    ([("X-HTTP-Method-Override", "DELETE")], "", b"", ""),
    ([("x-http-method", "DELETE")], "", b"", ""),
    ([("X-Method-Override", "PATCH")], "", b"", ""),
    ([(" X-HTTP-METHOD-OVERRIDE ", "DELETE")], "", b"", ""),
    ([], "_method=DELETE", b"", ""),
    ([], "$top=1&_METHOD=DELETE", b"", ""),
    ([], "%5Fmethod=DELETE", b"", ""),
    ([], "%5f%6Dethod=DELETE", b"", ""),
    ([], "_method", b"", ""),
    ([], "", b"a=1&_method=DELETE", "application/x-www-form-urlencoded; charset=utf-8"),
    ([], "", b"%5Fmethod=DELETE", "application/x-www-form-urlencoded"),
    ([], "", b'{"_method": "DELETE", "displayName": "x"}', "application/json"),
    ([], "", b'{"_Method": "DELETE"}', "application/json; charset=utf-8"),
    ([], "", b'{"\\u005f\\u006dethod": "DELETE"}', "application/json"),
    ([], "", b'{"_method": "DELETE"}', "application/merge-patch+json"),
])
def test_method_overrides_are_found_wherever_they_are_spelled(headers, query, body, content_type):
    assert method_override(headers, query, body, content_type) is not None


@pytest.mark.parametrize("headers, query, body, content_type", [
    ([("Content-Type", "application/json")], "$filter=method eq 'x'", b"", ""),
    ([], "my_method=x&method=y", b"", ""),
    ([], "", b'{"displayName": "_method", "nested": {"_method": "DELETE"}}', "application/json"),
    ([], "", b"_method=DELETE", "text/plain"),  # Graph reads no such body as parameters
    ([], "", b"not json {_method", "application/json"),
])
def test_ordinary_requests_are_not_overrides(headers, query, body, content_type):
    assert method_override(headers, query, body, content_type) is None


@pytest.mark.parametrize("status", [400, 413, 502, 503])
def test_answers_mitmproxy_writes_are_graph_errors_naming_no_address(status):
    doc = json.loads(protocol_error_body(status))
    assert set(doc["error"]) == {"code", "message", "innerError"}
    assert doc["error"]["innerError"]["nhi-gateway"]["stage"] == "proxy"
    assert "127.0.0.1" not in doc["error"]["message"]
