"""Threads that adapt to a busy machine: fewer intra-op threads while other processes keep
cores busy.

torch's OpenMP threads wait for each other at the end of every parallel region. When
another process holds one of two cores, one of our two threads is often not scheduled,
and the other spins at every barrier: measured on a 2-core CPU with one busy competitor,
the encoder took 2.4x and a click 2.6x their quiet times with two threads, but 1.7x and
1.8x with one (docs/speed.md). So:

- :class:`CpuMonitor` measures, in a daemon thread started on first use, how many of the
  CPUs this process may run on (affinity, and a cgroup CPU quota) other processes keep
  busy: ``/proc/stat``'s busy time on those CPUs minus this process's own CPU time,
  smoothed over about a second;
- :class:`AdaptiveThreads` turns that into torch's intra-op thread count, in the thread
  that runs the work (OpenMP's thread count is per calling thread): the *base* count
  (what torch had, or what the user set with ``torch.set_num_threads``) on a quiet
  machine, fewer when fewer CPUs are free, never below one.

Where ``/proc/stat`` does not exist, or ``MOBILESAM_ADAPTIVE_THREADS=0`` is set, the
base count is kept. Tests give :class:`CpuMonitor` readings instead of the machine's.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["ADAPTIVE", "AdaptiveThreads", "CpuMonitor", "cgroup_cpu_quota", "parse_proc_stat"]

#: seconds between two readings of /proc/stat
INTERVAL = 0.25
#: weight of the newest reading in the smoothed load (about a second of memory)
SMOOTHING = 0.4


def parse_proc_stat(text: str, cpus: set[int] | None) -> tuple[float, float] | None:
    """(busy, total) CPU seconds over the CPUs ``cpus`` (all when None) of a
    ``/proc/stat`` text, or None when it has none of them.

    Busy is user + nice + system + irq + softirq + steal; total adds idle and iowait.
    """
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        try:
            cpu = int(name[3:])
            values = [float(v) for v in fields[:8]]
        except ValueError:
            continue
        if cpus is not None and cpu not in cpus:
            continue
        values += [0.0] * (8 - len(values))
        user, nice, system, idle, iowait, irq, softirq, steal = values
        b = user + nice + system + irq + softirq + steal
        busy, total, found = busy + b, total + b + idle + iowait, True
    return (busy / hz, total / hz) if found else None


def cgroup_cpu_quota(root: str | os.PathLike = "/sys/fs/cgroup") -> float | None:
    """CPUs the cgroup quota allows (``cpu.max`` of cgroup v2, ``cpu.cfs_*`` of v1), or
    None without a quota."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else float(quota) / float(period)
    except (OSError, ValueError):
        pass
    try:
        quota = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = float((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _read_proc_stat() -> str | None:
    try:
        return Path("/proc/stat").read_text()
    except OSError:
        return None


class CpuMonitor:
    """How busy other processes keep the CPUs this process may use.

    Parameters
    ----------
    read : callable() -> str or None
        The ``/proc/stat`` text (None: not available).
    own_cpu : callable() -> float
        This process's CPU seconds, all threads (:func:`time.process_time`).
    clock : callable() -> float
        Wall seconds (:func:`time.monotonic`).
    cpus : set of int, optional
        The CPUs to watch (default: this process's affinity).
    quota : float, optional
        CPUs a cgroup quota allows (default: read from ``/sys/fs/cgroup``).

    Notes
    -----
    :meth:`sample` takes one reading; :meth:`start` takes one every :data:`INTERVAL`
    seconds in a daemon thread. Thread-safe.
    """

    def __init__(
        self,
        read: Callable[[], str | None] = _read_proc_stat,
        own_cpu: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        cpus: set[int] | None = None,
        quota: float | None = None,
    ):
        self._read, self._own, self._clock = read, own_cpu, clock
        self.cpus = cpus if cpus is not None else _affinity()
        self.quota = quota if quota is not None else cgroup_cpu_quota()
        self._lock = threading.Lock()
        self._last: tuple[float, float, float] | None = None  # (wall, busy, own)
        self._others: float | None = None
        self._thread: threading.Thread | None = None

    @property
    def n_cpus(self) -> float:
        """CPUs this process may use: its affinity, capped by a cgroup quota."""
        n = float(len(self.cpus)) if self.cpus else float(os.cpu_count() or 1)
        return min(n, self.quota) if self.quota else n

    def sample(self) -> float | None:
        """Take one reading; the smoothed number of CPUs other processes keep busy
        (None until two readings exist, or without ``/proc/stat``)."""
        text = self._read()
        parsed = None if text is None else parse_proc_stat(text, self.cpus)
        if parsed is None:
            return None
        now, own = self._clock(), self._own()
        with self._lock:
            last, self._last = self._last, (now, parsed[0], own)
            if last is None or now <= last[0]:
                return self._others
            wall = now - last[0]
            others = max(0.0, (parsed[0] - last[1] - (own - last[2])) / wall)
            others = min(others, float(len(self.cpus) if self.cpus else others))
            if self._others is None:
                self._others = others
            else:
                self._others += SMOOTHING * (others - self._others)
            return self._others

    def others_busy(self) -> float | None:
        """The last smoothed reading (CPUs kept busy by other processes), or None."""
        with self._lock:
            return self._others

    def start(self) -> None:
        """Read every :data:`INTERVAL` seconds in a daemon thread (once; idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="mobilesam-cpu", daemon=True)
        self.sample()
        self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(INTERVAL)
            if self.sample() is None and self._last is None:
                return  # no /proc/stat: nothing to watch


class AdaptiveThreads:
    """torch's intra-op threads for the calling thread, adapted to other processes' load.

    Parameters
    ----------
    monitor : CpuMonitor, optional
        Default: one per process, started on the first :meth:`apply`.
    enabled : bool, optional
        Default: unless the environment sets ``MOBILESAM_ADAPTIVE_THREADS=0``.
    watch : bool
        Start the monitor's daemon thread on the first :meth:`apply` (else the caller
        takes readings with :meth:`CpuMonitor.sample`).
    """

    def __init__(
        self, monitor: CpuMonitor | None = None, enabled: bool | None = None, watch: bool = True
    ):
        if enabled is None:
            enabled = os.environ.get("MOBILESAM_ADAPTIVE_THREADS", "1") != "0"
        self.enabled = bool(enabled)
        self.watch = bool(watch)
        self._monitor = monitor
        self._local = threading.local()
        self._lock = threading.Lock()
        self._base: int | None = None  # the process's base count
        self._last_set: int | None = None  # the count apply() last set, in any thread

    @property
    def monitor(self) -> CpuMonitor:
        with self._lock:
            if self._monitor is None:
                self._monitor = CpuMonitor()
            return self._monitor

    def decide(self, base: int) -> int:
        """Threads for a base count of ``base`` given the monitor's last reading: all of
        them while at most about half a CPU is taken, else one per free CPU (at least
        one, at most ``base``)."""
        others = self.monitor.others_busy() if self.enabled else None
        if others is None or base <= 1:
            return base
        free = self.monitor.n_cpus - others
        return max(1, min(base, math.floor(free + 0.5)))

    def apply(self) -> int:
        """Set the calling thread's torch threads to :meth:`decide`'s count; return it.

        The base count is the process's torch count when first seen, and a thread's own
        count whenever someone else set it (``torch.set_num_threads``). A new thread
        starts with the count torch last set anywhere; when that is ours (a reduction),
        the thread takes the process's base instead."""
        local = self._local
        pinned = getattr(local, "pinned", None)
        if pinned is not None:
            return pinned
        current = torch.get_num_threads()
        if not self.enabled:
            return current
        with self._lock:
            if self._base is None:
                self._base = current
            ours = getattr(local, "ours", None)
            if ours is None and current == self._last_set:
                local.base = self._base  # a new thread that inherited our reduction
            elif ours != current:  # first call here, or set by the user: their choice
                local.base = self._base = current
        if self.watch:
            self.monitor.start()
        want = self.decide(local.base)
        if want != current:
            torch.set_num_threads(want)
            with self._lock:
                self._last_set = want
        local.ours = want
        return want

    def pin(self, n: int) -> None:
        """Fix the calling thread's torch threads at ``n``: :meth:`apply` keeps them there
        (worker threads that run whole batches on one thread each, :mod:`.workers`).
        Threads started later still take the process's base count."""
        # torch sets a thread's count from the process-wide one on the thread's first
        # query or parallel operation, which would undo a count set before it
        torch.get_num_threads()
        torch.set_num_threads(n)
        self._local.pinned = n
        with self._lock:
            self._last_set = n  # what a new thread inherits from here: not a user's choice

    def base(self) -> int:
        """The calling thread's base count (its torch count before any adaptation)."""
        return getattr(self._local, "base", self._base or torch.get_num_threads())

    def describe(self) -> str:
        if not self.enabled:
            return f"{torch.get_num_threads()} threads"
        base = self.base()
        others = self.monitor.others_busy() if self._monitor is not None else None
        now = self.decide(base) if others is not None else base
        busy = "" if others is None else f", other processes {others:.1f} CPUs busy"
        return f"{now} of {base} threads (fewer while other processes keep CPUs busy{busy})"


#: the process's adaptive thread count, used by every engine on a CPU
ADAPTIVE = AdaptiveThreads()
