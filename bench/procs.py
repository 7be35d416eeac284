"""The processes of a server tree, what each is, and the CPU time and memory each has used.

Read from /proc (Linux): `utime + stime` of /proc/<pid>/stat, every thread included, in
clock ticks (10 ms at the usual 100 Hz). A benchmark reads a tree before and after a
measured run and divides the difference by the requests answered: CPU per request per
process, the figure that travels to other machines.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after its last ")".
    return text[text.rfind(")") + 2 :].split()


def children_map() -> dict[int, list[int]]:
    """ppid -> pids, for every process visible now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def tree(root_pid: int) -> list[int]:
    """`root_pid` and every process below it."""
    children = children_map()
    pids, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def label(pid: int) -> str:
    """What a process of a stack or a baseline is, from its command line."""
    argv = cmdline(pid)
    if not argv:
        return "gone"
    exe = Path(argv[0]).name
    if exe.startswith("redis-server"):
        return "redis"
    if exe == "memcached":
        return "memcached"
    if argv[1:3] == ["-m", "inferpool.api"]:
        return "api"
    if argv[1:3] == ["-m", "inferpool.workers.main"]:
        return "worker"
    if "flower" in argv[1:] and any(Path(a).name == "celery" for a in argv[:2]):
        return "flower"
    if argv[1:3] == ["-m", "honcho"]:
        return "honcho"
    if argv[1:3] == ["-m", "bench.baselines"]:
        return "server"
    return exe


def cpu_s(pid: int) -> float:
    """CPU seconds `pid` has used so far (user + system, all its threads)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the command: state(0) ppid(1) ... utime(11) stime(12), counted from `state`.
    return (int(fields[11]) + int(fields[12])) * TICK_S


def cpu_by_label(pids: Iterable[int]) -> dict[str, float]:
    """CPU seconds so far, summed per label (two processes of one kind add up)."""
    out: dict[str, float] = {}
    for pid in pids:
        name = label(pid)
        out[name] = out.get(name, 0.0) + cpu_s(pid)
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def find(root_pid: int) -> dict[str, int]:
    """label -> pid of the first process with that label under `root_pid`."""
    found: dict[str, int] = {}
    for pid in tree(root_pid)[1:]:
        found.setdefault(label(pid), pid)
    return found


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def machine_cpu() -> dict[str, float]:
    """CPU seconds the whole machine has spent so far: `busy` (every process, the
    kernel's interrupt work included) and `steal` (time the hypervisor gave another
    guest while this one wanted to run), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return {"busy": float("nan"), "steal": float("nan")}
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return {"busy": (user + nice + system + irq + softirq) * TICK_S, "steal": steal * TICK_S}
