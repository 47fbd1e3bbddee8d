"""Turning every failure into a refusal.

mitmproxy logs an exception raised in a hook as "Addon error" and forwards the flow anyway. Every
hook of the gateway is wrapped by ``fail_closed``: an exception becomes a denial of that flow,
recorded and audited like any other refusal, and the request never goes upstream.
"""

from __future__ import annotations

import functools
import inspect
import logging

from mitmproxy import http

from nhi_gateway.policy.decision import (  # noqa: F401  (the addons' one import for the flow's decision)
    DECISION_KEY,
    REFUSED_KEY,
    Decision,
    Stage,
    decision_of,
    refusal_body,
    set_decision,
)

logger = logging.getLogger(__name__)

HEADER_HOOKS = ("requestheaders", "responseheaders")


def refuse(flow: http.HTTPFlow, decision: Decision) -> None:
    """Answer the client ourselves with a JSON reason; the request is not forwarded."""
    previous = decision_of(flow)
    if previous is not None:
        # Keep who and what was asked, so the record of a refusal is as complete as an allow's.
        decision = decision.but(
            operation=decision.operation or previous.operation,
            principal=decision.principal or previous.principal,
        )
    set_decision(flow, decision)
    flow.metadata[REFUSED_KEY] = True
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
    if decision.status == 407:
        headers["Proxy-Authenticate"] = 'Basic realm="nhi-gateway"'
    elif decision.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="nhi-gateway", error="invalid_token"'
    flow.response = http.Response.make(decision.status, refusal_body(decision, flow.id), headers)


def internal_error(where: str) -> Decision:
    return Decision.deny(
        Stage.ERROR,
        500,
        "GatewayError",
        f"the gateway failed in {where} while handling this request; it was refused, not forwarded",
    )


def deny_on_exception(flow, where: str, exc: BaseException) -> None:
    logger.error("flow %s: %s raised %r; refusing the flow", getattr(flow, "id", "?"), where, exc,
                 exc_info=exc)
    hook = where.rsplit(".", 1)[-1]
    if isinstance(flow, http.HTTPFlow) and hook not in HEADER_HOOKS:
        refuse(flow, internal_error(where))
    elif hook not in ("error", "http_connect_error"):
        # After a *headers hook mitmproxy keeps reading the body into the current response, so a
        # response set here could be overwritten by upstream bytes: kill the flow instead.
        set_decision(flow, internal_error(where))
        flow.kill()


def fail_closed(hook):
    """Wrap an addon hook (sync or async): an exception refuses the flow instead of passing it."""
    where = hook.__qualname__

    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def async_wrapper(self, flow, *args):
            try:
                return await hook(self, flow, *args)
            except Exception as e:
                deny_on_exception(flow, where, e)

        return async_wrapper

    @functools.wraps(hook)
    def wrapper(self, flow, *args):
        try:
            return hook(self, flow, *args)
        except Exception as e:
            deny_on_exception(flow, where, e)

    return wrapper
