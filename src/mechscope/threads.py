"""How many threads a command computes with, chosen for the machine as it is when the command starts.

PyTorch's default is one thread per core. On a laptop where another program keeps a core busy, that
is the wrong default twice over: the thread that shares the busy core runs at half speed, and the
others spin in OpenMP's barriers waiting for it (GNU OpenMP's default wait policy is to spin), so the
command takes about three times as long instead of twice. :func:`choose_threads` counts the cores
that are idle (or only running lower-priority, ``nice``'d work, which yields to us) over a short
sample of ``/proc/stat`` when the command starts, and :func:`configure` sets PyTorch to that many
threads. OpenMP's wait policy is left alone: making waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``)
rescues a busy machine too, but costs a third more time on a quiet one (measured: 16.5 s against
12.2 s for the README's command). An explicit ``OMP_NUM_THREADS`` (or ``MECHSCOPE_THREADS``) is always
honoured.

Measured by ``benchmarks/busy_machine.py`` (README, "A busy machine").
"""

from __future__ import annotations

import os
import time

__all__ = ["available_cpus", "idle_cpus", "choose_threads", "configure"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[float, float] | None:
    """``(idle + iowait + nice, total)`` jiffies of all CPUs from ``/proc/stat``, or ``None``."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [float(v) for v in fields[1:]]
    user, nice, system, idle, iowait = values[:5]
    # a nice'd process yields its core to us, so its time counts as available
    return idle + iowait + nice, sum(values[:8])


def idle_cpus(sample_s: float = 0.1) -> float | None:
    """Cores idle (or running only ``nice``'d work) over ``sample_s`` seconds, or ``None`` off Linux."""
    first = _cpu_times()
    if first is None:
        return None
    time.sleep(sample_s)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return share * (os.cpu_count() or 1)


def choose_threads(cpus: int | None = None, idle: float | None = None) -> int:
    """Threads for a compute-bound command: the available CPUs, less those another (not nice'd)
    program keeps busy, at least one. ``MECHSCOPE_THREADS`` or ``OMP_NUM_THREADS`` win when set.

    Args:
        cpus: CPUs this process may use (default :func:`available_cpus`).
        idle: idle cores (default: sampled with :func:`idle_cpus`; ``None`` off Linux: all CPUs).
    """
    for name in ("MECHSCOPE_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    cpus = available_cpus() if cpus is None else cpus
    if idle is None:
        idle = idle_cpus()
    if idle is None:
        return cpus
    return max(1, min(cpus, int(idle + 0.5)))


def configure() -> int:
    """Set PyTorch's intra-op threads to :func:`choose_threads`; returns the number."""
    import torch

    threads = choose_threads()
    torch.set_num_threads(threads)
    return threads
