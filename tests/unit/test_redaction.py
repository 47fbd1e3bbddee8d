import base64
import gzip
import io
import json
import threading

import pytest
from mitmproxy import http
from mitmproxy.io import FlowReader, FlowWriter
from mitmproxy.test import tflow

from nhi_gateway.decision import Action, Decision, Stage
from nhi_gateway.redaction import REDACTED, redact_flow_for_disk, redact_url, redacted_state, scrub_text

JWT = (
    "eyJ0eXAiOiJKV1QiLCJub25jZSI6ImFiYyIsImFsZyI6IlJTMjU2In0"
    ".eyJhdWQiOiJodHRwczovL2dyYXBoLm1pY3Jvc29mdC5jb20iLCJ0aWQiOiJ0In0"
    ".c2lnbmF0dXJlLWJ5dGVzLWdvLWhlcmU"
)
ASSERTION = "eyJhbGciOiJSUzI1NiIsIng1dCI6IngifQ.eyJpc3MiOiJjbGllbnQifQ.YXNzZXJ0aW9uLXNpZw"
ENTRA_SECRET = "Zx48Q~abcdefghijklmnopqrstuvwxyz0123456"  # shape of an Entra client secret
TOKEN_URL = "https://login.microsoftonline.com/tenant/oauth2/v2.0/token"
GRAPH = "https://graph.microsoft.com/v1.0"
FORM = {"content-type": "application/x-www-form-urlencoded"}
JSON = {"content-type": "application/json; charset=utf-8"}


def flow_of(method="GET", url=f"{GRAPH}/users", body=b"", headers=None, response=None):
    req = http.Request.make(method, url, body, headers or {})
    return tflow.tflow(req=req, resp=response or False)


def resp(body=b"", headers=None, status=200):
    return http.Response.make(status, body, headers or {})


def on_disk(flow: http.HTTPFlow) -> bytes:
    buf = io.BytesIO()
    FlowWriter(buf).add(flow)
    return buf.getvalue()


def read_back(data: bytes) -> http.HTTPFlow:
    (flow,) = list(FlowReader(io.BytesIO(data)).stream())
    return flow


def form(**fields) -> bytes:
    return "&".join(f"{k}={v}" for k, v in fields.items()).encode()


