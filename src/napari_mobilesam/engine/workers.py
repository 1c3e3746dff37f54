"""Parallelism over prompts: independent batches on worker threads of one torch thread each.

segment-everything decodes its point grid in batches that do not depend on each other. On
a CPU, torch runs each small operation of a batch on all its threads, which then wait for
each other at the end of every operation. On a quiet machine that costs little; when
another process keeps a core busy, one of the threads is often not scheduled and the
others wait for it at every barrier (docs/speed.md, "A busy machine"). Worker threads
that each run whole batches on one torch thread never wait for each other: with a busy
competitor on a 2-core CPU they share the cores the scheduler gives them, instead of
one thread running alone.

:func:`map_in_order` runs ``fn`` over items on such workers (or in the calling thread for
one worker) and yields the results in the items' order, so the output is the same
whatever the number of workers (up to float rounding: one torch thread sums in another
order than several, as the adaptive thread count already does).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from .threads import ADAPTIVE

__all__ = ["map_in_order", "worker_pool"]

T = TypeVar("T")
R = TypeVar("R")

_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def _one_thread() -> None:
    ADAPTIVE.pin(1)


def worker_pool(n: int) -> ThreadPoolExecutor:
    """The process's pool of ``n`` worker threads, each with one torch thread (made once).

    Raises
    ------
    ValueError
        When ``n`` < 2 (one worker is the calling thread: no pool).
    """
    if n < 2:
        raise ValueError(f"a worker pool needs at least 2 workers, got {n}")
    with _LOCK:
        pool = _POOLS.get(n)
        if pool is None:
            keep = torch.get_num_threads()
            ready = threading.Barrier(n + 1)
            pool = ThreadPoolExecutor(n, thread_name_prefix="mobilesam-batch",
                                      initializer=_one_thread)  # fmt: skip
            for _ in range(n):  # start every worker now (each waits for the others)
                pool.submit(ready.wait)
            ready.wait()
            # torch's default for threads started later is the count set last anywhere,
            # which the workers just made 1: put back the caller's
            torch.set_num_threads(keep)
            _POOLS[n] = pool
        return pool


def map_in_order(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``fn(item)`` for each item, on ``workers`` worker threads, yielded in order.

    At most ``2 * workers`` items are in flight, so memory stays that of a few batches.
    An exception in ``fn`` is raised here, at its item, after the items before it; the
    items not started are then dropped (those running finish on their own).

    Parameters
    ----------
    fn : callable
        Thread-safe; runs with one torch thread when ``workers`` > 1.
    items : iterable
    workers : int
        1 (or less): in the calling thread, with its own torch threads.
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    pool = worker_pool(workers)
    pending: deque[Future] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
