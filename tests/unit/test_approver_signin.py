"""``nhi-gateway approvals login``: where the approver's token is kept, and what it is asked for.
The sign-in itself (MSAL's device code flow against the look-alike) runs end to end in
tests/e2e/test_approvals.py."""

from __future__ import annotations

import base64
import json

import pytest

from nhi_gateway.approvals.approver_token import auth_context_claims, claims_challenge
from nhi_gateway.cli import approver_signin
from nhi_gateway.cli.main import main

API = "http://127.0.0.1:8081"


class Backend:
    """A keyring backend in memory, posing as the module it names."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, str], str] = {}

    def set_password(self, service, user, secret):
        self.kept[(service, user)] = secret

    def get_password(self, service, user):
        return self.kept.get((service, user))

    def delete_password(self, service, user):
        del self.kept[(service, user)]


def backend_from(module: str) -> Backend:
    cls = type("Keyring", (Backend,), {"__module__": module})
    return cls()


@pytest.mark.parametrize("module, used", [
    ("keyring.backends.SecretService", True),
    ("keyring.backends.macOS", True),
    ("keyring.backends.Windows", True),
    ("keyrings.alt.file", False),  # PlaintextKeyring / EncryptedKeyring: files
    ("keyring.backends.fail", False),
    ("keyring.backends.null", False),
    ("my_company.keyring", False),
])
def test_only_an_os_keyring_keeps_the_token(monkeypatch, module, used):
    import keyring

    backend = backend_from(module)
    monkeypatch.setattr(keyring, "get_keyring", lambda: backend)
    assert approver_signin.store(API, "tok.en.value") is used
    assert bool(backend.kept) is used
    assert approver_signin.stored(API) == ("tok.en.value" if used else None)


def test_a_chain_of_backends_is_used_only_when_each_is_an_os_keyring(monkeypatch):
    import keyring

    chain = type("ChainerBackend", (), {"__module__": "keyring.backends.chainer"})()
    chain.backends = [backend_from("keyring.backends.SecretService"), backend_from("keyrings.alt.file")]
    monkeypatch.setattr(keyring, "get_keyring", lambda: chain)
    assert approver_signin.os_keyring() is None
    chain.backends = []
    assert approver_signin.os_keyring() is None


def test_the_other_commands_read_the_token_from_the_keyring_and_say_when_it_expired(monkeypatch, capsys):
    import keyring

    backend = backend_from("keyring.backends.SecretService")
    monkeypatch.setattr(keyring, "get_keyring", lambda: backend)
    monkeypatch.delenv("NHI_APPROVER_TOKEN", raising=False)
    assert main(["approvals", "list", "--api", API]) == 1
    assert "run nhi-gateway approvals login" in capsys.readouterr().err
    payload = base64.urlsafe_b64encode(json.dumps({"exp": 1}).encode()).decode().rstrip("=")
    approver_signin.store(API, f"e30.{payload}.c2ln")
    assert main(["approvals", "list", "--api", API]) == 1
    assert "expired: run nhi-gateway approvals login again" in capsys.readouterr().err
    assert main(["approvals", "logout", "--api", API]) == 0
    assert not backend.kept


def test_the_export_line_survives_the_shell():
    assert approver_signin.export_line("a.b-c_d.e") == "export NHI_APPROVER_TOKEN=a.b-c_d.e"
    assert approver_signin.export_line("x;rm -rf") == "export NHI_APPROVER_TOKEN='x;rm -rf'"


def test_the_sign_in_asks_entra_for_the_authentication_context_the_challenge_names():
    challenge = claims_challenge("c1")
    encoded = challenge.split('claims="')[1].rstrip('"')
    assert base64.b64decode(encoded).decode() == auth_context_claims("c1")
    assert json.loads(auth_context_claims("c1")) == {"access_token": {"acrs": {"essential": True, "value": "c1"}}}
