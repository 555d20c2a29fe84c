"""Background load during a timed section: CPU used by processes outside the benchmark, and steal time.

A shared machine makes timings drift; these numbers say whether a row was measured on a quiet machine.
`timed` runs one request and adds to its VariantRun the machine's busy CPU time minus what the benchmark's own
process tree (itself and the services it started) used, and the CPU time the hypervisor gave to other guests
(Linux /proc/stat "steal"); `VariantRun.background_cores` divides both by the wall time they were taken over.
The samples (a walk over /proc, a few ms) are taken outside the timed call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from benchmarks.results import VariantRun

T = TypeVar("T")

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


def timed(run: VariantRun, call: Callable[[], T]) -> T:
    """Runs `call`, adding its wall time to `run.wall_s` and the background load around it to `run`."""
    before = sample()
    started = time.perf_counter()
    result = call()
    run.wall_s += time.perf_counter() - started
    after = sample()
    if before is not None and after is not None:
        other = (after.busy_s - before.busy_s) - (after.mine_s - before.mine_s)
        run.add_background(max(other, 0.0), after.steal_s - before.steal_s, after.wall - before.wall)
    return result
