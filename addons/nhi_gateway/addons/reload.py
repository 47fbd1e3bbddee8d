"""Policy reload: an edit to the policy file takes effect within seconds, a bad edit never does.

The file is polled (size, mtime, inode) once a second by a task of our own, started in
``running``. mitmproxy's own script reloading is not used: it unloads an addon whose reload fails
and keeps forwarding unfiltered. Here a reload that fails, for whatever reason, leaves the last
good policy in force and says why, with the file:line:column of the mistake. A deleted file keeps
the last good policy too: the gateway never falls back to "no policy".
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from nhi_gateway.policy.loader import PolicyError, PolicyStore

logger = logging.getLogger(__name__)
# A change of the policy in force is worth a line by default: `nhi-gateway run` leaves the root
# logger at WARNING, which would drop the INFO line of each successful reload.
logger.setLevel(logging.INFO)

POLL_SECONDS = 1.0

Signature = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def signature(path: os.PathLike | str) -> Signature | None:
    """What changes when the file is edited or replaced; None when it is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class PolicyReload:
    def __init__(self, store: PolicyStore, interval: float = POLL_SECONDS,
                 stat: Callable[[os.PathLike | str], Signature | None] = signature) -> None:
        self.store = store
        self.interval = interval
        self.stat = stat
        # The file as last read (or found missing). Taken now, right after the store loaded it:
        # an edit made before the proxy runs is then still seen as an edit.
        self._seen: Signature | None = stat(store.path)
        self._missing = False
        self._task: asyncio.Task | None = None

    def running(self) -> None:
        # Sync hook: mitmproxy calls it inside the running loop, so the task can be created here.
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="nhi-policy-reload")

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive any surprise
                logger.exception("policy reload: unexpected error; the current policy stays in force")

    async def check(self, force: bool = False) -> bool:
        """One poll: reload if the file changed (or ``force``: SIGHUP). True when a new policy
        was installed."""
        path = self.store.path
        before = self.stat(path)
        if before is None:
            if not self._missing:
                self._missing = True
                logger.error("policy file %s is gone; the last good policy (generation %d, %d rules) "
                             "stays in force until a valid file is back", path, self.store.generation,
                             len(self.store.current.rules))
            self._seen = None
            return False
        if before == self._seen and not force:
            return False
        if self._missing:
            self._missing = False
            logger.warning("policy file %s is back; reading it", path)
        try:
            # Parsing a large policy takes a while: off the event loop, so traffic keeps flowing.
            policy = await asyncio.to_thread(self.store.reload)
        except PolicyError as e:
            logger.error("policy reload refused, the last good policy (generation %d) stays in force: %s",
                         self.store.generation, e)
            policy = None
        # An editor still writing would change the signature under us: then read it again next time.
        after = self.stat(path)
        self._seen = before if after == before else None
        if policy is None:
            return False
        logger.info("policy reloaded from %s%s: generation %d, %d rules", path, " (SIGHUP)" if force else "",
                    self.store.generation, len(policy.rules))
        if notice := policy.report_notice():
            logger.warning("%s: %s", path, notice)
        return True