# (name, flow builder, secrets that must not reach the disk, text that must still be there)
CASES = [
    (
        "authorization-bearer",
        lambda: flow_of(headers={"Authorization": f"Bearer {JWT}"}),
        [JWT],
        [b"Bearer [redacted]"],
    ),
    (
        "proxy-authorization-basic",
        lambda: flow_of(
            headers={
                "Proxy-Authorization": "Basic " + base64.b64encode(f"agent:{JWT}".encode()).decode()
            }
        ),
        [base64.b64encode(f"agent:{JWT}".encode()).decode()],
        [b"Basic [redacted]"],
    ),
    (
        "authorization-bare-token",
        lambda: flow_of(headers={"Authorization": "sk-live-0123456789abcdef"}),
        ["sk-live-0123456789abcdef"],
        [],
    ),
    (
        "cookie",
        lambda: flow_of(headers={"Cookie": "session=c00kie-s3cret; theme=dark; barecookietoken"}),
        ["c00kie-s3cret", "barecookietoken"],
        [b"session=[redacted]"],
    ),
    (
        "set-cookie",
        lambda: flow_of(
            response=resp(
                headers={
                    "Set-Cookie": "ESTSAUTH=s3t-c00kie; path=/; secure; HttpOnly; x=evil-attr-val"
                }
            )
        ),
        ["s3t-c00kie", "evil-attr-val"],
        [b"ESTSAUTH=[redacted]; path=/; secure; HttpOnly"],
    ),
    (
        "token-request-client-secret",
        lambda: flow_of(
            "POST",
            TOKEN_URL,
            form(
                grant_type="client_credentials",
                client_id="11111111-2222",
                client_secret=ENTRA_SECRET,
                scope="https%3A%2F%2Fgraph.microsoft.com%2F.default",
            ),
            FORM,
        ),
        [ENTRA_SECRET],
        [b"grant_type=client_credentials", b"client_id=11111111-2222", b"client_secret=[redacted]"],
    ),
    (
        "token-request-client-assertion",
        lambda: flow_of(
            "POST",
            TOKEN_URL,
            form(
                grant_type="client_credentials",
                client_assertion_type="urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer",
                client_assertion=ASSERTION,
            ),
            FORM,
        ),
        [ASSERTION],
        [b"client_assertion_type=urn%3Aietf", b"client_assertion=[redacted]"],
    ),
    (
        "form-password-refresh-code-assertion",
        lambda: flow_of(
            "POST",
            TOKEN_URL,
            form(
                password="hunter2-pw",
                refresh_token="0.ARrefresh",
                code="auth-code-xyz",
                assertion="obo-assert",
            ),
            FORM,
        ),
        ["hunter2-pw", "0.ARrefresh", "auth-code-xyz", "obo-assert"],
        [b"password=[redacted]"],
    ),
    (
        "form-without-content-type",
        lambda: flow_of("POST", TOKEN_URL, form(client_id="x", client_secret="no-ct-s3cret")),
        ["no-ct-s3cret"],
        [b"client_id=x"],
    ),
    (
        "token-response",
        lambda: flow_of(
            "POST",
            TOKEN_URL,
            response=resp(
                json.dumps(
                    {
                        "token_type": "Bearer",
                        "expires_in": 3599,
                        "access_token": JWT,
                        "refresh_token": "rt-opaque-1",
                    }
                ).encode(),
                JSON,
            ),
        ),
        [JWT, "rt-opaque-1"],
        [b'"token_type":"Bearer"', b'"expires_in":3599'],
    ),
    (
        "token-response-v1-id-token",
        lambda: flow_of(
            "POST",
            "https://login.microsoftonline.com/tenant/oauth2/token",
            response=resp(
                json.dumps(
                    {
                        "token_type": "Bearer",
                        "resource": "https://graph.microsoft.com",
                        "access_token": JWT,
                        "id_token": ASSERTION,
                        "refresh_token": "0.AAAA-opaque-refresh",
                    }
                ).encode(),
                JSON,
            ),
        ),
        [JWT, ASSERTION, "0.AAAA-opaque-refresh"],
        [b'"resource":"https://graph.microsoft.com"'],
    ),
    (
        "json-create-user-password-profile",
        lambda: flow_of(
            "POST",
            f"{GRAPH}/users",
            json.dumps(
                {
                    "accountEnabled": True,
                    "displayName": "Adele",
                    "passwordProfile": {"password": "Cr3ate-Pa55!", "forceChangePasswordNextSignIn": False},
                }
            ).encode(),
            JSON,
        ),
        ["Cr3ate-Pa55!"],
        [b'"displayName":"Adele"'],
    ),
    (
        "json-change-password",
        lambda: flow_of(
            "POST",
            f"{GRAPH}/me/changePassword",
            b'{"currentPassword": "0ld-Pa55", "newPassword": "N3w-Pa55"}',
            JSON,
        ),
        ["0ld-Pa55", "N3w-Pa55"],
        [],
    ),
    (
        "json-client-secret-and-assertion",
        lambda: flow_of(
            "POST",
            f"{GRAPH}/x",
            json.dumps({"client_secret": "json-s3cret", "client_assertion": "json-assert"}).encode(),
            JSON,
        ),
        ["json-s3cret", "json-assert"],
        [],
    ),
    (
        "cookie-headers-repeated",
        lambda: _two_cookie_headers(flow_of()),
        ["first-c00kie", "second-c00kie"],
        [b"a=[redacted]", b"b=[redacted]"],
    ),
    (
        "json-password-profile",
        lambda: flow_of(
            "PATCH",
            f"{GRAPH}/users/u1",
            json.dumps(
                {
                    "passwordProfile": {
                        "forceChangePasswordNextSignIn": True,
                        "password": "N3w-Pa55!",
                    }
                }
            ).encode(),
            JSON,
        ),
        ["N3w-Pa55!"],
        [b"forceChangePasswordNextSignIn"],
    ),
    (
        "add-password-secret-text",
        lambda: flow_of(
            "POST",
            f"{GRAPH}/applications/a1/addPassword",
            response=resp(
                json.dumps(
                    {"keyId": "k1", "hint": "Zx4", "secretText": "opaque-secret-text-1"}
                ).encode(),
                {"content-type": "application/json;odata.metadata=minimal"},
            ),
        ),
        ["opaque-secret-text-1"],
        [b'"keyId":"k1"'],
    ),
    (
        "json-escaped-member-name",
        lambda: flow_of(
            "POST", f"{GRAPH}/x", b'{"client_\\u0073ecret": "escaped-s3cret", "id": "1"}', JSON
        ),
        ["escaped-s3cret"],
        [],
    ),
    (
        "json-escaped-jwt",
        lambda: flow_of(
            "POST", f"{GRAPH}/x", b'{"note": "\\u0065' + JWT[1:].encode() + b'"}', JSON
        ),
        [JWT[1:]],
        [],
    ),
    (
        "json-duplicate-key-hides-a-token",
        lambda: flow_of(
            "POST", f"{GRAPH}/x", f'{{"note": "{JWT}", "note": "clean"}}'.encode(), JSON
        ),
        [JWT],
        [b'"note": "clean"'],
    ),
    # Member names are compared casefolded: "ß" and "ſ" fold to ASCII letters.
    (
        "json-member-name-upper-case",
        lambda: flow_of("POST", f"{GRAPH}/x", b'{"PASSWORD": "upper-Pa55"}', JSON),
        ["upper-Pa55"],
        [],
    ),
    (
        "json-member-name-eszett",
        lambda: flow_of("POST", f"{GRAPH}/x", '{"pa\u00dfword": "eszett-Pa55"}'.encode(), JSON),
        ["eszett-Pa55"],
        [],
    ),
    (
        "json-member-name-long-s",
        lambda: flow_of("POST", f"{GRAPH}/x", '{"\u017fecretText": "long-s-s3cret"}'.encode(), JSON),
        ["long-s-s3cret"],
        [],
    ),
    (
        "json-under-wrong-content-type",
        lambda: flow_of(
            response=resp(
                json.dumps({"access_token": "wrong-ct-tok"}).encode(),
                {"content-type": "text/plain"},
            )
        ),
        ["wrong-ct-tok"],
        [],
    ),
    (
        "jwt-in-text-body",
        lambda: flow_of(
            response=resp(f"<p>your token is {JWT}</p>".encode(), {"content-type": "text/html"})
        ),
        [JWT],
        [b"your token is [redacted]"],
    ),
    (
        "entra-secret-in-text-body",
        lambda: flow_of(
            response=resp(f"secret: {ENTRA_SECRET}".encode(), {"content-type": "text/plain"})
        ),
        [ENTRA_SECRET],
        [],
    ),
    (
        "jwt-in-any-header",
        lambda: flow_of(headers={"X-Forwarded-Token-Anything": JWT, "X-Custom": f"v={JWT}"}),
        [JWT],
        [],
    ),
    (
        "secret-header-name-beyond-ascii",
        lambda: _with_raw_header(flow_of(), "X-Pa\u017f\u017fword", "non-ascii-name-s3cret"),
        ["non-ascii-name-s3cret"],
        [],
    ),
    (
        "api-key-header",
        lambda: flow_of(headers={"Ocp-Apim-Subscription-Key": "0123abcd-key"}),
        ["0123abcd-key"],
        [],
    ),
    (
        "url-query",
        lambda: flow_of(
            url=f"{GRAPH}/users?$select=id,mail&access_token=q-tok-1&sig=sas-sig-1&token=tok-param-1"
        ),
        ["q-tok-1", "sas-sig-1", "tok-param-1"],
        [b"$select=id,mail"],
    ),
    (
        "location-header",
        lambda: flow_of(
            response=resp(
                headers={"Location": "https://app.example/cb?code=loc-code-1&state=s"}, status=302
            )
        ),
        ["loc-code-1"],
        [b"state=s"],
    ),
    (
        "proxyauth-metadata",
        lambda: _with_metadata(flow_of(), proxyauth=("agent", "proxy-pa55word")),
        ["proxy-pa55word"],
        [],
    ),
    (
        "jwt-in-metadata",
        lambda: _with_metadata(flow_of(), note={"seen": [f"Bearer {JWT}"]}),
        [JWT],
        [b"Bearer [redacted]"],
    ),
    (
        "error-message",
        lambda: _with_error(flow_of(), f"upstream rejected {JWT}"),
        [JWT],
        [],
    ),
    (
        "undo-backup-holds-the-original",
        lambda: _backed_up(flow_of(headers={"Authorization": f"Bearer {JWT}"})),
        [JWT],
        [],
    ),
]


