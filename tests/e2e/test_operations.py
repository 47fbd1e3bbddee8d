"""Operating the gateway: health, readiness and metrics on the admin listener, as Kubernetes probes
and a Prometheus scraper call them (plain HTTP clients, no token), against the real gateway."""

from __future__ import annotations

import ssl
import time
import uuid

import httpx
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ..support.e2e import GRAPH, until
from .conftest import EXAMPLE_POLICY, gateway_running, start_gateway, stop

WAIT = 30.0


@pytest.fixture
def gw(tmp_path, lookalike):
    with gateway_running(tmp_path / "gw", lookalike) as gw:
        yield gw


def admin(gw) -> httpx.Client:
    return httpx.Client(base_url=gw.info["approvals_api"], trust_env=False, timeout=WAIT)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scrape: dict, name: str, **labels) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def until_ready(client: httpx.Client) -> httpx.Response:
    deadline = time.monotonic() + WAIT
    while (r := client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.1)
    return r


def test_health_and_readiness_name_each_check_and_are_not_graph_flows(gw):
    with admin(gw) as client:
        assert client.get("/healthz").json() == {"status": "serving"}
        body = until_ready(client).json()
        assert set(body["checks"]) == {"serving", "policy", "signing_keys", "recording", "audit", "approvals"}
        assert all(c["ok"] for c in body["checks"].values())
        assert client.post("/readyz").status_code == 405
    audited = [a for a in gw.audit() if "z" in (a.get("url") or "")]
    assert not any("/healthz" in a["url"] or "/readyz" in a["url"] for a in audited)


def test_readiness_fails_when_the_recordings_cannot_be_written(gw, tokens):
    """The recordings directory replaced by a file: the next request is refused, and readiness
    says which part is broken (so an orchestrator takes the replica out of service)."""
    with admin(gw) as client:
        until_ready(client)
        gw.recordings.rename(gw.recordings.with_name("recordings.away"))
        gw.recordings.write_text("not a directory")
        r = requests.get(f"{GRAPH}/v1.0/users?m={uuid.uuid4().hex}", headers={"Authorization": f"Bearer {tokens()}"},
                         proxies={"https": gw.proxy()}, verify=gw.ca_cert, timeout=WAIT)
        assert r.status_code == 503
        r = client.get("/readyz")
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert not checks["recording"]["ok"] and checks["policy"]["ok"]


def test_metrics_count_a_known_mix_of_requests_exactly(gw, lookalike, tokens):
    good = tokens()
    app_id = lookalike.app("mcp-directory")["application_object_id"]

    def send(method: str, path: str, token: str | None) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(method, f"{GRAPH}{path}", headers=headers, proxies={"https": gw.proxy()},
                                verify=gw.ca_cert, timeout=WAIT, json={} if method == "POST" else None)

    with admin(gw) as client:
        until_ready(client)
        assert [send("GET", f"/v1.0/users?m={i}", good).status_code for i in range(3)] == [200] * 3
        assert [send("POST", f"/v1.0/applications/{app_id}/addPassword", good).status_code
                for _ in range(2)] == [403] * 2
        assert send("DELETE", "/v1.0/users/someone", good).status_code == 403  # no rule allows it
        tampered = good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB")
        assert [send("GET", "/v1.0/users", tampered).status_code for _ in range(2)] == [401] * 2
        assert send("GET", "/v1.0/users", None).status_code == 401
        client.get("/healthz")  # probes are not requests

        # The last answers' audit lines are written as they leave.
        until(lambda: len(gw.audit()) >= 9, "nine audit lines", WAIT)
        text = client.get("/metrics").text

    s = samples(text)
    assert value(s, "nhi_requests_total", decision="allow", stage="policy", rule="directory-read") == 3
    assert value(s, "nhi_requests_total", decision="deny", stage="policy", rule="no-credential-minting") == 2
    assert value(s, "nhi_requests_total", decision="deny", stage="policy", rule="") == 1
    assert value(s, "nhi_requests_total", decision="deny", stage="identity", rule="") == 3
    assert value(s, "nhi_token_checks_failed_total", check="signature") == 2
    assert value(s, "nhi_token_checks_failed_total", check="missing") == 1
    assert value(s, "nhi_upstream_responses_total", host="graph.microsoft.com", status="2xx") == 3
    assert value(s, "nhi_upstream_latency_seconds_count", host="graph.microsoft.com") == 3
    assert value(s, "nhi_recording_writes_total", kind="write_ahead", outcome="ok") == 3
    assert value(s, "nhi_recording_writes_total", kind="flow", outcome="ok") == 9
    assert value(s, "nhi_audit_writes_total", outcome="ok") == 9
    assert value(s, "nhi_approvals_held") == 0
    assert value(s, "nhi_grants_active") == 0
    issuers = [labels for (name, labels) in s if name == "nhi_signing_keys_age_seconds"]
    assert issuers and all(dict(labels)["issuer"].startswith("https://") for labels in issuers)
    assert good not in text and good.split(".")[2] not in text
    assert len(gw.audit()) == 9  # the scrape and the probe are not in the trail


