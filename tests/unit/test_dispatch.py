"""The gateway's hook dispatch: the same calls, in the same order, with the same error handling
as mitmproxy's AddonManager, only without entering addons that lack the hook."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from mitmproxy import exceptions, master, options
from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
from mitmproxy.test import tflow

from nhi_gateway.bench.hooks import per_request, render
from nhi_gateway.proxy.dispatch import HookClock, IndexedAddonManager


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
    assert manager.clock is None  # the accounting costs a microsecond a hook: only when asked
    gw.approvals.close()


async def test_the_gateway_master_sends_no_log_record_through_the_event_loop_as_an_add_log_event(tmp_path):
    """mitmproxy hands every log record to the loop again as a deprecated ``add_log`` event (its
    self-pipe written per line). The gateway drops that, so no addon of its chain may need it."""
    from pathlib import Path

    from mitmproxy import addonmanager, log

    from nhi_gateway.proxy.gateway import GatewayConfig, start

    policy = tmp_path / "policy.yaml"
    policy.write_text((Path(__file__).parents[2] / "policies" / "deny-all.yaml").read_text())
    gw = await start(GatewayConfig(policy_path=policy, listen_port=0, confdir=tmp_path / "conf",
                                   recordings=tmp_path / "rec", recording_process=False))
    try:
        assert not [h for h in logging.getLogger().handlers if isinstance(h, log.LegacyLogEvents)]
        assert [a for a in addonmanager.traverse(gw.master.addons.chain) if hasattr(a, "add_log")] == []
        called = []
        gw.master.event_loop.call_soon_threadsafe = lambda *a: called.append(a)  # what the event would use
        logging.getLogger("nhi_gateway.test").warning("a line")
        assert called == []
    finally:
        gw.approvals.close()


async def test_nhi_hook_cpu_gives_the_gateway_master_a_clock_writing_there(tmp_path, monkeypatch):
    from pathlib import Path

    from nhi_gateway.proxy.gateway import GatewayConfig, start

    monkeypatch.setenv("NHI_HOOK_CPU", str(tmp_path / "hooks.json"))
    policy = tmp_path / "policy.yaml"
    policy.write_text((Path(__file__).parents[2] / "policies" / "deny-all.yaml").read_text())
    gw = await start(GatewayConfig(policy_path=policy, listen_port=0, confdir=tmp_path / "conf",
                                   recordings=tmp_path / "rec", recording_process=False))
    clock = gw.master.addons.clock
    assert isinstance(clock, HookClock) and clock.path == tmp_path / "hooks.json"
    gw.approvals.close()


# --- the benchmark's CPU accounting per hook (NHI_HOOK_CPU, scripts/bench --hooks) ---------------


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_with_a_clock_the_same_calls_in_the_same_order_as_mitmproxy(tmp_path, caplog):
    reference, calls = [], []
    await dispatch(build(False, reference), tflow.tflow(resp=True))
    m = build(True, calls)
    m.addons.clock = HookClock(tmp_path / "hooks.json")
    with caplog.at_level(logging.ERROR):
        await dispatch(m, tflow.tflow(resp=True))
    assert calls == reference
    assert "boom" in caplog.text
    assert m.addons.clock.events == {"request": 1, "response": 1}
    assert {"Recorder.request", "Recorder.response"} <= set(m.addons.clock.spent)


async def test_the_clock_counts_a_hooks_cpu_and_not_what_it_waits_for(tmp_path):
    class Slow:
        def request(self, flow):
            _burn(0.02)

        async def response(self, flow):
            _burn(0.02)
            await asyncio.sleep(0.3)  # waiting: not on the CPU
            _burn(0.02)

    clock = HookClock(tmp_path / "hooks.json")
    m = master_with(Slow())
    m.addons.clock = clock
    flow = tflow.tflow(resp=True)
    await m.addons.handle_lifecycle(HttpRequestHook(flow))
    await m.addons.handle_lifecycle(HttpResponseHook(flow))
    assert 0.018 <= clock.spent["Slow.request"] / 1e9 < 0.1
    assert 0.038 <= clock.spent["Slow.response"] / 1e9 < 0.2  # not the 0.3 s it waited


async def test_a_hook_under_the_clock_still_sees_its_errors_and_its_cancellation(tmp_path):
    seen = []

    class Waits:
        async def request(self, flow):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

    clock = HookClock(tmp_path / "hooks.json")
    task = asyncio.ensure_future(clock.timed("Waits.request", Waits().request, [tflow.tflow()]))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]

    async def fails(flow):
        await asyncio.sleep(0)
        raise ValueError("the hook's own error")

    with pytest.raises(ValueError, match="the hook's own error"):
        await clock.timed("Fails.request", fails, [tflow.tflow()])


def test_the_clock_writes_whole_snapshots_at_most_once_an_interval(tmp_path):
    path = tmp_path / "hooks.json"
    clock = HookClock(path, interval=3600)
    clock.add("Audit.response", 5_000)
    clock.event("response")  # the first event writes
    assert json.loads(path.read_text()) == {"hooks": {"Audit.response": 5_000}, "events": {"response": 1}}
    clock.add("Audit.response", 5_000)
    clock.event("response")  # within the interval: not yet
    assert json.loads(path.read_text())["events"] == {"response": 1}
    clock.write()
    assert json.loads(path.read_text()) == {"hooks": {"Audit.response": 10_000}, "events": {"response": 2}}
    assert not list(tmp_path.glob("*.tmp"))


def test_the_benchmark_divides_the_cpu_between_two_snapshots_by_the_requests_between_them():
    before = {"hooks": {"Masking.response": 1_000_000, "Audit.response": 500_000}, "events": {"response": 100}}
    after = {"hooks": {"Masking.response": 9_000_000, "Audit.response": 4_500_000, "Identity.request": 2_000_000},
             "events": {"response": 200, "request": 200}}
    out = per_request(before, after)
    assert out["responses"] == 100
    assert out["hooks"] == [("Masking.response", 80.0), ("Audit.response", 40.0), ("Identity.request", 20.0)]
    assert out["total_us"] == 140.0
    assert "80.0 us  Masking.response" in "\n".join(render(out))
    assert per_request(after, after) == {"responses": 0, "hooks": [], "total_us": 0.0}
