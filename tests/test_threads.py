"""Thread choice: idle cores (nice'd work counts as idle), explicit settings win."""

from __future__ import annotations

from mechscope import threads


def test_threads_follow_the_idle_cores(monkeypatch):
    monkeypatch.delenv("MECHSCOPE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.choose_threads(cpus=2, idle=1.97) == 2  # quiet
    assert threads.choose_threads(cpus=2, idle=1.02) == 1  # one core taken by another program
    assert threads.choose_threads(cpus=2, idle=0.05) == 1  # at least one
    assert threads.choose_threads(cpus=4, idle=7.5) == 4  # never more than this process may use
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(cpus=2, idle=0.0) == 3
    monkeypatch.setenv("MECHSCOPE_THREADS", "5")
    assert threads.choose_threads(cpus=2, idle=2.0) == 5


def test_idle_cores_from_proc_stat_count_nice_time_as_free(monkeypatch):
    # /proc/stat "cpu" line: user nice system idle iowait irq softirq steal; two samples 100 jiffies apart
    samples = iter([(0.0 + 0.0 + 0.0, 0.0), (50.0 + 25.0, 100.0)])  # (idle + iowait + nice, total)
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    assert threads.idle_cpus(sample_s=0.0) == 1.5
    monkeypatch.undo()
    times = threads._cpu_times()  # the real /proc/stat, where there is one
    assert times is None or 0 <= times[0] <= times[1]
    measured = threads.idle_cpus(sample_s=0.05)
    assert measured is None or 0.0 <= measured <= (threads.os.cpu_count() or 1) + 1e-6