def test_json_logs_carry_time_level_and_the_flow_and_never_a_secret(tmp_path, lookalike, tokens):
    import json
    import re

    gw = start_gateway(tmp_path / "gw", lookalike, extra_args=["--log-format", "json", "--log-level", "debug"])
    try:
        good = tokens()
        tampered = good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBB")
        app = lookalike.app("mcp-directory")

        def send(url: str, proxy_token: str | None = None, **kw) -> requests.Response:
            return requests.request(kw.pop("method", "GET"), url, proxies={"https": gw.proxy(proxy_token)},
                                    verify=gw.ca_cert, timeout=WAIT, **kw)

        allowed = send(f"{GRAPH}/v1.0/users?m=allowed", headers={"Authorization": f"Bearer {good}"})
        assert allowed.status_code == 200
        assert send(f"{GRAPH}/v1.0/users?m=tampered", headers={"Authorization": f"Bearer {tampered}"}).status_code == 401
        assert send(f"{GRAPH}/v1.0/users?m=proxycreds", proxy_token=good).status_code == 200
        secret_grant = send(f"https://login.microsoftonline.com/{lookalike.tenant_id}/oauth2/v2.0/token",
                            method="POST", data={"grant_type": "client_credentials", "client_id": app["client_id"],
                                                 "client_secret": app["secret"],
                                                 "scope": "https://graph.microsoft.com/.default"})
        assert secret_grant.status_code == 200, secret_grant.text  # flagged and forwarded (example policy)
        issued = secret_grant.json()["access_token"]
        until(lambda: len(gw.audit()) >= 4, "four audit lines", WAIT)
    finally:
        stop(gw.proc)

    text = gw.log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert lines
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"]), line
        assert line["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") and line["logger"]
    flows = {line["flow_id"]: line for line in lines if "flow_id" in line}
    decisions = sorted((f["decision"], f["rule"] or f["check"]) for f in flows.values())
    assert ("allow", "directory-read") in decisions and ("deny", "signature") in decisions
    allow_line = next(f for f in flows.values() if f["rule"] == "directory-read")
    assert allow_line["principal"]["app_id"] == app["client_id"] and allow_line["operation"].startswith("GET ")
    assert allow_line["status"] == 200
    for secret in (good, good.split(".")[2], tampered.split(".")[2], app["secret"], issued, issued.split(".")[-1]):
        assert secret not in text


def _admin_pki(tmp_path):
    """A CA and a certificate for the admin listener's name (and 127.0.0.1), as an operator has."""
    from cryptography.hazmat.primitives import serialization

    from nhi_gateway.lookalike import pki

    ca_key, ca_cert = pki.generate_ca("operators' CA")
    key, cert = pki.issue_server_cert(ca_key, ca_cert, names=("gateway-admin.test",), addresses=("127.0.0.1",))
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def test_the_admin_listener_serves_the_operators_certificate_and_refuses_plain_http(tmp_path, lookalike):
    pem = _admin_pki(tmp_path)
    gw = start_gateway(tmp_path / "gw", lookalike,
                       extra_args=["--admin-tls-cert", str(pem["cert"]), "--admin-tls-key", str(pem["key"])])
    try:
        plain = gw.info["approvals_api"]
        secure = plain.replace("http://", "https://")
        with httpx.Client(base_url=secure, trust_env=False, timeout=WAIT, verify=ssl.create_default_context(cafile=str(pem["ca"]))) as client:
            assert client.get("/healthz").json() == {"status": "serving"}  # verified against the operator's CA
            r = client.get("/approvals", headers={"Authorization": "Bearer not-a-token"})
            assert r.status_code == 401  # the approval API itself, over TLS
        with httpx.Client(base_url=plain, trust_env=False, timeout=WAIT) as client:
            r = client.get("/healthz")
            assert r.status_code == 403 and "requires TLS" in r.text
            r = client.get("/approvals", headers={"Authorization": "Bearer not-a-token"})
            assert r.status_code == 403 and "requires TLS" in r.text
    finally:
        stop(gw.proc)


@pytest.mark.parametrize("args, says", [
    (["--approvals-listen", "0.0.0.0:0"], "not a loopback address"),
    (["--admin-tls-cert", "{missing}", "--admin-tls-key", "{missing}"], "--admin-tls-cert"),
    (["--admin-tls-cert", "{cert}"], "go together"),
])
def test_an_admin_listener_that_would_expose_tokens_stops_the_start(tmp_path, lookalike, args, says):
    import subprocess
    import sys

    pem = _admin_pki(tmp_path)
    args = [a.format(missing=tmp_path / "nowhere.pem", cert=pem["cert"]) for a in args]
    run = subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", "run", "--policy",
                          str(EXAMPLE_POLICY), "--listen", "127.0.0.1:0",
                          "--confdir", str(tmp_path / "confdir"), "--recordings", str(tmp_path / "rec"), *args],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert says in run.stderr and "Traceback" not in run.stderr


def test_the_audit_trail_goes_to_stdout_byte_for_byte_for_a_siem(tmp_path, lookalike, tokens):
    import json
    import subprocess
    import sys

    gw = start_gateway(tmp_path / "gw", lookalike, extra_args=["--audit-copy", "stdout"])
    try:
        for n in range(2):
            r = requests.get(f"{GRAPH}/v1.0/users?n={n}", headers={"Authorization": f"Bearer {tokens()}"},
                             proxies={"https": gw.proxy()}, verify=gw.ca_cert, timeout=WAIT)
            assert r.status_code == 200
        until(lambda: len(gw.audit()) >= 2, "two audit lines", WAIT)
    finally:
        stop(gw.proc)
    trail = (gw.recordings / "audit.jsonl").read_bytes().splitlines()
    copied = [line for line in gw.log.read_bytes().splitlines() if line.startswith(b'{"seq":')]
    assert copied == trail and len(trail) == 2
    assert all(json.loads(line)["decision"] == "allow" for line in copied)
    # The copy verifies as a chain on its own (what a SIEM can check).
    siem = tmp_path / "siem.jsonl"
    siem.write_bytes(b"\n".join(copied) + b"\n")
    verify = subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", "audit", "verify", str(siem)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
