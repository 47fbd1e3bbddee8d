"""Hook dispatch that skips the addons without the hook.

mitmproxy's ``AddonManager.trigger_event`` enters every top-level addon for every event: a
``safecall`` context manager, a coroutine, a walk of the addon's children and a ``getattr`` each,
whether the addon has the hook or not. Each flow event is followed by an ``update`` event that no
addon of the gateway implements, so a keep-alive request costs eight events times every addon of
the master: about a tenth of the gateway's CPU per request went to calling nobody.

:class:`IndexedAddonManager` keeps, per event name, the top-level addons that (or whose children)
have a callable of that name, and enters only those: same order, same ``safecall`` per top-level
addon (an exception in one is logged and the next still runs), same ``AddonHalt``. The hook itself
is still looked up at call time, so replacing an addon's method takes effect as before. The index
is dropped whenever the chain changes through the manager (``add``, ``remove``, ``clear``).
An addon that grows children with new hooks after start (mitmproxy's script loader does) would not
be seen; the gateway's master has no such addon and loads no scripts.

For the benchmark, a :class:`HookClock` can be attached (``NHI_HOOK_CPU=<file>``): the CPU time of
this thread spent in each addon's hook, for every step of an async hook (not the time it waits),
is added up per addon and hook and written to the file. Sampling profilers count a process that is
runnable but not running (woken processes taking its core) as busy in whatever call it was in; the
thread's own CPU clock does not.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import time
import types
from pathlib import Path

from mitmproxy import addonmanager, exceptions, hooks


def _has_hook(addon, name: str) -> bool:
    # As AddonManager._iter_hooks: a module of that name is skipped; any other truthy attribute
    # is entered (and one that is not callable reported as the error it is).
    found = getattr(addon, name, None)
    return bool(found) and not isinstance(found, types.ModuleType)


HOOK_CPU_ENV = "NHI_HOOK_CPU"


class HookClock:
    """CPU time of the event loop's thread per addon hook (nanoseconds), and the count of each
    hook's events, written to ``path`` as JSON (``{"hooks": {"Addon.hook": ns}, "events": {hook:
    n}}``) at most once per ``interval`` seconds and when asked: readers diff two snapshots."""

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = Path(path)
        self.interval = interval
        self.spent: dict[str, int] = {}
        self.events: dict[str, int] = {}
        self._written = -math.inf  # the first event writes (monotonic() may be small: it counts from boot)

    def add(self, key: str, ns: int) -> None:
        self.spent[key] = self.spent.get(key, 0) + ns

    def event(self, name: str) -> None:
        self.events[name] = self.events.get(name, 0) + 1
        if time.monotonic() - self._written >= self.interval:
            self.write()

    def write(self) -> None:
        self._written = time.monotonic()
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"hooks": self.spent, "events": self.events}))
        os.replace(tmp, self.path)  # a reader never sees half a file

    async def timed(self, key: str, step, args) -> None:
        """Call one hook, counting this thread's CPU in each step of it (an async hook is driven
        step by step here as its task would drive it; what it awaits runs uncounted)."""
        clock = time.thread_time_ns
        started = clock()
        try:
            result = step(*args)
        finally:
            self.add(key, clock() - started)
        if result is None or not inspect.isawaitable(result):
            return
        if not inspect.iscoroutine(result):
            await result
            return
        sent, thrown = None, None
        while True:
            started = clock()
            try:
                yielded = result.throw(thrown) if thrown is not None else result.send(sent)
            except StopIteration:
                return
            finally:
                self.add(key, clock() - started)
            sent, thrown = None, None
            try:
                if yielded is None:
                    await asyncio.sleep(0)  # a bare yield: give the loop a turn, as the task would
                else:
                    # The hook yielded a future for its task to wait on: wait on it here instead.
                    yielded._asyncio_future_blocking = False
                    await yielded
            except BaseException as e:  # cancelled while waiting: the hook sees it, as it would
                thrown = e


class IndexedAddonManager(addonmanager.AddonManager):
    _index: dict[str, tuple] | None = None
    clock: HookClock | None = None  # the benchmark's per-hook CPU accounting (NHI_HOOK_CPU)

    @classmethod
    def install(cls, master, clock: HookClock | None = None) -> None:
        """Switch a master's manager to this class, keeping the addons it already has."""
        master.addons.__class__ = cls
        master.addons._index = None
        master.addons.clock = clock

    def _hooked(self, name: str) -> tuple:
        if self._index is None:
            self._index = {}
        found = self._index.get(name)
        if found is None:
            found = self._index[name] = tuple(
                top for top in self.chain
                if any(_has_hook(a, name) for a in addonmanager.traverse([top]))
            )
        return found

    async def trigger_event(self, event: hooks.Hook):
        hooked = self._hooked(event.name)
        if not hooked:
            return
        # The hook's arguments once per event: mitmproxy's invoke_addon rebuilds them (through
        # dataclasses.fields) for every addon it calls. They are the event's fields, the same
        # objects for every addon.
        args = event.args()
        if self.clock is not None:
            await self._trigger_timed(event, hooked, args)
            return
        for top in hooked:
            try:
                with addonmanager.safecall():
                    for _, func in self._iter_hooks(top, event):
                        res = func(*args)
                        if res is not None and inspect.isawaitable(res):  # async hooks, as mitmproxy
                            await res
            except exceptions.AddonHalt:
                return

    async def _trigger_timed(self, event: hooks.Hook, hooked: tuple, args: list) -> None:
        clock = self.clock
        clock.event(event.name)
        for top in hooked:
            key = f"{type(top).__name__}.{event.name}"
            try:
                with addonmanager.safecall():
                    for _, func in self._iter_hooks(top, event):
                        await clock.timed(key, func, args)
            except exceptions.AddonHalt:
                return

    def add(self, *addons):
        self._index = None
        super().add(*addons)
        self._index = None

    def remove(self, addon):
        self._index = None
        super().remove(addon)
        self._index = None

    def clear(self):
        self._index = None
        super().clear()
        self._index = None

