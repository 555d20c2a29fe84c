"""Background load during a timed section: CPU used by processes outside the benchmark, and steal time.

A shared machine makes timings drift; these numbers say whether a row was measured on a quiet machine.
`other_cores` is the machine's busy CPU time minus what the benchmark's own process tree used, over the wall
time (in cores); `steal_cores` is CPU time the hypervisor gave to other guests (Linux /proc/stat "steal").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuSample:
    wall: float
    busy_s: float
    steal_s: float
    mine_s: float


def _stat_fields(pid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields from the state on (the name may hold spaces)


def _tree_cpu_s(root: int) -> float:
    """utime + stime of `root` and its live descendants."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is None:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) * TICK_S
    mine = {root}
    changed = True
    while changed:
        before = len(mine)
        mine |= {pid for pid, parent in parents.items() if parent in mine}
        changed = len(mine) != before
    return sum(times.get(pid, 0.0) for pid in mine)


def sample() -> CpuSample | None:
    """None where /proc is not available (not Linux)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in first[1:9])
    busy = (user + nice + system + irq + softirq) * TICK_S
    return CpuSample(time.perf_counter(), busy, steal * TICK_S, _tree_cpu_s(os.getpid()))


def background(start: CpuSample | None, end: CpuSample | None) -> dict[str, float]:
    """{"other_cores": ..., "steal_cores": ...} between two samples (empty without /proc)."""
    if start is None or end is None or end.wall <= start.wall:
        return {}
    wall = end.wall - start.wall
    other = (end.busy_s - start.busy_s) - (end.mine_s - start.mine_s)
    return {"other_cores": max(other, 0.0) / wall, "steal_cores": (end.steal_s - start.steal_s) / wall}