def _gzipped(response):
    response.headers["content-encoding"] = "gzip"
    response.content = response.raw_content  # encoded with gzip on the way in
    return response


def _gzipped_request(f):
    f.request.headers["content-encoding"] = "gzip"
    f.request.content = f.request.raw_content
    return f


def _two_cookie_headers(f):
    f.request.headers.add("Cookie", "a=first-c00kie")
    f.request.headers.add("Cookie", "b=second-c00kie")
    return f


def _with_raw_header(f, name, value):
    f.request.headers.fields += ((name.encode(), value.encode()),)
    return f


def _with_metadata(f, **meta):
    f.metadata.update(meta)
    return f


def _with_error(f, msg):
    f.error = tflow.terr(msg)
    return f


def _backed_up(f):
    f.backup()
    f.request.headers["x-edited"] = "1"
    return f


@pytest.mark.parametrize(
    ("build", "secrets", "kept"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_no_credential_reaches_the_disk(build, secrets, kept):
    live = build()
    before = on_disk(live)
    for secret in secrets:
        assert secret.encode() in before, "the case must put the secret in the flow"

    disk = redact_flow_for_disk(live)
    data = on_disk(disk)

    for secret in secrets:
        assert secret.encode() not in data
    for text in kept:
        assert text in data, data
    assert on_disk(live) == before, "the live flow must not change"
    assert read_back(data).id == live.id


@pytest.mark.parametrize(
    ("build", "secret"),
    [
        (
            lambda: flow_of(
                "POST",
                TOKEN_URL,
                response=_gzipped(
                    resp(json.dumps({"access_token": "gz-opaque-tok", "expires_in": 1}).encode(), JSON)
                ),
            ),
            "gz-opaque-tok",
        ),
        (
            lambda: _gzipped_request(
                flow_of(
                    "PATCH",
                    f"{GRAPH}/users/u1",
                    json.dumps({"passwordProfile": {"password": "gz-Pa55-w0rd"}}).encode(),
                    JSON,
                )
            ),
            "gz-Pa55-w0rd",
        ),
    ],
    ids=["token-response", "password-profile-request"],
)
def test_secrets_in_compressed_bodies_are_redacted(build, secret):
    live = build()
    message = live.response if live.response else live.request
    assert secret.encode() not in message.raw_content  # compressed on the wire
    assert secret in message.get_text()
    disk = read_back(on_disk(redact_flow_for_disk(live)))
    written = disk.response if live.response else disk.request
    assert written.headers["content-encoding"] == "gzip"
    assert secret not in written.get_text(strict=True)
    assert REDACTED in written.get_text(strict=True)


def test_live_flow_is_untouched_and_the_copy_is_not_live():
    live = flow_of(
        "POST",
        TOKEN_URL,
        form(client_secret="s3cr3t"),
        FORM | {"Authorization": f"Bearer {JWT}"},
        response=resp(json.dumps({"access_token": JWT}).encode(), JSON),
    )
    state = live.get_state()
    disk = redact_flow_for_disk(live)
    assert live.get_state() == state
    assert live.request.headers["Authorization"] == f"Bearer {JWT}"
    assert live.request.content == b"client_secret=s3cr3t"
    assert disk is not live and disk.request is not live.request
    assert disk.live is False and live.live is True
    assert disk.id == live.id
    assert disk.request.headers["Authorization"] == "Bearer [redacted]"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"Bearer {JWT}", "Bearer [redacted]"),
        (f"bearer {JWT}", "bearer [redacted]"),
        ("Basic YWdlbnQ6cGFzcw==", "Basic [redacted]"),
        ('PoP eyJhbGciOi, nonce="x"', "PoP [redacted]"),
        ('Digest username="a", response="b"', "Digest [redacted]"),
        (JWT, REDACTED),
        ("opaque-token-without-scheme", REDACTED),
        ("Secret-looking-word token", REDACTED),
    ],
)
def test_authorization_keeps_only_a_known_scheme(value, expected):
    disk = redact_flow_for_disk(flow_of(headers={"Authorization": value}))
    assert disk.request.headers["Authorization"] == expected


