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
