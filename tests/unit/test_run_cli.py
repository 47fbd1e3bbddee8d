"""``nhi-gateway run``: options that change how identity is judged are visible and reach the gateway."""

from __future__ import annotations

from pathlib import Path

import pytest

from nhi_gateway.cli import main as cli_main
from nhi_gateway.proxy.gateway import GatewayConfig, start

REPO = Path(__file__).resolve().parents[2]


def test_run_help_shows_the_unknown_kid_refresh_floor_and_its_default(capsys):
    with pytest.raises(SystemExit):
        cli_main.main(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--unknown-kid-refresh SECONDS" in out
    assert "default 300" in out


@pytest.mark.parametrize("argv,expected", [([], 300.0), (["--unknown-kid-refresh", "2.5"], 2.5),
                                           (["--unknown-kid-refresh", "0"], 0.0)])
def test_the_unknown_kid_refresh_floor_reaches_the_gateway(monkeypatch, tmp_path, argv, expected):
    seen = {}

    async def serve(config):
        seen["config"] = config

    monkeypatch.setattr("nhi_gateway.proxy.gateway.serve", serve)
    code = cli_main.main(["run", "--policy", str(REPO / "policies" / "deny-all.yaml"),
                          "--recordings", str(tmp_path), *argv])
    assert code == 0
    assert seen["config"].unknown_kid_refresh == expected


def test_a_negative_unknown_kid_refresh_floor_stops_the_start(capsys, tmp_path):
    code = cli_main.main(["run", "--policy", str(REPO / "policies" / "deny-all.yaml"),
                          "--recordings", str(tmp_path), "--unknown-kid-refresh", "-1"])
    assert code == 2
    assert "--unknown-kid-refresh" in capsys.readouterr().err


async def test_the_key_store_refetches_unknown_kids_at_the_configured_floor(tmp_path):
    gw = await start(GatewayConfig(policy_path=REPO / "policies" / "deny-all.yaml", listen_port=0,
                                   confdir=tmp_path / "conf", recordings=tmp_path / "rec",
                                   recording_process=False, unknown_kid_refresh=42.0))
    try:
        assert gw.verifier.keys.unknown_kid_interval == 42.0
    finally:
        gw.approvals.close()
