"""A recording made by the real gateway, opened with the one documented step
(``nhi-gateway recordings open APP``) in a real mitmweb, looked at in headless Chromium (Debian's
``chromium`` package): the flow list shows each flow's comment and the marks of refused and
approved flows, mitmweb's search finds a rule's flows (``~comment "rule NAME"``), and the flow's
Comment tab shows the whole annotation. Screenshots are kept in ``test-artifacts/``.

Chromium is driven over the DevTools protocol with tornado's websocket client (tornado comes with
mitmproxy), so no browser is downloaded and no test-only package is needed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import requests

from .conftest import REPO

GRAPH = "https://graph.microsoft.com"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1600,900", "--remote-debugging-port=0",
]
WAIT = 30.0  # how long to wait for the page to reach a state; a bound, not a measurement


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("Debian's chromium is not installed: `apt-get install -y chromium fonts-noto-color-emoji` "
                    "(scripts/test does it when run as root)")
    return found


class Browser:
    """Just enough of the DevTools protocol: navigate, evaluate, click, type, screenshot."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: subprocess.Popen | None = None
        self.ws = None
        self._id = 0

    async def start(self) -> None:
        from tornado.websocket import websocket_connect

        self.proc = subprocess.Popen([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + WAIT
        while not (active.exists() and len(active.read_text().splitlines()) >= 2):
            assert self.proc.poll() is None, f"chromium exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.05)
        port = int(active.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=64 << 20)

    async def call(self, method: str, **params) -> dict:
        self._id += 1
        await self.ws.write_message(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            raw = await asyncio.wait_for(self.ws.read_message(), WAIT)
            assert raw is not None, "chromium closed the DevTools connection"
            msg = json.loads(raw)
            if msg.get("id") == self._id:
                assert "error" not in msg, msg["error"]
                return msg["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, done, what: str):
        deadline = time.monotonic() + WAIT
        while True:
            value = await self.evaluate(expression)
            if done(value):
                return value
            assert time.monotonic() < deadline, f"mitmweb never showed {what}; last seen: {value!r}"
            await asyncio.sleep(0.1)

    async def click(self, selector_expression: str) -> None:
        x, y = await self.evaluate(
            f"(() => {{ const r = ({selector_expression}).getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


ROWS = """[...document.querySelectorAll('.flow-table tbody tr')].filter(r => r.querySelector('td')).map(r => ({
    path: (r.querySelector('td.col-path') || {}).innerText || '',
    marker: ((r.querySelector('td.col-path .marker') || {}).innerText || '').trim(),
    comment: (r.querySelector('td.col-comment') || {}).innerText || ''}))"""


def open_recording(recordings: Path, app: str) -> tuple[subprocess.Popen, str, list[str]]:
    """``nhi-gateway recordings open APP`` as a user runs it; returns the process and its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nhi_gateway.cli.main", "recordings", "open", app, "--recordings", str(recordings)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    said = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        said.append(line.rstrip("\n"))
        if line.startswith("mitmweb: "):
            return proc, line.split(" ", 1)[1].strip(), said
    proc.kill()
    raise AssertionError("recordings open printed no URL:\n" + "\n".join(said))


def port_open(url: str) -> bool:
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


async def test_mitmweb_shows_the_annotations_of_a_real_recording(gateway, lookalike, tokens, monkeypatch, tmp_path):
    for k, v in gateway.client_env().items():
        monkeypatch.setenv(k, v)
    token = tokens()
    allowed, refused = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
    r = requests.get(f"{GRAPH}/v1.0/users?$top=2&m={allowed}", headers={"Authorization": f"Bearer {token}"},
                     timeout=20)
    assert r.status_code == 200, r.text
    app_object_id = lookalike.app("mcp-directory")["application_object_id"]
    r = requests.post(f"{GRAPH}/v1.0/applications/{app_object_id}/addPassword?m={refused}",
                      json={"passwordCredential": {}}, headers={"Authorization": f"Bearer {token}"}, timeout=20)
    assert r.status_code == 403, r.text
    refused_line = next(a for a in gateway.audit() if refused in a["url"])

    # Approvals are not built yet: an approved flow is what the recorder writes for a decision
    # that carries one, appended to the same app's file as the gateway would.
    from mitmproxy import io as mio

    from nhi_gateway.policy.decision import set_decision
    from nhi_gateway.addons.guard import Health
    from nhi_gateway.addons.recorder import Recorder
    from nhi_gateway.policy.decision import Decision

    (path,) = [p for p in gateway.recording_files() if p.name.startswith("mcp-directory--")]
    with open(path, "rb") as fh:
        template = next(f for f in mio.FlowReader(fh).stream() if allowed in f.request.path)
    approved = template.copy()
    approved.request.path = approved.request.path.replace(allowed, "approved")
    set_decision(approved, Decision.from_dict(template.metadata["nhi"]).but(
        rule_id="user-writes-need-approval",
        extra={"approval": {"id": "apr-1"}, "approver": "alice@contoso.example"}))
    recorder = Recorder(gateway.recordings, Health())
    assert recorder.write(approved) == path
    recorder.done()

    opener, url, said = open_recording(gateway.recordings, "mcp-directory")
    browser = Browser(tmp_path / "chromium-profile")
    try:
        assert any(str(path) in line for line in said), said
        await browser.start()
        await browser.call("Page.navigate", url=url)
        rows = await browser.wait_for(ROWS, lambda rows: rows and len(rows) >= 3 and all(r["comment"] for r in rows),
                                      "the recorded flows with their comments")
        await browser.screenshot(ARTIFACTS / "mitmweb-flow-list.png")

        by_path = {next(m for m in (allowed, refused, "approved") if m in row["path"]): row
                   for row in rows if any(m in row["path"] for m in (allowed, refused, "approved"))}
        assert set(by_path) == {allowed, refused, "approved"}, rows
        assert by_path[allowed]["marker"] == ""
        assert by_path[allowed]["comment"].startswith("ALLOW · rule directory-read · by mcp-directory")
        assert by_path[refused]["marker"] == "⛔"
        assert by_path[refused]["comment"].startswith("DENY · rule no-credential-minting · by mcp-directory")
        assert "POST graph.microsoft.com" in by_path[refused]["comment"]
        assert by_path["approved"]["marker"] == "✅"
        assert "approver alice@contoso.example" in by_path["approved"]["comment"]

        # mitmweb's search box (its own filter grammar knows ~comment and ~marker, not ~meta)
        # finds flows by rule through the comment.
        await browser.click("document.querySelector('input[placeholder=Search]')")
        await browser.call("Input.insertText", text='~comment "rule no-credential-minting"')
        found = await browser.wait_for(ROWS, lambda rows: rows is not None and len(rows) == 1,
                                       "only the refused flow for ~comment")
        assert refused in found[0]["path"]
        await browser.screenshot(ARTIFACTS / "mitmweb-search-rule.png")

        # The whole annotation, in the flow's Comment tab.
        await browser.click(f"[...document.querySelectorAll('.flow-table tbody tr')]"
                            f".find(r => r.innerText.includes('{refused}'))")
        await browser.wait_for("!!document.querySelector('.flow-detail nav')", bool, "the flow's details")
        await browser.click("[...document.querySelectorAll('.flow-detail nav a')]"
                            ".find(a => a.innerText.trim() == 'Comment')")
        detail = await browser.wait_for("(document.querySelector('.flow-detail') || {}).innerText || ''",
                                        lambda text: "no-credential-minting" in text, "the Comment tab")
        assert refused_line["principal"]["object_id"] in detail
        assert refused_line["reason"] in detail
        await browser.screenshot(ARTIFACTS / "mitmweb-flow-comment.png")
    finally:
        browser.close()
        opener.send_signal(signal.SIGTERM)
        try:
            opener.wait(timeout=20)
        except subprocess.TimeoutExpired:
            opener.kill()
            raise
    assert opener.returncode == 0
    assert not port_open(url), "mitmweb kept running after `recordings open` stopped"
    assert (ARTIFACTS / "mitmweb-flow-list.png").stat().st_size > 10_000
    assert os.access(ARTIFACTS / "mitmweb-flow-comment.png", os.R_OK)
