"""CPU time of a server process and all its descendants, from /proc (Linux), for us/request.

Each process's ``utime + stime`` covers all its threads; ``cutime + cstime`` adds the children it
has already reaped, so a worker that exits mid-run moves its time to its parent's counters and
the tree's total stays continuous. Resolution is one clock tick (10 ms at ``SC_CLK_TCK`` 100):
measure over runs that use at least a second of CPU. ``machine_busy_s`` gives the whole
machine's busy time, from which a run derives the cores other processes (other engineers' jobs)
took while it ran.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def descendant_pids(pid: int) -> list[int]:
    """``pid`` and every live descendant (via ``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    todo = [pid]
    seen: set[int] = set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def process_cpu_s(pid: int) -> float:
    """utime + stime + cutime + cstime of one process, seconds (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may contain spaces and ')'
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) * _TICK_S


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its descendants (threads included)."""
    return sum(process_cpu_s(p) for p in descendant_pids(pid))


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has spent busy since boot (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(v) for v in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) * _TICK_S  # all but idle and iowait


class CpuMeter:
    """``with CpuMeter(pid) as m: ...`` then ``m.seconds``: the tree's CPU used inside the block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> CpuMeter:
        self._start = tree_cpu_s(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = tree_cpu_s(self.pid) - self._start
