"""What else a (Linux) machine did while a benchmark ran: CPU taken by other tasks and by
the kernel's DAMON monitor, and time stolen by the hypervisor.

    snap = MachineLoad.now(); ...; used = MachineLoad.now().since(snap)

Read from ``/proc/stat`` (every CPU's busy / steal ticks), ``/proc/<pid>/stat`` of the
``kdamond`` threads and ``getrusage`` of this process, all in clock ticks (10 ms): sum it
over blocks of steps, not single steps. Where a file is unreadable (not Linux) the fields
are None. ``damon()`` describes the DAMON monitors (``/sys/kernel/mm/damon/admin``): a
``paddr`` monitor with a ``pageout`` scheme walks the physical pages of every process and
reclaims the cold ones, and at RL scale (gigabytes of index) that shows up as stalls of
this process's threads -- measured on the issue-12 VM, see docs/design.md "Host path".
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

_DAMON = Path("/sys/kernel/mm/damon/admin/kdamonds")
_TICK = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def damon() -> list[dict]:
    """Each DAMON monitor: state, kernel thread pid, per context the address space it
    watches (``vaddr`` / ``paddr``) and its schemes' actions (``pageout`` reclaims)."""
    out = []
    if not _DAMON.is_dir():
        return out
    for kd in sorted(p for p in _DAMON.iterdir() if p.name.isdigit()):
        contexts = []
        for ctx in sorted(p for p in (kd / "contexts").glob("[0-9]*")):
            actions = [_read(s / "action") for s in sorted((ctx / "schemes").glob("[0-9]*"))]
            contexts.append({"operations": _read(ctx / "operations"), "schemes": actions})
        pid = _read(kd / "pid")
        out.append({"state": _read(kd / "state"), "pid": int(pid) if pid and pid.isdigit() else None,
                    "contexts": contexts})
    return out


def _kdamond_pids() -> list[int]:
    return [d["pid"] for d in damon() if d["pid"] and d["pid"] > 0]


def _proc_cpu_ticks(pid: int) -> int | None:
    text = _read(Path(f"/proc/{pid}/stat"))
    if text is None:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)"
    return int(fields[11]) + int(fields[12])  # utime + stime


def _stat() -> tuple[int, int] | None:
    """(busy, steal) ticks summed over every CPU."""
    text = _read(Path("/proc/stat"))
    if text is None:
        return None
    v = [int(x) for x in text.splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


@dataclass(frozen=True)
class MachineLoad:
    wall: float
    stat: tuple[int, int] | None
    own_cpu: float
    kdamond: int | None

    @classmethod
    def now(cls) -> "MachineLoad":
        ru = resource.getrusage(resource.RUSAGE_SELF)
        ticks = [_proc_cpu_ticks(p) for p in _kdamond_pids()]
        ticks = [t for t in ticks if t is not None]
        return cls(time.perf_counter(), _stat(), ru.ru_utime + ru.ru_stime, sum(ticks) if ticks else None)

    def since(self, before: "MachineLoad") -> dict:
        """Seconds between two snapshots: ``wall_s``; ``own_cpu_s`` (this process);
        ``others_cpu_s`` (every CPU's busy time minus this process's: other processes and
        kernel threads); ``kdamond_cpu_s``; ``steal_s`` (hypervisor)."""
        out = {"wall_s": self.wall - before.wall, "own_cpu_s": self.own_cpu - before.own_cpu,
               "others_cpu_s": None, "steal_s": None, "kdamond_cpu_s": None}
        if self.stat is not None and before.stat is not None:
            busy = (self.stat[0] - before.stat[0]) * _TICK
            out["others_cpu_s"] = max(0.0, busy - out["own_cpu_s"])
            out["steal_s"] = (self.stat[1] - before.stat[1]) * _TICK
        if self.kdamond is not None and before.kdamond is not None and self.kdamond >= before.kdamond:
            # (a monitor restarted in between gets a new thread: its CPU is then unknown)
            out["kdamond_cpu_s"] = (self.kdamond - before.kdamond) * _TICK
        return out


def add(total: dict, part: dict) -> dict:
    """``total`` += ``part`` field by field (None stays None)."""
    for k, v in part.items():
        if v is None or (k in total and total[k] is None):
            total[k] = None
        else:
            total[k] = total.get(k, 0.0) + v
    return total
