"""A token is accepted only in the exact compact JWS form, before any library reads it: three
base64url segments joined by dots and nothing else. Anything around or inside them (CR, LF, spaces,
tabs, '=' padding, a fourth part) could otherwise reach the upstream ``Authorization`` header, where
CR LF splits one request into two (issue 18, item 3)."""

from __future__ import annotations

import base64

import pytest

from nhi_gateway.addons.identity import bearer_token, proxy_token
from nhi_gateway.identity.principal import TokenSource
from nhi_gateway.identity.token_form import is_compact_jws
from nhi_gateway.identity.tokens import TokenRejected, TokenVerifier

GOOD = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl_-"

BAD = {
    "CR LF after the signature": GOOD + "\r\n",
    "smuggled header": GOOD + "\r\nX-Injected: yes",
    "smuggled request": GOOD + "\r\n\r\nGET /v1.0/users HTTP/1.1\r\nHost: graph.microsoft.com\r\n\r\n",
    "LF only": GOOD + "\n",
    "CR only": GOOD + "\r",
    "space inside": GOOD.replace(".", ". ", 1),
    "trailing space": GOOD + " ",
    "leading space": " " + GOOD,
    "tab": GOOD + "\t",
    "padding": GOOD + "==",
    "padding in the payload": GOOD.replace(".eyJzdWIiOiJ4In0.", ".eyJzdWIiOiJ4In0=.", 1),
    "standard base64 alphabet": GOOD.replace("_-", "+/"),
    "four parts": GOOD + ".x",
    "two parts": GOOD.rsplit(".", 1)[0],
    "empty header": "." + GOOD.split(".", 1)[1],
    "NUL": GOOD + "\x00",
    "non-ASCII": GOOD + "é",
    "empty": "",
}


async def refusal(token: str) -> TokenRejected:
    """What the verifier makes of ``token`` when no library may read it."""
    verifier = TokenVerifier(keys=None)  # never reached: the form is checked first
    with pytest.raises(TokenRejected) as e:
        await verifier.verify(token, TokenSource.PROXY, trust=None)
    return e.value


@pytest.mark.parametrize("name", list(BAD))
async def test_anything_but_the_compact_form_is_refused_as_format(name, monkeypatch):
    import jwt

    def must_not_run(*a, **kw):
        raise AssertionError("PyJWT saw a token that is not in the compact form")

    monkeypatch.setattr(jwt, "decode", must_not_run)
    monkeypatch.setattr(jwt, "get_unverified_header", must_not_run)
    assert not is_compact_jws(BAD[name])
    e = await refusal(BAD[name])
    assert e.check == "format"
    assert "compact JWS" in e.message


@pytest.mark.parametrize("token", [GOOD, GOOD.rsplit(".", 1)[0] + "."])
def test_the_compact_form_passes(token):
    # An empty signature is still the compact form; the verifier refuses it as "not signed".
    assert is_compact_jws(token)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("header", [basic("agent", GOOD + "\r\nX-Injected: yes"), basic(GOOD + "\r\n", ""),
                                    f"Bearer {GOOD} junk"])
async def test_proxy_credentials_never_yield_a_token_with_trailing_data(header):
    """Proxy-Authorization is read to the token, then the form decides: never stripped into shape."""
    assert (await refusal(proxy_token(header))).check == "format"


async def test_bearer_header_with_data_after_the_token_is_refused():
    assert (await refusal(bearer_token(f"Bearer {GOOD} X-Injected: yes"))).check == "format"


@pytest.mark.parametrize("tail", ["\r\n", "\r\nX-Injected: yes", "!!!!", "=="])
def test_the_installed_pyjwt_refuses_data_after_the_signature_too(tail):
    """The floor in pyproject (pyjwt>=2.14): the library behind the form check refuses the same
    tokens on its own, so neither layer alone carries the promise."""
    import jwt

    token = jwt.encode({"sub": "x"}, "k" * 32, algorithm="HS256")
    assert jwt.decode(token, "k" * 32, algorithms=["HS256"]) == {"sub": "x"}
    with pytest.raises(jwt.PyJWTError):
        jwt.decode(token + tail, "k" * 32, algorithms=["HS256"])
