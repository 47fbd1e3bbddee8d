"""Fixtures of the unit tests that drive the gateway's addon chain (see ``tests/support/chain.py``).

- ``authority``: a look-alike Entra with its own signing key, once per module;
- ``tokens``: app tokens from it, ``tokens["reader"]``, ``["reader-2"]``, ``["stranger"]``;
- ``gw``: the chain as the gateway builds it, with ``support.chain.POLICY``, inside mitmproxy's
  ``taddons.context``;
- ``no_exception_escapes_an_addon``: fails a test in which an addon hook raised (mitmproxy would
  log it and go on: fail open). A module that drives the chain opts in with
  ``pytestmark = pytest.mark.usefixtures("no_exception_escapes_an_addon")``.

A module that defines a fixture of the same name uses its own.
"""

from __future__ import annotations

import pytest

from nhi_gateway.lookalike.minting import EntraAuthority
from nhi_gateway.lookalike.pki import SigningKey

from ..support import chain


@pytest.fixture(scope="module")
def authority() -> EntraAuthority:
    return EntraAuthority([SigningKey.generate()])


@pytest.fixture(scope="module")
def tokens(authority) -> dict[str, str]:
    return chain.mint_tokens(authority)


@pytest.fixture
async def gw(tmp_path, authority):
    with chain.running_gateway(tmp_path, authority) as gateway:
        yield gateway


@pytest.fixture
def no_exception_escapes_an_addon():
    chain.escaped.clear()
    yield
    assert not chain.escaped, f"an addon hook raised (mitmproxy logs it and fails open): {chain.escaped!r}"
