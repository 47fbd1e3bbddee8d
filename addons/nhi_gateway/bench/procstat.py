"""What a process costs, from Linux's /proc: CPU seconds, resident and peak memory."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid``, all threads."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def descendant_pids(pid: int) -> tuple[int, ...]:
    """Children, their children and so on (--workers N: the workers and their recording processes)."""
    found, frontier = [], [pid]
    while frontier:
        children = [c for parent in frontier for c in child_pids(parent)]
        found += children
        frontier = children
    return tuple(found)


def child_pids(pid: int) -> tuple[int, ...]:
    """The processes whose parent is ``pid`` (the gateway's recording process, say)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        if int(stat[stat.rindex(b")") + 2:].split()[1]) == pid:
            found.append(int(entry))
    return tuple(found)


def _cpu(pids: int | tuple[int, ...]) -> float:
    if isinstance(pids, int):
        return cpu_seconds(pids)
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:  # a child that ended meanwhile: its CPU is no longer to be had
            pass
    return total


def machine_busy_seconds() -> float:
    """CPU time all processes of the machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def status_kb(pid: int, key: str) -> int:
    """A ``VmRSS``/``VmHWM``-style line of /proc/PID/status, in KiB (0 if absent)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0, same user or root); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class CpuWindow:
    """CPU used by some processes between ``start()`` and ``stop()``, as % of one core, and by
    everything else on the machine (``others``: a busy neighbour skews a benchmark)."""

    pids: dict[str, int | tuple[int, ...]]  # a tuple: the processes' CPU summed
    _before: dict[str, float] | None = None
    _machine: float = 0.0
    _wall: float = 0.0
    percent: dict[str, float] | None = None

    def start(self) -> None:
        self._before = {name: _cpu(pid) for name, pid in self.pids.items()}
        self._machine = machine_busy_seconds()
        self._wall = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._wall
        machine = machine_busy_seconds() - self._machine
        after = {name: _cpu(pid) for name, pid in self.pids.items()}
        used = {name: after[name] - self._before[name] for name in self.pids}
        self.percent = {name: 100 * v / wall for name, v in used.items()}
        self.percent["others"] = max(0.0, 100 * (machine - sum(used.values())) / wall)
        return self.percent
