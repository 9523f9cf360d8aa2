"""How many threads fitting uses: no more than the cores that are free, while OpenMP threads would spin.

Fitting a model is thousands of small factorisations and matrix products. Each one that runs on two
OpenMP threads ends at a barrier where, under the runtime's default wait policy, the idle thread spins;
beside another busy process the thread it waits for may not even be running (the plan of a 3-layer MLP
took 12.7 s instead of 0.2 s in the issue that asked for this). The policy is read once, when torch
loads, so a library called after ``import torch`` cannot change it. What it can change is the thread
count: at the start of each planning or fitting call, tensorfold counts the runnable tasks of other
processes (Linux ``/proc/stat`` minus this process's running threads) and, if fewer cores are free than
torch would use, fits on the free ones (at least one). On a quiet machine nothing changes (one thread
always was measured 24-30% slower there); beside a busy process the fit runs on one thread and does not
collapse. The count costs about 5 ms per call. Figures: docs/performance.md.

With ``OMP_WAIT_POLICY=PASSIVE`` (which the ``tensorfold`` command sets before torch loads, and
``make test`` sets) waiting threads sleep, sharing is already cheap, and the caller's count is kept.

>>> import torch
>>> before = torch.get_num_threads()
>>> with fitting_threads():
...     inside = torch.get_num_threads()
>>> torch.get_num_threads() == before and 1 <= inside <= before
True
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator

import torch

__all__ = ["fitting_threads", "free_cores", "passive_waiting"]

# the median of a few instantaneous counts, a millisecond apart (a few milliseconds per call)
SAMPLES = 5


def passive_waiting() -> bool:
    """True when OpenMP threads sleep while they wait (``OMP_WAIT_POLICY=PASSIVE`` in the environment)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _runnable_tasks() -> int | None:
    """The kernel's count of runnable tasks now (``procs_running``; this reading thread included)."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _own_running() -> int:
    """This process's threads that are running or runnable now (its idle OpenMP threads may still spin)."""
    n = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        n += state == "R"
    return max(n, 1)  # the reading thread runs


def free_cores(samples: int = SAMPLES) -> int | None:
    """Cores not taken by other processes' runnable tasks right now (median of ``samples`` counts), or None
    where the count is not available (not Linux)."""
    counts = []
    for i in range(samples):
        n = _runnable_tasks()
        if n is None:
            return None
        counts.append(n - _own_running())
        if i + 1 < samples:
            time.sleep(0.001)
    others = max(statistics.median_low(counts), 0)
    return max(_usable_cores() - others, 0)


@contextlib.contextmanager
def fitting_threads() -> Iterator[None]:
    """Run the block on at most as many torch threads as there are free cores (at least one) unless waiting
    threads sleep; the caller's count is restored afterwards. Timing code inside the block sets its own
    thread count (``--threads``) as before."""
    old = torch.get_num_threads()
    if old == 1 or passive_waiting():
        yield
        return
    free = free_cores()
    threads = old if free is None else max(1, min(old, free))
    if threads == old:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)