def test_gzip_encoded_body_stays_gzip():
    body = json.dumps({"access_token": JWT, "token_type": "Bearer"}).encode()
    live = flow_of(response=resp(b"", JSON | {"content-encoding": "gzip"}))
    live.response.content = body  # encodes with the declared Content-Encoding
    raw_before = live.response.raw_content
    assert raw_before[:2] == b"\x1f\x8b"

    disk = read_back(on_disk(redact_flow_for_disk(live)))
    assert disk.response.headers["content-encoding"] == "gzip"
    assert disk.response.raw_content[:2] == b"\x1f\x8b"
    decoded = gzip.decompress(disk.response.raw_content)
    assert json.loads(decoded) == {"access_token": REDACTED, "token_type": "Bearer"}
    assert disk.response.headers["content-length"] == str(len(disk.response.raw_content))
    assert live.response.raw_content == raw_before


@pytest.mark.parametrize("charset", ["utf-16-le", "iso-8859-1", "utf-8"])
def test_body_charset_is_kept(charset):
    text = f"Jérôme's token: {JWT}"
    headers = {"content-type": f"text/plain; charset={charset}"}
    live = flow_of(response=resp(text.encode(charset), headers))
    disk = read_back(on_disk(redact_flow_for_disk(live)))
    assert disk.response.raw_content == "Jérôme's token: [redacted]".encode(charset)


