"""CPU time of processes and of the whole machine, read from /proc (Linux; no psutil).

    before = ProcessTree.snapshot(os.getpid())
    ... load ...
    used = ProcessTree.snapshot(os.getpid()).since(before)     # {pid: seconds}

A snapshot holds every live descendant of a root process with its user + system CPU seconds
(/proc/PID/stat utime + stime, all threads); `since` gives what each used in between (a
process that started in between counts from zero). `MachineCpu` is /proc/stat's first line:
how many cores were busy, ours or other people's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(comm, parent pid, CPU seconds) of a live process; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is in parentheses and may hold spaces or parentheses itself: split after the last ')'.
    comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, utime and stime fields 14 and 15.
    return comm, int(rest[1]), (int(rest[11]) + int(rest[12])) / TICK


@dataclass(frozen=True)
class ProcessTree:
    """Every live descendant of `root` (not `root` itself): pid -> (comm, parent, CPU seconds)."""

    root: int
    procs: dict[int, tuple[str, int, float]]

    @classmethod
    def snapshot(cls, root: int) -> ProcessTree:
        stats = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
                stats[int(entry.name)] = stat
        children: dict[int, list[int]] = {}
        for pid, (_, parent, _) in stats.items():
            children.setdefault(parent, []).append(pid)
        found, todo = {}, list(children.get(root, []))
        while todo:
            pid = todo.pop()
            found[pid] = stats[pid]
            todo += children.get(pid, [])
        return cls(root, found)

    def since(self, earlier: ProcessTree) -> dict[int, float]:
        """CPU seconds each process of this snapshot used after `earlier`."""
        return {pid: cpu - (earlier.procs[pid][2] if pid in earlier.procs else 0.0)
                for pid, (_, _, cpu) in self.procs.items()}

    def name(self, pid: int, known: dict[int, str]) -> str:
        """`known[pid]`, else the nearest known ancestor's name + "/" + this process's comm."""
        if pid in known:
            return known[pid]
        comm, parent, _ = self.procs[pid]
        if parent in self.procs or parent in known:
            return f"{self.name(parent, known) if parent in self.procs else known[parent]}/{comm}"
        return comm


@dataclass(frozen=True)
class MachineCpu:
    """Busy and total CPU seconds of the whole machine, summed over its cores (/proc/stat)."""

    busy: float
    total: float

    @classmethod
    def read(cls) -> MachineCpu:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return cls((sum(fields[:8]) - idle) / TICK, sum(fields[:8]) / TICK)

    def busy_cores(self, earlier: MachineCpu, wall_s: float) -> float:
        """Cores kept busy on average between `earlier` and now."""
        return (self.busy - earlier.busy) / wall_s if wall_s > 0 else 0.0
