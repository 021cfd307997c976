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