@pytest.mark.parametrize(
    ("headers", "raw", "why"),
    [
        pytest.param(
            {"content-encoding": "gzip", "content-type": "text/plain"},
            b"not gzip at all: client_secret=plain-s3cret",
            "undecodable",
            id="broken-gzip",
        ),
        pytest.param(
            {"content-type": "text/plain; charset=utf-8"},
            b"\xff\xfe client_secret=plain-s3cret \xff",
            "undecodable",
            id="invalid-charset",
        ),
        pytest.param(
            {"content-type": "application/json"},
            b'{"pass\\u0077ord": "plain-s3cret", truncated',
            "invalid-json",
            id="declared-json-that-does-not-parse",
        ),
    ],
)
def test_a_body_that_cannot_be_read_is_withheld_not_written_raw(headers, raw, why):
    live = flow_of("POST", f"{GRAPH}/x", b"", headers)
    live.request.raw_content = raw
    data = on_disk(redact_flow_for_disk(live))
    assert b"plain-s3cret" not in data
    disk = read_back(data)
    assert disk.request.content.startswith(b"[nhi-gateway: body withheld from the recording")
    assert "content-encoding" not in disk.request.headers
    assert disk.metadata["nhi_gateway.withheld"] == {"request": why}
    assert live.request.raw_content == raw


def test_unserialisable_metadata_is_left_out():
    live = flow_of()
    decision = Decision(Action.ALLOW, Stage.POLICY, "ok")
    live.metadata.update(
        {
            "nhi_gateway.decision": decision.to_dict(),
            "decision_object": decision,
            "lock": threading.Lock(),
            "tuple": ("a", 1),
        }
    )
    disk = redact_flow_for_disk(live)
    assert set(disk.metadata) == {"nhi_gateway.decision", "tuple"}
    back = read_back(on_disk(disk))
    assert Decision.from_dict(back.metadata["nhi_gateway.decision"]) == decision
    assert back.metadata["tuple"] == ["a", 1]
    assert live.metadata["decision_object"] is decision and "lock" in live.metadata


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ({"nested": [1, 2.5, None, True, b"raw", "J\u00e9r\u00f4me", {"k": -1}]}, True),
        (threading.Event(), False),
        ([1, object()], False),  # one bad item leaves the whole key out
        ({"k": {1, 2}}, False),
        ("lone surrogate \udcff", False),  # not UTF-8: tnetstring cannot write it
    ],
    ids=["serialisable", "live-object", "bad-item", "set", "surrogate"],
)
def test_metadata_is_kept_only_when_mitmproxy_can_write_it(value, kept):
    live = flow_of()
    live.metadata["x"] = value
    disk = read_back(on_disk(redact_flow_for_disk(live)))
    assert ("x" in disk.metadata) is kept
    if kept:
        assert disk.metadata["x"] == value
    assert live.metadata["x"] is value


def _without_key(f):
    del f.request.headers["sec-websocket-key"]  # redacted: a header named like a key
    return f


@pytest.mark.parametrize(
    "build",
    [lambda: tflow.tflow(resp=True), lambda: tflow.tflow(err=True), lambda: _without_key(tflow.twebsocketflow())],
    ids=["response", "error", "websocket"],
)
def test_a_flow_with_nothing_to_redact_is_written_as_mitmproxy_would(build):
    """The recorder serialises the redacted state itself: it must be mitmproxy's own state."""
    live = build()
    live.metadata["note"] = {"seen": ["a", 1]}
    expected = live.get_state()
    del expected["client_conn"], expected["server_conn"]
    assert redacted_state(live) == expected


