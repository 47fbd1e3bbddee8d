"""The deployment files in scripts/deploy/ run the gateway as it really starts: every option they
pass is one `nhi-gateway run` takes, the probes ask paths the admin listener serves on the port it
listens on, the process runs as a non-root user on a read-only root filesystem with its state on
volumes, and the systemd unit passes `systemd-analyze verify`."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from nhi_gateway.addons.admin import PATHS
from nhi_gateway.addons.stopping import DEFAULT_DRAIN_TIMEOUT
from nhi_gateway.cli.main import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "scripts" / "deploy"


def run_args(argv: list[str]):
    """``argv`` (the options after ``run``) as the gateway's own parser reads them."""
    return build_parser().parse_args(["run", *argv])


def dockerfile_json(instruction: str) -> list[str]:
    import json

    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    line = [ln for ln in text.splitlines() if ln.startswith(instruction + " ")][-1]
    return json.loads(line[len(instruction) + 1:].strip())


def test_the_container_runs_as_non_root_with_its_state_on_volumes_and_a_readiness_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    final_stage = text[text.rindex("\nFROM "):]
    user = [ln.split()[1] for ln in final_stage.splitlines() if ln.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    args = run_args(dockerfile_json("CMD"))
    assert dockerfile_json("ENTRYPOINT")[-1] == "run"
    volumes = dockerfile_json("VOLUME")
    assert str(args.confdir) in volumes and str(args.recordings) in volumes
    host, port = args.approvals_listen
    assert args.admin_tls_cert and args.admin_tls_key  # all addresses: TLS on the admin listener
    health = final_stage[final_stage.index("HEALTHCHECK"):].split("CMD", 1)[1]
    assert f"https://127.0.0.1:{port}/readyz" in health and "/readyz" in PATHS
    assert "STOPSIGNAL SIGTERM" in final_stage


def test_the_kubernetes_sidecar_probes_what_the_gateway_serves():
    docs = [d for d in YAML(typ="safe").load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    gateway = next(c for c in pod["containers"] if c["name"] == "nhi-gateway")
    args = run_args(gateway["args"])
    assert args.listen[0] == "127.0.0.1"  # the proxy only for its own pod
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports["admin"] == args.approvals_listen[1]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = gateway[probe]["httpGet"]
        assert get["path"] in PATHS and get["port"] == "admin"
        assert get["scheme"] == ("HTTPS" if args.admin_tls_cert else "HTTP")
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] > DEFAULT_DRAIN_TIMEOUT
    mounts = {m["mountPath"] for m in gateway["volumeMounts"]}
    assert {str(args.confdir), str(args.recordings), str(args.policy)} <= mounts
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert gateway["envFrom"][0]["secretRef"]["name"] == secret["metadata"]["name"]
    assert "NHI_MASK_KEY" in secret["stringData"]  # the key the example policy's pseudonym_key_env names
    app = next(c for c in pod["containers"] if c["name"] != "nhi-gateway")
    env = {e["name"]: e["value"] for e in app["env"]}
    assert env["HTTPS_PROXY"] == f"http://127.0.0.1:{args.listen[1]}"
    assert env["SSL_CERT_FILE"] == f"{args.confdir}/mitmproxy-ca-cert.pem"


def test_the_systemd_unit_runs_the_gateway_hardened_and_verifies(tmp_path):
    unit = (DEPLOY / "nhi-gateway.service").read_text()
    joined = unit.replace("\\\n", " ")
    exec_start = next(ln for ln in joined.splitlines() if ln.startswith("ExecStart="))
    argv = shlex.split(exec_start.split("=", 1)[1])
    assert argv[1] == "run"
    run_args(argv[2:])
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "UMask=0077", "ExecReload=/bin/kill -HUP $MAINPID",
                    "KillSignal=SIGTERM", "CapabilityBoundingSet="):
        assert setting in unit
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here (Debian: systemd); the unit was parsed only")
    # verify wants the ExecStart binary to exist: point it at this checkout's.
    local = tmp_path / "nhi-gateway.service"
    local.write_text(unit.replace("/opt/nhi-gateway/bin/nhi-gateway", str(Path(sys.executable).with_name("nhi-gateway"))))
    out = subprocess.run([analyze, "verify", "--man=no", str(local)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "nhi-gateway.service" not in out.stderr, out.stderr
