"""The gateway's hook dispatch: the same calls, in the same order, with the same error handling
as mitmproxy's AddonManager, only without entering addons that lack the hook."""

from __future__ import annotations

import logging

import pytest
from mitmproxy import exceptions, master, options
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from nhi_gateway.dispatch import IndexedAddonManager


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


@pytest.mark.parametrize("indexed", [False, True])
async def test_same_calls_in_the_same_order_as_mitmproxy(indexed, caplog):
    reference, calls = [], []
    await dispatch(build(False, reference), tflow.tflow(resp=True))
    with caplog.at_level(logging.ERROR):
        await dispatch(build(indexed, calls), tflow.tflow(resp=True))
    assert calls == reference
    assert ("after-failure", "response") in calls  # an exception in one addon does not stop the next
    assert "boom" in caplog.text


async def test_addon_halt_stops_the_event_as_in_mitmproxy():
    for indexed in (False, True):
        calls = []
        m = master.Master(options.Options())
        if indexed:
            IndexedAddonManager.install(m)
        m.addons.add(Recorder("halting", calls, halt=True), Recorder("later", calls))
        await m.addons.handle_lifecycle(HttpResponseHook(tflow.tflow(resp=True)))
        assert calls == [("halting", "response")]


async def test_addons_added_or_removed_later_are_seen():
    calls = []
    m = master.Master(options.Options())
    IndexedAddonManager.install(m)
    first = Recorder("first", calls)
    m.addons.add(first)
    flow = tflow.tflow(resp=True)
    await m.addons.handle_lifecycle(HttpRequestHook(flow))
    m.addons.add(Recorder("late", calls))
    m.addons.remove(first)
    await m.addons.handle_lifecycle(HttpRequestHook(flow))
    assert calls == [("first", "request"), ("late", "request")]


async def test_a_replaced_hook_is_called():
    calls = []
    m = master.Master(options.Options())
    IndexedAddonManager.install(m)
    addon = Recorder("orig", calls)
    m.addons.add(addon)
    flow = tflow.tflow(resp=True)
    await m.addons.handle_lifecycle(HttpRequestHook(flow))
    addon.request = lambda f: calls.append(("replaced", "request"))
    await m.addons.handle_lifecycle(HttpRequestHook(flow))
    assert calls == [("orig", "request"), ("replaced", "request")]


async def test_the_gateway_master_uses_it(tmp_path):
    from nhi_gateway.gateway import GatewayConfig, start

    policy = tmp_path / "policy.yaml"
    policy.write_text((__import__("pathlib").Path(__file__).parents[2] / "policies" / "deny-all.yaml").read_text())
    gw = await start(GatewayConfig(policy_path=policy, listen_port=0, confdir=tmp_path / "conf",
                                   recordings=tmp_path / "rec", recording_process=False))
    assert isinstance(gw.master.addons, IndexedAddonManager)
    hooked = gw.master.addons._hooked("request")
    assert hooked and all(callable(getattr(a, "request", None)) or hasattr(a, "addons") for a in hooked)
    assert gw.master.addons._hooked("update") == ()
    gw.approvals.close()
