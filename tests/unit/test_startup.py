"""`nhi-gateway run` with a bad option or file stops before anything starts, naming the option,
the path and what to do: no bare errno, no traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from nhi_gateway.cli.main import main

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "policies" / "example.yaml"


def run(capsys, tmp_path, *extra: str) -> tuple[int, str]:
    code = main(["run", "--policy", str(POLICY), "--listen", "127.0.0.1:0", "--confdir", str(tmp_path / "conf"),
                 "--recordings", str(tmp_path / "rec"), *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("make, args, says", [
    (lambda d: (d / "f").touch(), ["--recordings", "{d}/f"], "--recordings {d}/f: is a file, not a directory"),
    (lambda d: (d / "f").touch(), ["--confdir", "{d}/f"], "--confdir {d}/f: is a file, not a directory"),
    (lambda d: None, ["--audit", "{d}/no/such/dir/audit.jsonl"], "--audit {d}/no/such/dir/audit.jsonl: its directory"),
    (lambda d: None, ["--approvals-db", "{d}/nowhere/a.db"], "--approvals-db {d}/nowhere/a.db: its directory"),
    (lambda d: None, ["--state", "sqlite:///{d}/nowhere/a.db"], "--state {d}/nowhere/a.db: its directory"),
    (lambda d: None, ["--state", "sqlite:///{d}/a.db", "--approvals-db", "{d}/b.db"],
     "--state and --approvals-db both say where approvals live: give one of them"),
    (lambda d: None, ["--upstream-ca", "{d}/missing.pem"], "--upstream-ca {d}/missing.pem: no such file"),
    (lambda d: (d / "x.pem").write_text("not a certificate"), ["--upstream-ca", "{d}/x.pem"],
     "--upstream-ca {d}/x.pem: not a PEM file of CA certificates"),
    (lambda d: None, ["--admin-tls-cert", "{d}/c.pem", "--admin-tls-key", "{d}/k.pem"], "--admin-tls-cert {d}/c.pem: no such file"),
])
def test_a_bad_path_names_its_option_and_what_to_do(capsys, tmp_path, make, args, says):
    make(tmp_path)
    code, err = run(capsys, tmp_path, *[a.format(d=tmp_path) for a in args])
    assert code == 2
    assert says.format(d=tmp_path) in err
    assert "Errno" not in err and "Traceback" not in err


@pytest.mark.parametrize("option", ["--listen", "--approvals-listen"])
def test_a_taken_port_says_which_option_to_change(capsys, tmp_path, option):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run(capsys, tmp_path, option, f"127.0.0.1:{port}")
    assert code == 2
    assert f"{option} 127.0.0.1:{port}: the address is already in use; choose another port with {option}" in err


def test_the_default_admin_port_next_to_a_taken_one_is_named(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run(capsys, tmp_path, "--listen", f"127.0.0.1:{port - 1}")
    assert code == 2 and "--approvals-listen" in err and "the default: the --listen port + 1" in err


@pytest.mark.parametrize("value", ["mysql://db/x", "sqlite://", "approvals.sqlite3", "postgresql:/x"])
def test_a_state_that_is_no_backend_says_what_to_write(capsys, tmp_path, value):
    with pytest.raises(SystemExit) as e:
        run(capsys, tmp_path, "--state", value)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not a state backend: write sqlite:///PATH" in err and "postgresql://" in err


def test_a_state_error_never_shows_a_password(capsys, tmp_path):
    with pytest.raises(SystemExit):
        run(capsys, tmp_path, "--state", "mysql://gw:s3cret@db/x")
    assert "s3cret" not in capsys.readouterr().err


def test_state_selects_the_backend(tmp_path, postgres_url):
    from nhi_gateway.approvals.postgres import PostgresApprovalStore
    from nhi_gateway.approvals.state import parse_state
    from nhi_gateway.approvals.store import ApprovalStore
    from nhi_gateway.proxy.gateway import GatewayConfig, open_approvals

    default = open_approvals(GatewayConfig(POLICY, recordings=tmp_path / "rec"))
    assert isinstance(default.store, ApprovalStore) and default.store.path == tmp_path / "rec" / "approvals.sqlite3"
    chosen = open_approvals(GatewayConfig(POLICY, state=parse_state(f"sqlite:///{tmp_path}/state.db")))
    assert isinstance(chosen.store, ApprovalStore) and chosen.store.path == tmp_path / "state.db"
    shared = open_approvals(GatewayConfig(POLICY, state=parse_state(postgres_url)))
    try:
        assert isinstance(shared.store, PostgresApprovalStore)
        assert shared.store.wait_listening(10)
    finally:
        for a in (default, chosen, shared):
            a.close()