def test_websocket_messages_are_scrubbed():
    live = tflow.twebsocketflow()
    live.websocket.messages[0].content = f"token={JWT}".encode()
    data = on_disk(redact_flow_for_disk(live))
    assert JWT.encode() not in data
    assert f"token={JWT}".encode() == live.websocket.messages[0].content


def test_non_secret_json_is_written_as_it_was_sent():
    body = b'{\n  "displayName": "J\xc3\xa9r\xc3\xb4me",\n  "id": "1"\n}'
    live = flow_of(response=resp(body, JSON))
    disk = redact_flow_for_disk(live)
    assert disk.response.raw_content == body


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            f"{TOKEN_URL}?client_secret=abc&client_id=x",
            f"{TOKEN_URL}?client_secret=[redacted]&client_id=x",
        ),
        (f"{GRAPH}/me?access_token=abc", f"{GRAPH}/me?access_token=[redacted]"),
        (f"{GRAPH}/me?Access_Token=abc", f"{GRAPH}/me?Access_Token=[redacted]"),
        (f"{GRAPH}/me?client_assertion={ASSERTION}", f"{GRAPH}/me?client_assertion=[redacted]"),
        ("https://app/cb?code=abc&state=xyz", "https://app/cb?code=[redacted]&state=xyz"),
        ("https://app/login?user=a&password=pw", "https://app/login?user=a&password=[redacted]"),
        (
            "https://acct.blob.core.windows.net/c/b?sv=2022&sig=AbC%2Bd%3D",
            "https://acct.blob.core.windows.net/c/b?sv=2022&sig=[redacted]",
        ),
        ("https://x/?token=abc", "https://x/?token=[redacted]"),
        (
            "https://contoso-my.sharepoint.com/download.aspx?UniqueId=1&tempauth=eyJ0eXAi.x.y",
            "https://contoso-my.sharepoint.com/download.aspx?UniqueId=1&tempauth=[redacted]",
        ),
        (
            "https://agent:s3cret@graph.microsoft.com/v1.0/users",
            "https://[redacted]@graph.microsoft.com/v1.0/users",
        ),
        (f"http://agent:{JWT}@127.0.0.1:8080", "http://[redacted]@127.0.0.1:8080"),
        (
            "https://app/cb#access_token=abc&token_type=Bearer",
            "https://app/cb#access_token=[redacted]&token_type=Bearer",
        ),
        (f"{GRAPH}/users?x={JWT}", f"{GRAPH}/users?x=[redacted]"),
        (f"{GRAPH}/users/{JWT}/manager", f"{GRAPH}/users/[redacted]/manager"),
        (f"{GRAPH}/users?x=%65{JWT[1:]}", f"{GRAPH}/users?x=[redacted]"),
        # Not credentials: kept byte for byte, including percent-encoding.
        (
            f"{GRAPH}/users?$filter=startswith(displayName,'a')&$select=id,mail&$top=5",
            f"{GRAPH}/users?$filter=startswith(displayName,'a')&$select=id,mail&$top=5",
        ),
        (
            f"{GRAPH}/users?$skiptoken=X%27abc%27&$count=true",
            f"{GRAPH}/users?$skiptoken=X%27abc%27&$count=true",
        ),
        (f"{GRAPH}/users/delta?$deltatoken=abc", f"{GRAPH}/users/delta?$deltatoken=abc"),
        ("/v1.0/users?code=1", "/v1.0/users?code=[redacted]"),
        ("https://x/?flag&code", "https://x/?flag&code"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_url_survives_a_malformed_url():
    out = redact_url("http://agent:pw@[::1/x?client_secret=abc")
    assert "pw" not in out and "abc" not in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"a {JWT} b", "a [redacted] b"),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "[redacted]"),  # unsigned: still a bearer token
        ("eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d", "[redacted]"),  # JWE
        (f"secret={ENTRA_SECRET}", "secret=[redacted]"),
        ("eyJ alone is not a token", "eyJ alone is not a token"),
        ("file.name.txt", "file.name.txt"),
    ],
)
def test_scrub_text(text, expected):
    assert scrub_text(text) == expected
