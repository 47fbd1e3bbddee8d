"""Health, readiness and metrics on the admin listener (the approval API's), for orchestrators.

    GET /healthz   200 while the process serves (it answered, so it does)
    GET /readyz    200 when every check passes, else 503; the JSON body names each check
    GET /metrics   Prometheus text format

They need no token (probes and scrapers carry none) and reveal nothing about callers: states of
the gateway's own parts and counters with bounded labels. They are answered in
``requestheaders``, before the approval API sees the request, and marked so that neither the audit
trail nor the recordings file them as Graph flows. Only on the admin listener: on the proxy
listener these paths are Graph requests like any other.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from mitmproxy import http

from nhi_gateway.addons.approvals_api import is_api_flow
from nhi_gateway.addons.admin_tls import plain_http_refusal
from nhi_gateway.addons.failclosed import fail_closed, refuse, set_decision
from nhi_gateway.addons.metrics import PROBE_KEY, GatewayMetrics
from nhi_gateway.policy.decision import Action, Decision, Stage

logger = logging.getLogger(__name__)

PATHS = ("/healthz", "/readyz", "/metrics")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


async def readiness(checks: list[Callable[[], Check | Awaitable[Check]]]) -> tuple[bool, list[Check]]:
    """Run every check (a check that asks a server is a coroutine); one that raises is a failed
    check, never a crash of the probe."""
    results = []
    for check in checks:
        try:
            result = check()
            results.append(await result if inspect.isawaitable(result) else result)
        except Exception as e:  # noqa: BLE001 - a broken check means "not ready", said so
            name = getattr(check, "__name__", "check").removeprefix("check_")
            results.append(Check(name, False, f"the check failed: {type(e).__name__}: {e}"))
    return all(c.ok for c in results), results


class Admin:
    def __init__(self, metrics: GatewayMetrics, checks: list[Callable[[], Check | Awaitable[Check]]],
                 require_tls: bool = False, off_loop: Callable[..., Awaitable] | None = None) -> None:
        self.metrics = metrics
        self.checks = checks
        # Scraping reads the approvals store (grants in force): with a store on a server, in a
        # worker thread (Approvals.off_loop), so a slow server never holds the event loop.
        self.off_loop = off_loop
        self.require_tls = require_tls  # --admin-tls-cert given: plain HTTP on the admin listener is refused

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not is_api_flow(flow):
            return
        if self.require_tls and not flow.client_conn.tls_established:
            refuse(flow, plain_http_refusal())
            return
        path = urlsplit(flow.request.path).path
        if path not in PATHS:
            return
        flow.metadata[PROBE_KEY] = True
        # The gateway's own answer: an explicit allow, so the guard passes it (masking has no profile).
        set_decision(flow, Decision(action=Action.ALLOW, stage=Stage.POLICY, reason=f"admin endpoint {path}",
                                    operation=f"{flow.request.method} admin {path}"))
        if flow.request.method not in ("GET", "HEAD"):
            flow.response = _json(405, {"error": f"{path} answers GET only"})
        elif path == "/healthz":
            flow.response = _json(200, {"status": "serving"})
        elif path == "/readyz":
            ready, results = await readiness(self.checks)
            if not ready:
                logger.warning("not ready: %s", "; ".join(f"{c.name}: {c.detail}" for c in results if not c.ok))
            flow.response = _json(200 if ready else 503, {
                "status": "ready" if ready else "not ready",
                "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in results},
            })
        else:
            exposition = (self.metrics.exposition() if self.off_loop is None
                          else await self.off_loop(self.metrics.exposition))
            flow.response = http.Response.make(
                200, exposition, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _json(status: int, body: dict) -> http.Response:
    return http.Response.make(status, json.dumps(body, indent=1).encode(),
                              {"Content-Type": "application/json", "Cache-Control": "no-store"})


# --- what "ready" means ------------------------------------------------------------------------


def gateway_checks(policies, key_store, trusted_issuers, recorder, health, approvals, stopping) -> list:
    """The readiness checks of a running gateway. ``trusted_issuers()`` yields ``(metadata URL,
    issuer)`` for every issuer the policy in force trusts."""

    def check_policy() -> Check:
        policy = policies.current
        return Check("policy", policy is not None,
                     f"generation {policies.generation}, {len(policy.rules)} rules" if policy else "no policy")

    def check_signing_keys() -> Check:
        missing, held = [], 0
        for metadata_url, issuer in trusted_issuers():
            count, age = key_store.held(metadata_url)
            if age is None or count == 0:
                missing.append(issuer)
                key_store.fetch_soon(metadata_url, issuer)
            else:
                held += 1
        if missing:
            return Check("signing_keys", False, f"no current signing keys yet for {', '.join(sorted(missing))}")
        return Check("signing_keys", True, f"keys held for {held} trusted issuers")

    def check_recording() -> Check:
        if "recording" in health.problems:
            return Check("recording", False, health.problems["recording"])
        if recorder.process is not None and not recorder.process.running:
            return Check("recording", False, "the recording process is not running")
        return Check("recording", True, f"writing to {recorder.directory}")

    def check_audit() -> Check:
        if "audit" in health.problems:
            return Check("audit", False, health.problems["audit"])
        return Check("audit", True, "writable")

    async def check_approvals() -> Check:
        import time

        # Raises when unreachable; off the event loop with a store on a server.
        await approvals.off_loop(approvals.store.grants, now=time.time(), active_only=True, limit=1)
        return Check("approvals", True, "store reachable")

    def check_serving() -> Check:
        if stopping.reason is not None:
            return Check("serving", False, stopping.reason)
        return Check("serving", True, "accepting requests")

    return [check_serving, check_policy, check_signing_keys, check_recording, check_audit, check_approvals]
