"""PolicyReload: valid edits take effect, invalid ones and deletions leave the last good policy."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from nhi_gateway.addons.reload import PolicyReload, signature
from nhi_gateway.policy.operation import Operation
from nhi_gateway.policy.loader import PolicyStore
from nhi_gateway.identity.principal import Principal

from ..support.policies import policy_head

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
HEAD = policy_head(TENANT) + "rules:\n"
ALLOW = HEAD + "- {id: users, action: allow, operations: [{host: graph.microsoft.com, methods: [GET], paths: [/users]}]}\n"
DENY = ALLOW + "- {id: no-users, action: deny, operations: [{host: graph.microsoft.com, methods: [GET], paths: [/users]}]}\n"
BROKEN = HEAD + "- id: users\n  action: alow\n  operations: []\n"
WHO = Principal(TENANT, "0b1c2d3e-0000-4000-8000-000000000042", "5e0b1683-de22-5eac-9334-fb85a741f6ff")
USERS = Operation.from_request("GET", "https", "graph.microsoft.com", 443, "/v1.0/users")


def edit(path: Path, text: str) -> None:
    """Write and move the mtime on, as a later edit would (file systems with coarse clocks)."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def setup(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(ALLOW)
    store = PolicyStore(path)
    return path, store, PolicyReload(store)


async def test_an_edit_made_before_the_proxy_runs_is_not_missed(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(ALLOW)
    store = PolicyStore(path)
    reload = PolicyReload(store)  # built right after the store loaded the file
    edit(path, DENY)  # ... and the file changes before the first poll
    assert await reload.check() is True


async def test_an_unchanged_file_is_not_read_again(setup, monkeypatch):
    path, store, reload = setup
    monkeypatch.setattr(store, "reload", lambda: pytest.fail("read again"))
    assert await reload.check() is False


async def test_a_valid_edit_takes_effect_and_is_logged_once(setup, caplog):
    path, store, reload = setup
    caplog.set_level(logging.INFO, logger="nhi_gateway.addons.reload")
    edit(path, DENY)
    assert await reload.check() is True
    assert store.generation == 2
    assert store.current.decide(WHO, USERS).rule_id == "no-users"
    assert [r.message for r in caplog.records] == [f"policy reloaded from {path}: generation 2, 2 rules"]
    assert await reload.check() is False  # nothing new


async def test_an_invalid_edit_keeps_the_last_good_policy_and_says_where(setup, caplog):
    path, store, reload = setup
    good = store.current
    edit(path, BROKEN)
    assert await reload.check() is False
    assert store.current is good and store.generation == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert f"{path}:15:11: rule 'users': action must be one of allow, deny, approve, not 'alow'" in errors[0].getMessage()
    assert "last good policy (generation 1) stays in force" in errors[0].getMessage()
    assert "did you mean 'allow'?" in errors[0].getMessage()
    assert await reload.check() is False  # the same broken file is not reported every second
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    edit(path, DENY)  # fixed
    assert await reload.check() is True and store.generation == 2


async def test_a_deleted_file_keeps_the_last_good_policy_until_it_is_back(setup, caplog):
    path, store, reload = setup
    good = store.current
    path.unlink()
    assert await reload.check() is False
    assert await reload.check() is False
    assert store.current is good
    gone = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert gone == [f"policy file {path} is gone; the last good policy (generation 1, 1 rules) stays in force "
                    "until a valid file is back"]  # loud, once
    path.write_text(DENY)
    assert await reload.check() is True
    assert store.current.decide(WHO, USERS).rule_id == "no-users"


async def test_a_file_replaced_by_rename_is_read(setup):
    """Editors and config tools write a new file and rename it over the old one (new inode)."""
    path, store, reload = setup
    new = path.with_suffix(".tmp")
    new.write_text(DENY)
    new.replace(path)
    assert await reload.check() is True


async def test_a_file_still_being_written_is_read_again_on_the_next_poll(setup):
    path, store, reload = setup
    sizes = iter([(1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 3, 5), (1, 2, 3, 5), (1, 2, 3, 5)])
    reload.stat = lambda p: next(sizes)
    edit(path, BROKEN)  # half written: the signature moves while it is read
    assert await reload.check() is False
    edit(path, DENY)  # done
    assert await reload.check() is True  # (1,2,3,5) was never recorded as seen: read again
    assert await reload.check() is False


async def generation(store: PolicyStore, n: int) -> None:
    """Wait (two seconds at most) until the store holds its ``n``-th policy."""
    for _ in range(200):
        if store.generation == n:
            break
        await asyncio.sleep(0.01)
    assert store.generation == n


async def test_the_watcher_runs_in_the_background_and_stops_with_the_proxy(setup, caplog):
    path, store, reload = setup
    reload.interval = 0.02
    reload.running()
    try:
        edit(path, DENY)
        await generation(store, 2)
        # an unexpected failure in one poll does not end the watcher
        reload.stat = lambda p: 1 / 0
        await asyncio.sleep(0.1)
        reload.stat = signature
        edit(path, ALLOW)
        await generation(store, 3)
        assert any("unexpected error" in r.getMessage() for r in caplog.records)
    finally:
        task = reload._task
        reload.done()
    await asyncio.sleep(0)
    assert task.cancelled() or task.done()
