"""Read a process's CPU time and memory from /proc (Linux), without third-party packages."""

from __future__ import annotations

import os

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return utime + stime of every thread of `pid` so far, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        raw = stat.read()
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    fields = raw.rpartition(")")[2].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """Return utime + stime so far per thread name of `pid` (threads of one name summed).

    The main thread is named "main"; the others keep the kernel's name (Python threads
    inherit the process's, grpc's own threads are named event_engine and so on).
    """
    found: dict[str, float] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat", encoding="ascii", errors="replace") as stat:
                raw = stat.read()
        except OSError:
            continue  # the thread ended meanwhile
        name = "main" if task == str(pid) else raw.partition("(")[2].rpartition(")")[0]
        fields = raw.rpartition(")")[2].split()
        found[name] = found.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    return found


def memory_kib(pid: int) -> dict[str, int]:
    """Return VmRSS (current) and VmHWM (peak) of `pid` in KiB."""
    wanted = {"VmRSS", "VmHWM"}
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in wanted:
                found[key] = int(value.split()[0])
    return found


def machine_busy_seconds() -> float:
    """Return CPU time all processes on the machine have used so far, in seconds."""
    with open("/proc/stat", encoding="ascii") as stat:
        first = stat.readline().split()
    # cpu user nice system idle iowait irq softirq steal ...: busy is everything but idle
    # and iowait; guest time is already inside user.
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """Return `pid` and every live descendant (a `--workers` parent and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                parent = int(stat.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # exited while we looked
        children.setdefault(parent, []).append(int(entry))
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, ()))
    return found


def tree_cpu_seconds(pids: list[int]) -> float:
    """Return the summed utime + stime of `pids`; a process that has exited counts 0."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
    return total


def tree_memory_kib(pid: int) -> dict[str, int]:
    """Return VmRSS and VmHWM summed over `pid` and its descendants, in KiB."""
    total = {"VmRSS": 0, "VmHWM": 0}
    for member in process_tree(pid):
        try:
            found = memory_kib(member)
        except OSError:
            continue
        for key in total:
            total[key] += found.get(key, 0)
    return total


def listening_sockets(port: int) -> int:
    """Return how many TCP sockets listen on `port` (one per SO_REUSEPORT worker)."""
    count = 0
    # gRPC binds 127.0.0.1 as a dual-stack socket, which the kernel lists under tcp6.
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table_path, encoding="ascii") as table:
            next(table)
            for line in table:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                    count += 1
    return count
