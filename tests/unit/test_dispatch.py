"""The gateway's hook dispatch: the same calls, in the same order, with the same error handling
as mitmproxy's AddonManager, only without entering addons that lack the hook."""

from __future__ import annotations

import logging

from mitmproxy import exceptions, master, options
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from nhi_gateway.proxy.dispatch import IndexedAddonManager


class Recorder:
    def __init__(self, name: str, calls: list, *, children=(), fail=False, halt=False, asynchronous=False):
        self.name, self.calls, self.fail, self.halt = name, calls, fail, halt
        if children:
            self.addons = list(children)
        if asynchronous:
            async def response(flow):
                self.calls.append((self.name, "response"))
            self.response = response
        else:
            self.response = self._response

    def _response(self, flow):
        self.calls.append((self.name, "response"))
        if self.fail:
            raise RuntimeError("boom")
        if self.halt:
            raise exceptions.AddonHalt()

    def request(self, flow):
        self.calls.append((self.name, "request"))


class OnlyDone:
    def __init__(self, calls):
        self.calls = calls

    def done(self):
        self.calls.append(("only-done", "done"))


def build(indexed: bool, calls: list):
    m = master.Master(options.Options())
    if indexed:
        IndexedAddonManager.install(m)
    child = Recorder("child", calls, asynchronous=True)
    m.addons.add(
        OnlyDone(calls),
        Recorder("first", calls),
        Recorder("parent", calls, children=[child]),
        Recorder("failing", calls, fail=True),
        Recorder("after-failure", calls),
    )
    return m


async def dispatch(m, flow):
    await m.addons.handle_lifecycle(HttpRequestHook(flow))
    await m.addons.handle_lifecycle(HttpResponseHook(flow))


def master_with(*addons, indexed: bool = True) -> master.Master:
    m = master.Master(options.Options())
    if indexed:
        IndexedAddonManager.install(m)
    m.addons.add(*addons)
    return m


async def test_same_calls_in_the_same_order_as_mitmproxy(caplog):
    reference, calls = [], []
    await dispatch(build(False, reference), tflow.tflow(resp=True))
    with caplog.at_level(logging.ERROR):
        await dispatch(build(True, calls), tflow.tflow(resp=True))
    assert calls == reference
    assert ("after-failure", "response") in calls  # an exception in one addon does not stop the next
    assert "boom" in caplog.text


async def test_addon_halt_stops_the_event_as_in_mitmproxy():
    outcomes = []
    for indexed in (False, True):
        calls = []
        m = master_with(Recorder("halting", calls, halt=True), Recorder("later", calls), indexed=indexed)
        await m.addons.handle_lifecycle(HttpResponseHook(tflow.tflow(resp=True)))
        outcomes.append(calls)
    assert outcomes[1] == outcomes[0] == [("halting", "response")]


async def test_addons_added_or_removed_later_are_seen():
    calls = []
    first = Recorder("first", calls)
    m = master_with(first)
    flow = tflow.tflow(resp=True)
    await m.addons.handle_lifecycle(HttpRequestHook(flow))
    m.addons.add(Recorder("late", calls))
    m.addons.remove(first)
    await m.addons.handle_lifecycle(HttpRequestHook(flow))
    assert calls == [("first", "request"), ("late", "request")]


async def test_a_replaced_hook_is_called():
    calls = []
    addon = Recorder("orig", calls)
    m = master_with(addon)
    flow = tflow.tflow(resp=True)
    await m.addons.handle_lifecycle(HttpRequestHook(flow))
    addon.request = lambda f: calls.append(("replaced", "request"))
    await m.addons.handle_lifecycle(HttpRequestHook(flow))
    assert calls == [("orig", "request"), ("replaced", "request")]


async def test_the_gateway_master_enters_every_addon_that_has_a_hook(tmp_path):
    """On the gateway's real master: for every hook of every addon (the guard's request and
    response among them), the index holds exactly the addons mitmproxy's manager would call."""
    from pathlib import Path

    from mitmproxy import addonmanager, hooks

    from nhi_gateway.addons.guard import Guard
    from nhi_gateway.proxy.gateway import GatewayConfig, start

    policy = tmp_path / "policy.yaml"
    policy.write_text((Path(__file__).parents[2] / "policies" / "deny-all.yaml").read_text())
    gw = await start(GatewayConfig(policy_path=policy, listen_port=0, confdir=tmp_path / "conf",
                                   recordings=tmp_path / "rec", recording_process=False))
    manager = gw.master.addons
    assert isinstance(manager, IndexedAddonManager)
    names = {h.name for h in hooks.all_hooks.values()}
    assert {"requestheaders", "request", "responseheaders", "response", "error", "http_connect"} <= names
    for name in names:
        expected = tuple(top for top in manager.chain if any(
            getattr(a, name, None) for a in addonmanager.traverse([top])))
        assert manager._hooked(name) == expected, name
    guard = next(a for a in manager.chain if isinstance(a, Guard))
    assert guard in manager._hooked("request") and guard in manager._hooked("response")
    assert manager._hooked("update") == ()
    gw.approvals.close()
