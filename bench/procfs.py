"""CPU time and memory of another process, read from /proc (Linux), so the benchmark needs no psutil."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcessSample:
    cpu_s: float  # user + system CPU since the process started
    rss_kb: int  # resident set now
    peak_rss_kb: int  # VmHWM: the most it was ever resident


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid`, in seconds (10 ms resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces and parentheses
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted from the state field
    return (utime + stime) / CLOCK_TICKS_PER_S


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of `pid` in kB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def sample_process(pid: int) -> ProcessSample:
    rss, peak = memory_kb(pid)
    return ProcessSample(cpu_seconds(pid), rss, peak)


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, steal): CPU time all cores spent running something, and time the hypervisor kept from them."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS_PER_S, steal / CLOCK_TICKS_PER_S


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system
